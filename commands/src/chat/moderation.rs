//! Moderation (flags, reports, mutes) and room notes: the room-stream commands
//! that are not about membership or messages themselves.
//!
//! Only the classifier's flags count as strikes: the flag that makes
//! `mute_after` strikes mutes the sender in that room, and the mute resets the
//! count. A member's report waits for a moderator and never mutes on its own,
//! so three friends cannot silence someone. A moderator who clears a flag takes
//! its strike back.

use chrono::Duration;
use events::chat::{ChatEvent, FlagSource, MemberRole};
use serde_json::json;

use super::{
    ChatCommand, REPORT_REASONS, Room, archived, decision, forbidden, note_not_found,
    room_not_found, room_stream,
};
use crate::{Actor, Decision, KeyOp, Rejection, Role, StateSet};

impl ChatCommand {
    /// Decide a moderation or note command against `room` (already loaded).
    pub(super) fn decide_moderation(
        &self,
        actor: &Actor,
        states: &StateSet,
        room: &Room,
    ) -> Result<Decision, Rejection> {
        let me = actor.user_id;
        let my_role = room.role_of(me);
        let member = || my_role.ok_or_else(room_not_found);
        let moderator = |what: &str| match member()? {
            r if r >= MemberRole::Moderator => Ok(r),
            _ => Err(forbidden(what)),
        };
        match self {
            ChatCommand::FlagMessage {
                room_id,
                message_id,
                label,
                score,
                mute_after,
                mute_for_secs,
                at,
            } => {
                if actor.role != Role::System {
                    return Err(forbidden("flag messages as the classifier"));
                }
                if !room.exists || room.deleted {
                    return Err(room_not_found());
                }
                let m = self.live_message(states, *room_id, *message_id)?;
                if room.flags.get(message_id).is_some_and(|f| f.classifier) {
                    return Err(Rejection::new(
                        409,
                        "already_flagged",
                        "the classifier already flagged this message",
                    ));
                }
                let strikes = room.strikes.get(&m.sender).copied().unwrap_or(0) + 1;
                let rs = room_stream(*room_id);
                let mut events = vec![(
                    rs.clone(),
                    ChatEvent::MessageFlagged {
                        message_id: *message_id,
                        sender: m.sender,
                        source: FlagSource::Classifier,
                        reason: label.clone(),
                        score: Some(*score),
                        by: None,
                    },
                )];
                let mut muted_until = None;
                if *mute_after > 0 && strikes >= *mute_after {
                    let until = *at + Duration::seconds(*mute_for_secs);
                    muted_until = Some(until);
                    events.push((
                        rs,
                        ChatEvent::MemberMuted {
                            user_id: m.sender,
                            until,
                            by: None,
                            reason: "flags".into(),
                        },
                    ));
                }
                Ok(decision(
                    events,
                    201,
                    json!({
                        "room_id": room_id, "message_id": message_id, "sender": m.sender,
                        "strikes": strikes, "muted_until": muted_until,
                    }),
                    vec![],
                ))
            }
            ChatCommand::ReportMessage {
                room_id,
                message_id,
                reason,
            } => {
                member()?;
                let me = me.unwrap_or_default();
                let m = self.live_message(states, *room_id, *message_id)?;
                if !REPORT_REASONS.contains(&reason.as_str()) {
                    return Err(Rejection::new(
                        422,
                        "invalid",
                        format!("reason must be one of {}", REPORT_REASONS.join(", ")),
                    ));
                }
                if m.sender == me {
                    return Err(Rejection::new(
                        422,
                        "own_message",
                        "you cannot report your own message; redact it instead",
                    ));
                }
                if room
                    .flags
                    .get(message_id)
                    .is_some_and(|f| f.reporters.contains(&me))
                {
                    return Err(Rejection::new(
                        409,
                        "already_reported",
                        "you already reported this message",
                    ));
                }
                Ok(decision(
                    vec![(
                        room_stream(*room_id),
                        ChatEvent::MessageFlagged {
                            message_id: *message_id,
                            sender: m.sender,
                            source: FlagSource::Report,
                            reason: reason.clone(),
                            score: None,
                            by: Some(me),
                        },
                    )],
                    201,
                    json!({ "room_id": room_id, "message_id": message_id, "reported": true }),
                    vec![],
                ))
            }
            ChatCommand::ClearFlag {
                room_id,
                message_id,
            } => {
                moderator("review flagged messages")?;
                if !room.flags.contains_key(message_id) {
                    return Err(Rejection::new(
                        404,
                        "flag_not_found",
                        "this message has no open flag",
                    ));
                }
                Ok(decision(
                    vec![(
                        room_stream(*room_id),
                        ChatEvent::FlagCleared {
                            message_id: *message_id,
                            by: me.unwrap_or_default(),
                        },
                    )],
                    200,
                    json!({ "room_id": room_id, "message_id": message_id, "cleared": true }),
                    vec![],
                ))
            }
            ChatCommand::Mute {
                room_id,
                user_id,
                until,
                at,
            } => {
                let role = moderator("mute members")?;
                let Some(target) = room.members.get(user_id) else {
                    return Err(Rejection::new(
                        404,
                        "member_not_found",
                        "this user is not a member",
                    ));
                };
                if *target >= role {
                    return Err(forbidden("mute a member of equal or higher role"));
                }
                if until <= at {
                    return Err(Rejection::new(
                        422,
                        "invalid",
                        "until must be in the future",
                    ));
                }
                Ok(decision(
                    vec![(
                        room_stream(*room_id),
                        ChatEvent::MemberMuted {
                            user_id: *user_id,
                            until: *until,
                            by: me,
                            reason: "moderator".into(),
                        },
                    )],
                    200,
                    json!({ "room_id": room_id, "user_id": user_id, "muted_until": until }),
                    vec![],
                ))
            }
            ChatCommand::Unmute { room_id, user_id } => {
                moderator("lift mutes")?;
                if !room.muted.contains_key(user_id) {
                    return Err(Rejection::new(404, "not_muted", "this user is not muted"));
                }
                Ok(decision(
                    vec![(
                        room_stream(*room_id),
                        ChatEvent::MemberUnmuted {
                            user_id: *user_id,
                            by: me.unwrap_or_default(),
                        },
                    )],
                    200,
                    json!({ "room_id": room_id, "user_id": user_id, "muted_until": null }),
                    vec![],
                ))
            }
            ChatCommand::PinNote {
                room_id,
                note_id,
                priority,
                body,
                key_version,
                note_key,
            } => {
                member()?;
                if room.archived {
                    return Err(archived());
                }
                if room.notes.contains_key(note_id) {
                    return Err(Rejection::new(409, "note_exists", "this note id is taken"));
                }
                if *key_version != room.key_version {
                    return Err(Rejection::new(
                        409,
                        "key_version_conflict",
                        "the room key was rotated meanwhile; pin again",
                    ));
                }
                let author = me.unwrap_or_default();
                Ok(decision(
                    vec![(
                        room_stream(*room_id),
                        ChatEvent::NotePinned {
                            note_id: *note_id,
                            author,
                            priority: *priority,
                            body: body.clone(),
                            key_version: *key_version,
                        },
                    )],
                    201,
                    json!({ "room_id": room_id, "note_id": note_id, "author": author, "priority": priority }),
                    // A note key is kept like a message key: by item id, wrapped by the room key.
                    vec![KeyOp::PutMessageKey {
                        message_id: *note_id,
                        room_id: *room_id,
                        key_version: *key_version,
                        wrapped: note_key.clone(),
                    }],
                ))
            }
            ChatCommand::EditNote {
                room_id,
                note_id,
                body,
                priority,
            } => {
                let role = member()?;
                let author = *room.notes.get(note_id).ok_or_else(note_not_found)?;
                if Some(author) != me && role < MemberRole::Moderator {
                    return Err(forbidden("edit someone else's note"));
                }
                if room.archived {
                    return Err(archived());
                }
                if body.is_none() && priority.is_none() {
                    return Err(Rejection::new(
                        422,
                        "invalid",
                        "change the body, the priority or both",
                    ));
                }
                Ok(decision(
                    vec![(
                        room_stream(*room_id),
                        ChatEvent::NoteEdited {
                            note_id: *note_id,
                            body: body.clone(),
                            priority: *priority,
                            by: me.unwrap_or_default(),
                        },
                    )],
                    200,
                    json!({ "room_id": room_id, "note_id": note_id, "edited": true }),
                    vec![],
                ))
            }
            ChatCommand::UnpinNote { room_id, note_id } => {
                let role = member()?;
                let author = *room.notes.get(note_id).ok_or_else(note_not_found)?;
                if Some(author) != me && role < MemberRole::Moderator {
                    return Err(forbidden("unpin someone else's note"));
                }
                Ok(decision(
                    vec![(
                        room_stream(*room_id),
                        ChatEvent::NoteUnpinned {
                            note_id: *note_id,
                            by: me.unwrap_or_default(),
                        },
                    )],
                    200,
                    json!({ "room_id": room_id, "note_id": note_id, "unpinned": true }),
                    vec![KeyOp::DestroyMessageKey {
                        message_id: *note_id,
                    }],
                ))
            }
            // decide() routes only the commands above here.
            _ => Err(Rejection::new(500, "internal", "not a moderation command")),
        }
    }
}
