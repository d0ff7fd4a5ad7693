//! Reminders: one stream per reminder, `reminder.reminder.<id>`.
//!
//! A reminder is due at an instant (UTC) and remembers the wall-clock time and
//! IANA zone it was set in, so a daily or weekly one keeps its local time
//! across daylight-saving changes. Firing is a command from the scheduler
//! (`ReminderFired` names the occurrence it fired, so a second scheduler or a
//! restart cannot fire it twice).

use chrono::{DateTime, NaiveDateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The domain token of reminder streams and subjects.
pub const DOMAIN: &str = "reminder";
/// The aggregate token.
pub const REMINDER: &str = "reminder";

/// How a reminder repeats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Recurrence {
    /// Once.
    None,
    /// Every day at the same local time.
    Daily,
    /// Every week on the same weekday and local time.
    Weekly,
}

/// How loudly it rings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    /// Quietly.
    Low,
    /// The default.
    Normal,
    /// Loudly.
    High,
}

/// Events of one reminder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum ReminderEvent {
    /// A reminder exists.
    ReminderSet {
        /// Reminder id (= stream id).
        reminder_id: Uuid,
        /// Whose.
        owner: Uuid,
        /// What to remind of.
        content: String,
        /// The first occurrence.
        due_at: DateTime<Utc>,
        /// The wall-clock time of the occurrences, in `zone`.
        local: NaiveDateTime,
        /// IANA zone.
        zone: String,
        /// Repeats.
        recurrence: Recurrence,
        /// Priority.
        priority: Priority,
        /// Post it into this room (the owner must be a member) instead of notifying the owner only.
        room_id: Option<Uuid>,
    },
    /// Content, time or priority changed.
    ReminderEdited {
        /// New content.
        content: Option<String>,
        /// New next occurrence.
        due_at: Option<DateTime<Utc>>,
        /// Its wall-clock time.
        local: Option<NaiveDateTime>,
        /// New priority.
        priority: Option<Priority>,
    },
    /// The next occurrence moved later.
    ReminderSnoozed {
        /// The new next occurrence.
        due_at: DateTime<Utc>,
    },
    /// No more occurrences.
    ReminderCancelled,
    /// An occurrence fired.
    ReminderFired {
        /// The occurrence (its due time).
        due_at: DateTime<Utc>,
        /// When the scheduler fired it.
        fired_at: DateTime<Utc>,
        /// The next occurrence of a recurring reminder.
        next_due_at: Option<DateTime<Utc>>,
        /// Its wall-clock time in the reminder's zone.
        next_local: Option<NaiveDateTime>,
    },
}

impl ReminderEvent {
    /// The event type name.
    pub fn event_type(&self) -> &'static str {
        match self {
            ReminderEvent::ReminderSet { .. } => "ReminderSet",
            ReminderEvent::ReminderEdited { .. } => "ReminderEdited",
            ReminderEvent::ReminderSnoozed { .. } => "ReminderSnoozed",
            ReminderEvent::ReminderCancelled => "ReminderCancelled",
            ReminderEvent::ReminderFired { .. } => "ReminderFired",
        }
    }
}
