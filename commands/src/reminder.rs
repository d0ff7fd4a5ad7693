//! Reminders and notification inboxes, as pure decide/evolve.
//!
//! A reminder knows its next occurrence; the scheduler fires exactly that one
//! (`FireReminder { due_at }` must name it), so a duplicate from a second
//! scheduler, a restart or a redelivery is refused as `not_due` instead of
//! firing twice. Firing appends `ReminderFired` to the reminder and
//! `NotificationCreated` to the owner's inbox in one decision. Daily and weekly
//! reminders keep their wall-clock time in their zone across daylight saving.

use chrono::{DateTime, Duration, LocalResult, NaiveDateTime, TimeZone, Timelike, Utc};
use events::notify::{Category, DOMAIN as NOTIFY, INBOX, NotifyEvent};
use events::reminder::{DOMAIN, Priority, REMINDER, Recurrence, ReminderEvent};
use events::{Event, StreamId};
use serde::{Deserialize, Serialize};
use serde_json::json;
use uuid::Uuid;

use crate::{Actor, Decision, Rejection, Role, StateSet};

/// The stream of reminder `id`.
pub fn reminder_stream(id: Uuid) -> StreamId {
    StreamId::new(DOMAIN, REMINDER, &id.to_string()).expect("a uuid is a valid subject token")
}

/// The inbox stream of `user`.
pub fn inbox_stream(user: Uuid) -> StreamId {
    StreamId::new(NOTIFY, INBOX, &user.to_string()).expect("a uuid is a valid subject token")
}

const NOTIFICATION_NS: Uuid = Uuid::from_u128(0x6d61_7468_6961_5f6e_6f74_6966_7900_0001);

/// The notification an occurrence makes: the same id every time it is decided.
pub fn occurrence_notification(reminder: Uuid, due_at: DateTime<Utc>) -> Uuid {
    Uuid::new_v5(
        &NOTIFICATION_NS,
        format!("{reminder}|{}", due_at.timestamp_micros()).as_bytes(),
    )
}

/// Longest reminder text, in characters.
pub const MAX_CONTENT: usize = 500;

/// The state of one reminder.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reminder {
    /// `ReminderSet` happened.
    pub exists: bool,
    /// Whose.
    pub owner: Uuid,
    /// Its zone.
    pub zone: String,
    /// The wall-clock time of its occurrences.
    pub local: Option<NaiveDateTime>,
    /// Repeats.
    pub recurrence: Option<Recurrence>,
    /// The next occurrence; none once done or cancelled.
    pub next_due: Option<DateTime<Utc>>,
    /// Cancelled.
    pub cancelled: bool,
}

impl Reminder {
    /// Fold one event in.
    pub fn evolve(&mut self, e: &ReminderEvent) {
        match e {
            ReminderEvent::ReminderSet {
                owner,
                due_at,
                local,
                zone,
                recurrence,
                ..
            } => {
                self.exists = true;
                self.owner = *owner;
                self.zone = zone.clone();
                self.local = Some(*local);
                self.recurrence = Some(*recurrence);
                self.next_due = Some(*due_at);
            }
            ReminderEvent::ReminderEdited { due_at, local, .. } => {
                if let Some(d) = due_at {
                    self.next_due = Some(*d);
                }
                if let Some(l) = local {
                    self.local = Some(*l);
                }
            }
            ReminderEvent::ReminderSnoozed { due_at } => self.next_due = Some(*due_at),
            ReminderEvent::ReminderCancelled => {
                self.cancelled = true;
                self.next_due = None;
            }
            ReminderEvent::ReminderFired {
                next_due_at,
                next_local,
                ..
            } => {
                self.next_due = *next_due_at;
                if next_local.is_some() {
                    self.local = *next_local;
                }
            }
        }
    }
}

/// The instant of wall-clock `local` in `zone`: the earlier of an ambiguous
/// (fall-back) time, and for a time that does not exist (spring-forward gap)
/// the same time an hour later, as calendars do.
pub fn instant(zone: &str, local: NaiveDateTime) -> Option<DateTime<Utc>> {
    let tz: chrono_tz::Tz = zone.parse().ok()?;
    // Whole seconds: what a person schedules, and what every store keeps exactly.
    let local = local.with_nanosecond(0)?;
    match tz.from_local_datetime(&local) {
        LocalResult::Single(t) => Some(t.with_timezone(&Utc)),
        LocalResult::Ambiguous(a, _) => Some(a.with_timezone(&Utc)),
        LocalResult::None => match tz.from_local_datetime(&(local + Duration::hours(1))) {
            LocalResult::Single(t) | LocalResult::Ambiguous(t, _) => Some(t.with_timezone(&Utc)),
            LocalResult::None => None,
        },
    }
}

/// The first occurrence of a repeating reminder after `after`, counting from
/// the wall-clock time `local` (the occurrence just fired).
pub fn next_occurrence(
    zone: &str,
    local: NaiveDateTime,
    recurrence: Recurrence,
    after: DateTime<Utc>,
) -> Option<(NaiveDateTime, DateTime<Utc>)> {
    let step = match recurrence {
        Recurrence::None => return None,
        Recurrence::Daily => Duration::days(1),
        Recurrence::Weekly => Duration::weeks(1),
    };
    let mut l = local;
    // A scheduler that was down for long fires a missed occurrence once, then goes on.
    for _ in 0..10_000 {
        l += step;
        let at = instant(zone, l)?;
        if at > after {
            return Some((l, at));
        }
    }
    None
}

/// Commands of reminders and inboxes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum ReminderCommand {
    /// Set a reminder for the actor.
    SetReminder {
        /// New id.
        reminder_id: Uuid,
        /// Text.
        content: String,
        /// Wall-clock time of the first occurrence, in `zone`.
        local: NaiveDateTime,
        /// IANA zone.
        zone: String,
        /// Repeats.
        recurrence: Recurrence,
        /// Priority.
        priority: Priority,
        /// Post into this room instead.
        room_id: Option<Uuid>,
        /// The gateway's clock: the first occurrence must be after it.
        now: DateTime<Utc>,
    },
    /// Change content, time or priority (the owner).
    EditReminder {
        /// Reminder.
        reminder_id: Uuid,
        /// New text.
        content: Option<String>,
        /// New wall-clock time of the next occurrence.
        local: Option<NaiveDateTime>,
        /// New priority.
        priority: Option<Priority>,
        /// The gateway's clock.
        now: DateTime<Utc>,
    },
    /// Move the next occurrence later (the owner).
    SnoozeReminder {
        /// Reminder.
        reminder_id: Uuid,
        /// For how long from `now`, in seconds.
        for_secs: i64,
        /// The gateway's clock.
        now: DateTime<Utc>,
    },
    /// No more occurrences (the owner).
    CancelReminder {
        /// Reminder.
        reminder_id: Uuid,
    },
    /// Fire the occurrence due at `due_at` (the scheduler only).
    FireReminder {
        /// Reminder.
        reminder_id: Uuid,
        /// The occurrence.
        due_at: DateTime<Utc>,
        /// The scheduler's clock.
        now: DateTime<Utc>,
        /// Text, for the notification (the scheduler reads it from the read model).
        content: String,
        /// The owner, whose inbox the notification goes to (checked against the reminder).
        owner: Uuid,
    },
    /// Mark notifications of the actor's inbox read.
    MarkNotificationsRead {
        /// The reader: the actor.
        user: Uuid,
        /// Which; empty with `all`.
        ids: Vec<Uuid>,
        /// All of them.
        all: bool,
    },
}

fn not_found() -> Rejection {
    Rejection::new(404, "reminder_not_found", "no such reminder")
}

fn invalid(message: &str) -> Rejection {
    Rejection::new(422, "invalid", message)
}

impl ReminderCommand {
    /// The command's name.
    pub fn name(&self) -> &'static str {
        match self {
            ReminderCommand::SetReminder { .. } => "reminder.SetReminder",
            ReminderCommand::EditReminder { .. } => "reminder.EditReminder",
            ReminderCommand::SnoozeReminder { .. } => "reminder.SnoozeReminder",
            ReminderCommand::CancelReminder { .. } => "reminder.CancelReminder",
            ReminderCommand::FireReminder { .. } => "reminder.FireReminder",
            ReminderCommand::MarkNotificationsRead { .. } => "notify.MarkNotificationsRead",
        }
    }

    fn reminder_id(&self) -> Option<Uuid> {
        match self {
            ReminderCommand::SetReminder { reminder_id, .. }
            | ReminderCommand::EditReminder { reminder_id, .. }
            | ReminderCommand::SnoozeReminder { reminder_id, .. }
            | ReminderCommand::CancelReminder { reminder_id }
            | ReminderCommand::FireReminder { reminder_id, .. } => Some(*reminder_id),
            ReminderCommand::MarkNotificationsRead { .. } => None,
        }
    }

    /// The stream the command is addressed to.
    pub fn target(&self) -> StreamId {
        match (self, self.reminder_id()) {
            (ReminderCommand::MarkNotificationsRead { user, .. }, _) => inbox_stream(*user),
            (_, Some(id)) => reminder_stream(id),
            (_, None) => inbox_stream(Uuid::nil()),
        }
    }

    /// Every stream the decision reads or appends to.
    pub fn streams(&self) -> Vec<StreamId> {
        match self {
            ReminderCommand::FireReminder {
                reminder_id, owner, ..
            } => vec![reminder_stream(*reminder_id), inbox_stream(*owner)],
            _ => vec![self.target()],
        }
    }

    /// Decide against the loaded states.
    pub fn decide(&self, actor: &Actor, states: &StateSet) -> Result<Decision, Rejection> {
        let rs = self.target();
        let r = states.reminder(&rs);
        let mine = |r: &Reminder| r.exists && Some(r.owner) == actor.user_id;
        let decision =
            |events: Vec<(StreamId, Event)>, status: u16, answer: serde_json::Value| Decision {
                events,
                status,
                answer,
                keys: vec![],
            };
        let ev = |e: ReminderEvent| (rs.clone(), Event::Reminder(e));
        match self {
            ReminderCommand::SetReminder {
                reminder_id,
                content,
                local,
                zone,
                recurrence,
                priority,
                room_id,
                now,
            } => {
                let Some(owner) = actor.user_id else {
                    return Err(Rejection::new(
                        403,
                        "forbidden",
                        "reminders belong to people",
                    ));
                };
                if r.exists {
                    return Err(Rejection::new(
                        409,
                        "reminder_exists",
                        "this reminder id is taken",
                    ));
                }
                check_content(content)?;
                let local = &local.with_nanosecond(0).unwrap_or(*local);
                let due_at = instant(zone, *local).ok_or_else(|| {
                    invalid("zone is not an IANA time zone (e.g. Africa/Nairobi)")
                })?;
                if due_at <= *now {
                    return Err(invalid("the reminder's time has passed"));
                }
                Ok(decision(
                    vec![ev(ReminderEvent::ReminderSet {
                        reminder_id: *reminder_id,
                        owner,
                        content: content.clone(),
                        due_at,
                        local: *local,
                        zone: zone.clone(),
                        recurrence: *recurrence,
                        priority: *priority,
                        room_id: *room_id,
                    })],
                    201,
                    json!({
                        "reminder_id": reminder_id, "due_at": due_at, "local": local, "zone": zone,
                        "recurrence": recurrence, "priority": priority, "room_id": room_id,
                    }),
                ))
            }
            ReminderCommand::EditReminder {
                reminder_id,
                content,
                local,
                priority,
                now,
            } => {
                if !mine(&r) {
                    return Err(not_found());
                }
                if r.next_due.is_none() {
                    return Err(Rejection::new(
                        409,
                        "reminder_done",
                        "this reminder will not ring again",
                    ));
                }
                if let Some(c) = content {
                    check_content(c)?;
                }
                let due_at = match local {
                    None => None,
                    Some(l) => {
                        let at =
                            instant(&r.zone, *l).ok_or_else(|| invalid("no such local time"))?;
                        if at <= *now {
                            return Err(invalid("the reminder's time has passed"));
                        }
                        Some(at)
                    }
                };
                if content.is_none() && local.is_none() && priority.is_none() {
                    return Err(invalid("change the content, the time or the priority"));
                }
                Ok(decision(
                    vec![ev(ReminderEvent::ReminderEdited {
                        content: content.clone(),
                        due_at,
                        local: *local,
                        priority: *priority,
                    })],
                    200,
                    json!({ "reminder_id": reminder_id, "due_at": due_at.or(r.next_due) }),
                ))
            }
            ReminderCommand::SnoozeReminder {
                reminder_id,
                for_secs,
                now,
            } => {
                if !mine(&r) {
                    return Err(not_found());
                }
                if r.next_due.is_none() {
                    return Err(Rejection::new(
                        409,
                        "reminder_done",
                        "this reminder will not ring again",
                    ));
                }
                if !(60..=7 * 86_400).contains(for_secs) {
                    return Err(invalid("snooze for 1 minute to 7 days"));
                }
                let due_at = (*now + Duration::seconds(*for_secs))
                    .with_nanosecond(0)
                    .unwrap_or(*now);
                Ok(decision(
                    vec![ev(ReminderEvent::ReminderSnoozed { due_at })],
                    200,
                    json!({ "reminder_id": reminder_id, "due_at": due_at }),
                ))
            }
            ReminderCommand::CancelReminder { reminder_id } => {
                if !mine(&r) {
                    return Err(not_found());
                }
                if r.cancelled {
                    return Err(Rejection::new(
                        409,
                        "reminder_cancelled",
                        "already cancelled",
                    ));
                }
                Ok(decision(
                    vec![ev(ReminderEvent::ReminderCancelled)],
                    200,
                    json!({ "reminder_id": reminder_id, "cancelled": true }),
                ))
            }
            ReminderCommand::FireReminder {
                reminder_id,
                due_at,
                now,
                content,
                owner,
            } => {
                if actor.role != Role::System {
                    return Err(Rejection::new(
                        403,
                        "forbidden",
                        "only the scheduler fires reminders",
                    ));
                }
                if !r.exists || r.next_due != Some(*due_at) || r.owner != *owner {
                    return Err(Rejection::new(
                        409,
                        "not_due",
                        "this occurrence is not the next one",
                    ));
                }
                let next = match (r.local, r.recurrence) {
                    (Some(l), Some(rec)) => next_occurrence(&r.zone, l, rec, (*now).max(*due_at)),
                    _ => None,
                };
                let notification_id = occurrence_notification(*reminder_id, *due_at);
                Ok(decision(
                    vec![
                        ev(ReminderEvent::ReminderFired {
                            due_at: *due_at,
                            fired_at: *now,
                            next_due_at: next.map(|(_, at)| at),
                            next_local: next.map(|(l, _)| l),
                        }),
                        (
                            inbox_stream(r.owner),
                            Event::Notify(NotifyEvent::NotificationCreated {
                                notification_id,
                                category: Category::Task,
                                title: content.clone(),
                                body: None,
                                link: Some(format!("reminder:{reminder_id}")),
                            }),
                        ),
                    ],
                    200,
                    json!({
                        "reminder_id": reminder_id, "fired": due_at, "next_due_at": next.map(|(_, at)| at),
                        "notification_id": notification_id,
                    }),
                ))
            }
            ReminderCommand::MarkNotificationsRead { user, ids, all } => {
                if actor.user_id != Some(*user) {
                    return Err(Rejection::new(
                        403,
                        "forbidden",
                        "only your own notifications",
                    ));
                }
                if ids.is_empty() != *all {
                    return Err(invalid("name notifications, or say all"));
                }
                Ok(decision(
                    vec![(
                        inbox_stream(*user),
                        Event::Notify(NotifyEvent::NotificationsRead {
                            ids: ids.clone(),
                            all: *all,
                        }),
                    )],
                    200,
                    json!({ "read": if *all { json!("all") } else { json!(ids) } }),
                ))
            }
        }
    }
}

fn check_content(c: &str) -> Result<(), Rejection> {
    if c.trim().is_empty() || c.chars().count() > MAX_CONTENT || c.contains('\0') {
        return Err(invalid("content is 1 to 500 characters, without NUL"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::NaiveDate;

    fn local(y: i32, m: u32, d: u32, h: u32, min: u32) -> NaiveDateTime {
        NaiveDate::from_ymd_opt(y, m, d)
            .unwrap()
            .and_hms_opt(h, min, 0)
            .unwrap()
    }

    #[test]
    fn a_daily_reminder_keeps_its_local_time_across_daylight_saving() {
        // Europe/London moves to BST on 2026-03-29: 08:00 is 08:00 UTC before, 07:00 UTC after.
        let l = local(2026, 3, 28, 8, 0);
        let first = instant("Europe/London", l).unwrap();
        assert_eq!(first.to_rfc3339(), "2026-03-28T08:00:00+00:00");
        let (l2, second) = next_occurrence("Europe/London", l, Recurrence::Daily, first).unwrap();
        assert_eq!(l2, local(2026, 3, 29, 8, 0));
        assert_eq!(second.to_rfc3339(), "2026-03-29T07:00:00+00:00");
        // A time in the spring-forward gap rings an hour later; an ambiguous one, the first time.
        assert_eq!(
            instant("Europe/London", local(2026, 3, 29, 1, 30))
                .unwrap()
                .to_rfc3339(),
            "2026-03-29T01:30:00+00:00"
        );
        assert_eq!(
            instant("Europe/London", local(2026, 10, 25, 1, 30))
                .unwrap()
                .to_rfc3339(),
            "2026-10-25T00:30:00+00:00"
        );
        assert!(instant("Mars/Olympus", l).is_none());
        // Missed occurrences are not all fired: the next one is after `after`.
        let (_, later) =
            next_occurrence("UTC", l, Recurrence::Weekly, first + Duration::days(20)).unwrap();
        assert_eq!(later.to_rfc3339(), "2026-04-18T08:00:00+00:00");
        assert!(next_occurrence("UTC", l, Recurrence::None, first).is_none());
    }
}
