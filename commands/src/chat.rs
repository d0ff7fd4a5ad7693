//! Chat: rooms (membership, roles, keys) and messages (posts, edits, redactions,
//! reactions, receipts), as pure decide/evolve.
//!
//! Existence is private: whoever is not a member (nor invited, for the calls an
//! invitee may make) gets `room_not_found`, exactly as for a room that never
//! existed. The sender of a message is always the actor, never the payload.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use events::chat::{
    Attachment, Bytes64, ChatEvent, DOMAIN, FlagSource, MESSAGE, MemberRole, MessageKind,
    NotePriority, READER, ROOM, Sealed, Visibility,
};
use events::{Event, StreamId};
use serde::{Deserialize, Serialize};
use serde_json::json;
use uuid::Uuid;

use crate::{Actor, Decision, KeyOp, Rejection, StateSet};

mod moderation;

/// The stream of room `id`.
pub fn room_stream(id: Uuid) -> StreamId {
    StreamId::new(DOMAIN, ROOM, &id.to_string()).expect("a uuid is a valid subject token")
}

/// The stream of message `id`.
pub fn message_stream(id: Uuid) -> StreamId {
    StreamId::new(DOMAIN, MESSAGE, &id.to_string()).expect("a uuid is a valid subject token")
}

/// The receipts stream of reader `user`.
pub fn reader_stream(user: Uuid) -> StreamId {
    StreamId::new(DOMAIN, READER, &user.to_string()).expect("a uuid is a valid subject token")
}

const MESSAGE_NS: Uuid = Uuid::from_u128(0x6d61_7468_6961_5f63_6861_745f_6d73_6700);

/// The message id of a send with a client transaction id: the same sender,
/// room and id always name the same message (Matrix `txnId` semantics).
pub fn client_message_id(room: Uuid, sender: Uuid, client_id: &str) -> Uuid {
    Uuid::new_v5(
        &MESSAGE_NS,
        format!("{room}|{sender}|{client_id}").as_bytes(),
    )
}

/// The state of a room.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Room {
    /// `RoomCreated` happened.
    pub exists: bool,
    /// `RoomDeleted` happened.
    pub deleted: bool,
    /// Read-only.
    pub archived: bool,
    /// Private or public.
    pub visibility: Option<Visibility>,
    /// Joined members and their roles.
    pub members: BTreeMap<Uuid, MemberRole>,
    /// Pending invitations.
    pub invited: BTreeSet<Uuid>,
    /// Pending invitations of addresses.
    pub email_invites: BTreeSet<String>,
    /// Banned users.
    pub banned: BTreeSet<Uuid>,
    /// Current data key version.
    pub key_version: i32,
    /// Flagged messages still open for review.
    #[serde(default)]
    pub flags: BTreeMap<Uuid, Flag>,
    /// Per sender: classifier flags since their last mute (a cleared flag no longer counts).
    #[serde(default)]
    pub strikes: BTreeMap<Uuid, u32>,
    /// Muted members and the end of their mute.
    #[serde(default)]
    pub muted: BTreeMap<Uuid, DateTime<Utc>>,
    /// Pinned notes and their authors.
    #[serde(default)]
    pub notes: BTreeMap<Uuid, Uuid>,
}

/// A message's open flags.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flag {
    /// The message's sender.
    pub sender: Uuid,
    /// The classifier flagged it (and it counted as a strike).
    pub classifier: bool,
    /// Members who reported it.
    pub reporters: BTreeSet<Uuid>,
}

impl Room {
    /// Fold one event in.
    pub fn evolve(&mut self, event: &ChatEvent) {
        match event {
            ChatEvent::RoomCreated {
                visibility,
                created_by,
                ..
            } => {
                self.exists = true;
                self.visibility = Some(*visibility);
                self.key_version = 1;
                self.members.insert(*created_by, MemberRole::Owner);
            }
            ChatEvent::RoomArchived => self.archived = true,
            ChatEvent::RoomDeleted => self.deleted = true,
            ChatEvent::RoomKeyRotated { version } => self.key_version = *version,
            ChatEvent::MemberInvited { user_id, .. } => {
                self.invited.insert(*user_id);
            }
            ChatEvent::EmailInvited { email, .. } => {
                self.email_invites.insert(email.clone());
            }
            ChatEvent::InviteDeclined { user_id } => {
                self.invited.remove(user_id);
            }
            ChatEvent::MemberJoined {
                user_id,
                role,
                via_email,
            } => {
                self.invited.remove(user_id);
                if let Some(e) = via_email {
                    self.email_invites.remove(e);
                }
                self.members.insert(*user_id, *role);
            }
            ChatEvent::MemberLeft { user_id } | ChatEvent::MemberKicked { user_id, .. } => {
                self.members.remove(user_id);
            }
            ChatEvent::MemberBanned { user_id, .. } => {
                self.members.remove(user_id);
                self.invited.remove(user_id);
                self.banned.insert(*user_id);
            }
            ChatEvent::MemberUnbanned { user_id } => {
                self.banned.remove(user_id);
            }
            ChatEvent::MemberRoleChanged { user_id, role } => {
                if let Some(r) = self.members.get_mut(user_id) {
                    *r = *role;
                }
            }
            ChatEvent::MessageFlagged {
                message_id,
                sender,
                source,
                by,
                ..
            } => {
                let flag = self.flags.entry(*message_id).or_insert_with(|| Flag {
                    sender: *sender,
                    ..Flag::default()
                });
                match source {
                    FlagSource::Classifier => {
                        flag.classifier = true;
                        *self.strikes.entry(*sender).or_default() += 1;
                    }
                    FlagSource::Report => {
                        flag.reporters.extend(*by);
                    }
                }
            }
            ChatEvent::FlagCleared { message_id, .. } => {
                if let Some(flag) = self.flags.remove(message_id)
                    && flag.classifier
                    && let Some(n) = self.strikes.get_mut(&flag.sender)
                {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        self.strikes.remove(&flag.sender);
                    }
                }
            }
            ChatEvent::MemberMuted { user_id, until, .. } => {
                self.muted.insert(*user_id, *until);
                self.strikes.remove(user_id);
            }
            ChatEvent::MemberUnmuted { user_id, .. } => {
                self.muted.remove(user_id);
            }
            ChatEvent::NotePinned {
                note_id, author, ..
            } => {
                self.notes.insert(*note_id, *author);
            }
            ChatEvent::NoteUnpinned { note_id, .. } => {
                self.notes.remove(note_id);
            }
            _ => {}
        }
    }

    /// The end of `user`'s mute, if it is still running at `now`.
    pub fn muted_until(&self, user: Uuid, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.muted.get(&user).copied().filter(|until| *until > now)
    }

    fn live(&self) -> bool {
        self.exists && !self.deleted
    }

    /// The actor's role, if a member of a live room.
    pub fn role_of(&self, user: Option<Uuid>) -> Option<MemberRole> {
        if !self.live() {
            return None;
        }
        user.and_then(|u| self.members.get(&u).copied())
    }

    fn owners(&self) -> usize {
        self.members
            .values()
            .filter(|r| **r == MemberRole::Owner)
            .count()
    }
}

/// The state of a message.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `MessagePosted` happened.
    pub exists: bool,
    /// Its room.
    pub room_id: Uuid,
    /// Its sender.
    pub sender: Uuid,
    /// Its thread root, for a reply.
    pub thread_root: Option<Uuid>,
    /// Redacted: nothing left to edit or react to.
    pub redacted: bool,
    /// (user, emoji) pairs.
    pub reactions: BTreeSet<(Uuid, String)>,
    /// The client transaction id it was sent with.
    pub client_message_id: Option<String>,
}

impl Message {
    /// Fold one event in.
    pub fn evolve(&mut self, event: &ChatEvent) {
        match event {
            ChatEvent::MessagePosted {
                room_id,
                sender,
                thread_root,
                client_message_id,
                ..
            } => {
                self.exists = true;
                self.room_id = *room_id;
                self.sender = *sender;
                self.thread_root = *thread_root;
                self.client_message_id = client_message_id.clone();
            }
            ChatEvent::MessageRedacted { .. } => {
                self.redacted = true;
                self.reactions.clear();
            }
            ChatEvent::ReactionAdded { user_id, emoji } => {
                self.reactions.insert((*user_id, emoji.clone()));
            }
            ChatEvent::ReactionRemoved { user_id, emoji } => {
                self.reactions.remove(&(*user_id, emoji.clone()));
            }
            _ => {}
        }
    }
}

/// Commands of the chat domain. Bodies arrive sealed: the gateway encrypts
/// before it publishes, so `COMMANDS` never holds plaintext either.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type")]
// Short-lived values, (de)serialised at once; boxing the big variants would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum ChatCommand {
    /// Create a room; the actor becomes its owner.
    CreateRoom {
        /// New room id.
        room_id: Uuid,
        /// Name.
        name: String,
        /// Topic.
        topic: Option<String>,
        /// Private or public.
        visibility: Visibility,
        /// The first data key, wrapped by the master key.
        room_key: Bytes64,
    },
    /// Rename and/or change the topic (moderators).
    UpdateRoom {
        /// Room.
        room_id: Uuid,
        /// New name.
        name: Option<String>,
        /// New topic ("" clears).
        topic: Option<String>,
    },
    /// Make the room read-only (owner).
    ArchiveRoom {
        /// Room.
        room_id: Uuid,
    },
    /// Delete the room and destroy its keys (owner).
    DeleteRoom {
        /// Room.
        room_id: Uuid,
    },
    /// Seal new messages under a new key version (owner).
    RotateRoomKey {
        /// Room.
        room_id: Uuid,
        /// The version it will have (current + 1).
        version: i32,
        /// The new key, wrapped by the master key.
        room_key: Bytes64,
    },
    /// Invite a user, or an address that has no account yet.
    Invite {
        /// Room.
        room_id: Uuid,
        /// The user invited.
        user_id: Option<Uuid>,
        /// Or the address (lower case).
        email: Option<String>,
    },
    /// Decline an invitation.
    DeclineInvite {
        /// Room.
        room_id: Uuid,
    },
    /// Join a public room, or accept an invitation (to the actor, or to their address).
    Join {
        /// Room.
        room_id: Uuid,
        /// The actor's address, filled in by the gateway from the account.
        email: Option<String>,
    },
    /// Leave a room.
    Leave {
        /// Room.
        room_id: Uuid,
    },
    /// Remove a member (moderators, over lower roles).
    Kick {
        /// Room.
        room_id: Uuid,
        /// Who.
        user_id: Uuid,
    },
    /// Ban a user (moderators, over lower roles).
    Ban {
        /// Room.
        room_id: Uuid,
        /// Who.
        user_id: Uuid,
    },
    /// Lift a ban (moderators).
    Unban {
        /// Room.
        room_id: Uuid,
        /// Who.
        user_id: Uuid,
    },
    /// Change a member's role (owner).
    SetRole {
        /// Room.
        room_id: Uuid,
        /// Who.
        user_id: Uuid,
        /// The new role.
        role: MemberRole,
    },
    /// Post a message.
    SendMessage {
        /// Message id.
        message_id: Uuid,
        /// Room.
        room_id: Uuid,
        /// Kind.
        kind: MessageKind,
        /// Sealed body.
        body: Sealed,
        /// Attachment metadata.
        attachment: Option<Attachment>,
        /// Thread root, for a reply.
        thread_root: Option<Uuid>,
        /// Quoted message.
        quote: Option<Uuid>,
        /// Mentioned users.
        mentions: Vec<Uuid>,
        /// `@mathia` mentioned.
        mentions_assistant: bool,
        /// Client transaction id.
        client_message_id: Option<String>,
        /// Room key version wrapping `message_key`.
        key_version: i32,
        /// The message key, wrapped by the room key.
        message_key: Bytes64,
        /// When the gateway accepted it.
        sent_at: DateTime<Utc>,
    },
    /// Replace a message's body (its sender).
    EditMessage {
        /// Room.
        room_id: Uuid,
        /// Message.
        message_id: Uuid,
        /// New sealed body, under the message's key.
        body: Sealed,
    },
    /// Redact a message: destroy its key (sender or moderators).
    RedactMessage {
        /// Room.
        room_id: Uuid,
        /// Message.
        message_id: Uuid,
    },
    /// Add or remove a reaction.
    React {
        /// Room.
        room_id: Uuid,
        /// Message.
        message_id: Uuid,
        /// Emoji.
        emoji: String,
        /// Add (true) or remove.
        add: bool,
    },
    /// Move the actor's read receipt.
    MarkRead {
        /// The reader: the actor.
        reader: Uuid,
        /// Room.
        room_id: Uuid,
        /// Thread, none for the main timeline.
        thread_root: Option<Uuid>,
        /// Last message read.
        message_id: Uuid,
    },
    /// The screening classifier flags a message (the system only).
    FlagMessage {
        /// Room.
        room_id: Uuid,
        /// Message.
        message_id: Uuid,
        /// The category.
        label: String,
        /// Confidence in thousandths.
        score: u16,
        /// Mute the sender when this flag makes that many strikes (0: never).
        mute_after: u32,
        /// For how long, in seconds.
        mute_for_secs: i64,
        /// When the classifier decided.
        at: DateTime<Utc>,
    },
    /// A member reports someone else's message to the moderators.
    ReportMessage {
        /// Room.
        room_id: Uuid,
        /// Message.
        message_id: Uuid,
        /// Why (one of the report reasons).
        reason: String,
    },
    /// A moderator clears every flag of a message after review.
    ClearFlag {
        /// Room.
        room_id: Uuid,
        /// Message.
        message_id: Uuid,
    },
    /// A moderator mutes a member until a time.
    Mute {
        /// Room.
        room_id: Uuid,
        /// Who.
        user_id: Uuid,
        /// Until when.
        until: DateTime<Utc>,
        /// When the moderator asked (the gateway's clock).
        at: DateTime<Utc>,
    },
    /// A moderator lifts a mute.
    Unmute {
        /// Room.
        room_id: Uuid,
        /// Who.
        user_id: Uuid,
    },
    /// Pin a note to the room (any member).
    PinNote {
        /// Room.
        room_id: Uuid,
        /// New note id.
        note_id: Uuid,
        /// Priority.
        priority: NotePriority,
        /// The text, sealed under the note key.
        body: Sealed,
        /// Room key version wrapping `note_key`.
        key_version: i32,
        /// The note key, wrapped by the room key.
        note_key: Bytes64,
    },
    /// Change a note's text or priority (its author, or a moderator).
    EditNote {
        /// Room.
        room_id: Uuid,
        /// Note.
        note_id: Uuid,
        /// New sealed text.
        body: Option<Sealed>,
        /// New priority.
        priority: Option<NotePriority>,
    },
    /// Unpin a note and destroy its key (its author, or a moderator).
    UnpinNote {
        /// Room.
        room_id: Uuid,
        /// Note.
        note_id: Uuid,
    },
    /// The @mathia assistant answers a message (the system only).
    AssistantReply {
        /// Room.
        room_id: Uuid,
        /// New message id.
        message_id: Uuid,
        /// The request it answers (quoted).
        in_reply_to: Uuid,
        /// Sealed text.
        body: Sealed,
        /// Room key version wrapping `message_key`.
        key_version: i32,
        /// The message key, wrapped by the room key.
        message_key: Bytes64,
        /// When.
        sent_at: DateTime<Utc>,
    },
}

/// The sender of the assistant's messages.
pub const ASSISTANT: Uuid = Uuid::from_u128(0x6d61_7468_6961_0000_0000_0000_0000_0001);

/// The reasons a member may give when reporting a message.
pub const REPORT_REASONS: [&str; 7] = [
    "spam",
    "harassment",
    "hate",
    "violence",
    "sexual",
    "self_harm",
    "other",
];

fn note_not_found() -> Rejection {
    Rejection::new(404, "note_not_found", "no such note in this room")
}

fn room_not_found() -> Rejection {
    Rejection::new(404, "room_not_found", "no such room")
}

fn message_not_found() -> Rejection {
    Rejection::new(404, "message_not_found", "no such message in this room")
}

fn forbidden(what: &str) -> Rejection {
    Rejection::new(
        403,
        "forbidden",
        format!("your role in this room cannot {what}"),
    )
}

fn muted(until: DateTime<Utc>) -> Rejection {
    Rejection::new(
        403,
        "muted",
        format!("you are muted in this room until {}", until.to_rfc3339()),
    )
    .with_details(json!({ "muted_until": until }))
}

fn archived() -> Rejection {
    Rejection::new(
        409,
        "room_archived",
        "the room is archived: it is read-only",
    )
}

fn decision(
    events: Vec<(StreamId, ChatEvent)>,
    status: u16,
    answer: serde_json::Value,
    keys: Vec<KeyOp>,
) -> Decision {
    Decision {
        events: events
            .into_iter()
            .map(|(s, e)| (s, Event::Chat(e)))
            .collect(),
        status,
        answer,
        keys,
    }
}

impl ChatCommand {
    /// The command's name.
    pub fn name(&self) -> &'static str {
        match self {
            ChatCommand::CreateRoom { .. } => "chat.CreateRoom",
            ChatCommand::UpdateRoom { .. } => "chat.UpdateRoom",
            ChatCommand::ArchiveRoom { .. } => "chat.ArchiveRoom",
            ChatCommand::DeleteRoom { .. } => "chat.DeleteRoom",
            ChatCommand::RotateRoomKey { .. } => "chat.RotateRoomKey",
            ChatCommand::Invite { .. } => "chat.Invite",
            ChatCommand::DeclineInvite { .. } => "chat.DeclineInvite",
            ChatCommand::Join { .. } => "chat.Join",
            ChatCommand::Leave { .. } => "chat.Leave",
            ChatCommand::Kick { .. } => "chat.Kick",
            ChatCommand::Ban { .. } => "chat.Ban",
            ChatCommand::Unban { .. } => "chat.Unban",
            ChatCommand::SetRole { .. } => "chat.SetRole",
            ChatCommand::SendMessage { .. } => "chat.SendMessage",
            ChatCommand::EditMessage { .. } => "chat.EditMessage",
            ChatCommand::RedactMessage { .. } => "chat.RedactMessage",
            ChatCommand::React { .. } => "chat.React",
            ChatCommand::MarkRead { .. } => "chat.MarkRead",
            ChatCommand::FlagMessage { .. } => "chat.FlagMessage",
            ChatCommand::ReportMessage { .. } => "chat.ReportMessage",
            ChatCommand::ClearFlag { .. } => "chat.ClearFlag",
            ChatCommand::Mute { .. } => "chat.Mute",
            ChatCommand::Unmute { .. } => "chat.Unmute",
            ChatCommand::PinNote { .. } => "chat.PinNote",
            ChatCommand::EditNote { .. } => "chat.EditNote",
            ChatCommand::UnpinNote { .. } => "chat.UnpinNote",
            ChatCommand::AssistantReply { .. } => "chat.AssistantReply",
        }
    }

    fn room_id(&self) -> Uuid {
        match self {
            ChatCommand::CreateRoom { room_id, .. }
            | ChatCommand::UpdateRoom { room_id, .. }
            | ChatCommand::ArchiveRoom { room_id }
            | ChatCommand::DeleteRoom { room_id }
            | ChatCommand::RotateRoomKey { room_id, .. }
            | ChatCommand::Invite { room_id, .. }
            | ChatCommand::DeclineInvite { room_id }
            | ChatCommand::Join { room_id, .. }
            | ChatCommand::Leave { room_id }
            | ChatCommand::Kick { room_id, .. }
            | ChatCommand::Ban { room_id, .. }
            | ChatCommand::Unban { room_id, .. }
            | ChatCommand::SetRole { room_id, .. }
            | ChatCommand::SendMessage { room_id, .. }
            | ChatCommand::EditMessage { room_id, .. }
            | ChatCommand::RedactMessage { room_id, .. }
            | ChatCommand::React { room_id, .. }
            | ChatCommand::MarkRead { room_id, .. }
            | ChatCommand::FlagMessage { room_id, .. }
            | ChatCommand::ReportMessage { room_id, .. }
            | ChatCommand::ClearFlag { room_id, .. }
            | ChatCommand::Mute { room_id, .. }
            | ChatCommand::Unmute { room_id, .. }
            | ChatCommand::PinNote { room_id, .. }
            | ChatCommand::EditNote { room_id, .. }
            | ChatCommand::UnpinNote { room_id, .. }
            | ChatCommand::AssistantReply { room_id, .. } => *room_id,
        }
    }

    /// The stream the command is addressed to.
    pub fn target(&self) -> StreamId {
        match self {
            ChatCommand::SendMessage { message_id, .. }
            | ChatCommand::AssistantReply { message_id, .. }
            | ChatCommand::EditMessage { message_id, .. }
            | ChatCommand::RedactMessage { message_id, .. }
            | ChatCommand::React { message_id, .. } => message_stream(*message_id),
            ChatCommand::MarkRead { reader, .. } => reader_stream(*reader),
            _ => room_stream(self.room_id()),
        }
    }

    /// Every stream the decision reads.
    pub fn streams(&self) -> Vec<StreamId> {
        let room = room_stream(self.room_id());
        match self {
            ChatCommand::SendMessage {
                message_id,
                thread_root,
                quote,
                ..
            } => {
                let mut s = vec![message_stream(*message_id), room];
                s.extend(thread_root.map(message_stream));
                s.extend(quote.map(message_stream));
                s.dedup();
                s
            }
            ChatCommand::EditMessage { message_id, .. }
            | ChatCommand::RedactMessage { message_id, .. }
            | ChatCommand::React { message_id, .. } => vec![message_stream(*message_id), room],
            ChatCommand::AssistantReply {
                message_id,
                in_reply_to,
                ..
            } => vec![
                message_stream(*message_id),
                room,
                message_stream(*in_reply_to),
            ],
            // Flags live on the room (they count toward a mute there) and read the message.
            ChatCommand::FlagMessage { message_id, .. }
            | ChatCommand::ReportMessage { message_id, .. } => {
                vec![room, message_stream(*message_id)]
            }
            ChatCommand::MarkRead {
                reader,
                message_id,
                thread_root,
                ..
            } => {
                let mut s = vec![reader_stream(*reader), room, message_stream(*message_id)];
                s.extend(thread_root.map(message_stream));
                s.dedup();
                s
            }
            _ => vec![room],
        }
    }

    /// Decide against the loaded states.
    pub fn decide(&self, actor: &Actor, states: &StateSet) -> Result<Decision, Rejection> {
        let room_id = self.room_id();
        let rs = room_stream(room_id);
        let room = states.room(&rs);
        let me = actor.user_id;
        let my_role = room.role_of(me);
        let member = || my_role.ok_or_else(room_not_found);
        let room_answer = |extra: serde_json::Value| {
            let mut a = json!({ "room_id": room_id });
            if let (Some(o), serde_json::Value::Object(e)) = (a.as_object_mut(), extra) {
                o.extend(e);
            }
            a
        };
        match self {
            ChatCommand::CreateRoom {
                name,
                topic,
                visibility,
                room_key,
                ..
            } => {
                let Some(me) = me else {
                    return Err(forbidden("create rooms as the system"));
                };
                if room.exists {
                    return Err(Rejection::new(409, "room_exists", "this room id is taken"));
                }
                Ok(decision(
                    vec![(
                        rs,
                        ChatEvent::RoomCreated {
                            room_id,
                            name: name.clone(),
                            topic: topic.clone(),
                            visibility: *visibility,
                            created_by: me,
                        },
                    )],
                    201,
                    room_answer(json!({
                        "name": name, "topic": topic, "visibility": visibility, "role": "owner",
                        "key_version": 1,
                    })),
                    vec![KeyOp::PutRoomKey {
                        room_id,
                        version: 1,
                        wrapped: room_key.clone(),
                    }],
                ))
            }
            ChatCommand::UpdateRoom { name, topic, .. } => {
                if member()? < MemberRole::Moderator {
                    return Err(forbidden("rename the room or change its topic"));
                }
                if room.archived {
                    return Err(archived());
                }
                Ok(decision(
                    vec![(
                        rs,
                        ChatEvent::RoomUpdated {
                            name: name.clone(),
                            topic: topic.clone(),
                        },
                    )],
                    200,
                    room_answer(json!({ "name": name, "topic": topic })),
                    vec![],
                ))
            }
            ChatCommand::ArchiveRoom { .. } => {
                if member()? < MemberRole::Owner {
                    return Err(forbidden("archive the room"));
                }
                if room.archived {
                    return Err(archived());
                }
                Ok(decision(
                    vec![(rs, ChatEvent::RoomArchived)],
                    200,
                    room_answer(json!({ "archived": true })),
                    vec![],
                ))
            }
            ChatCommand::DeleteRoom { .. } => {
                if member()? < MemberRole::Owner {
                    return Err(forbidden("delete the room"));
                }
                Ok(decision(
                    vec![(rs, ChatEvent::RoomDeleted)],
                    200,
                    room_answer(json!({ "deleted": true })),
                    vec![KeyOp::DestroyRoomKeys { room_id }],
                ))
            }
            ChatCommand::RotateRoomKey {
                version, room_key, ..
            } => {
                if member()? < MemberRole::Owner {
                    return Err(forbidden("rotate the room's key"));
                }
                if *version != room.key_version + 1 {
                    return Err(Rejection::new(
                        409,
                        "key_version_conflict",
                        format!(
                            "the room key is at version {}; read it again",
                            room.key_version
                        ),
                    ));
                }
                Ok(decision(
                    vec![(rs, ChatEvent::RoomKeyRotated { version: *version })],
                    200,
                    room_answer(json!({ "key_version": version })),
                    vec![KeyOp::PutRoomKey {
                        room_id,
                        version: *version,
                        wrapped: room_key.clone(),
                    }],
                ))
            }
            ChatCommand::Invite { user_id, email, .. } => {
                let role = member()?;
                if room.visibility == Some(Visibility::Private) && role < MemberRole::Moderator {
                    return Err(forbidden("invite people to a private room"));
                }
                if room.archived {
                    return Err(archived());
                }
                let me = me.unwrap_or_default();
                let event = match (user_id, email) {
                    (Some(u), _) => {
                        if room.banned.contains(u) {
                            return Err(Rejection::new(
                                409,
                                "user_banned",
                                "this user is banned from the room; unban first",
                            ));
                        }
                        if room.members.contains_key(u) {
                            return Err(Rejection::new(
                                409,
                                "already_member",
                                "this user is already a member",
                            ));
                        }
                        if room.invited.contains(u) {
                            return Err(Rejection::new(
                                409,
                                "already_invited",
                                "this user is already invited",
                            ));
                        }
                        ChatEvent::MemberInvited {
                            user_id: *u,
                            by: me,
                        }
                    }
                    (None, Some(e)) => {
                        if room.email_invites.contains(e) {
                            return Err(Rejection::new(
                                409,
                                "already_invited",
                                "this address is already invited",
                            ));
                        }
                        ChatEvent::EmailInvited {
                            email: e.clone(),
                            by: me,
                        }
                    }
                    (None, None) => {
                        return Err(Rejection::new(422, "invalid", "name a user or an email"));
                    }
                };
                Ok(decision(
                    vec![(rs, event)],
                    201,
                    room_answer(json!({ "invited": user_id, "email": email })),
                    vec![],
                ))
            }
            ChatCommand::DeclineInvite { .. } => {
                let Some(me) = me else {
                    return Err(room_not_found());
                };
                if !room.live() || !room.invited.contains(&me) {
                    return Err(room_not_found());
                }
                Ok(decision(
                    vec![(rs, ChatEvent::InviteDeclined { user_id: me })],
                    200,
                    room_answer(json!({ "declined": true })),
                    vec![],
                ))
            }
            ChatCommand::Join { email, .. } => {
                let Some(me) = me else {
                    return Err(room_not_found());
                };
                let public = room.visibility == Some(Visibility::Public);
                // An address invitation is used up by the join that uses it.
                let via_email = email
                    .as_ref()
                    .filter(|e| !room.invited.contains(&me) && room.email_invites.contains(*e))
                    .cloned();
                let invited = room.invited.contains(&me) || via_email.is_some();
                if !room.live() || room.banned.contains(&me) || !(public || invited) {
                    return Err(room_not_found());
                }
                if room.members.contains_key(&me) {
                    return Err(Rejection::new(409, "already_member", "you are a member"));
                }
                if room.archived {
                    return Err(archived());
                }
                Ok(decision(
                    vec![(
                        rs,
                        ChatEvent::MemberJoined {
                            user_id: me,
                            role: MemberRole::Member,
                            via_email,
                        },
                    )],
                    200,
                    room_answer(json!({ "user_id": me, "role": "member" })),
                    vec![],
                ))
            }
            ChatCommand::Leave { .. } => {
                let role = member()?;
                let me = me.unwrap_or_default();
                if role == MemberRole::Owner && room.owners() == 1 && room.members.len() > 1 {
                    return Err(Rejection::new(
                        422,
                        "last_owner",
                        "you are the only owner: make another member owner before leaving",
                    ));
                }
                Ok(decision(
                    vec![(rs, ChatEvent::MemberLeft { user_id: me })],
                    200,
                    room_answer(json!({ "user_id": me, "left": true })),
                    vec![],
                ))
            }
            ChatCommand::Kick { user_id, .. } | ChatCommand::Ban { user_id, .. } => {
                let role = member()?;
                let kick = matches!(self, ChatCommand::Kick { .. });
                let verb = if kick { "kick" } else { "ban" };
                if role < MemberRole::Moderator {
                    return Err(forbidden(&format!("{verb} members")));
                }
                let target_role = room.members.get(user_id).copied();
                if target_role.is_some_and(|t| t >= role) || Some(*user_id) == me {
                    return Err(forbidden(&format!(
                        "{verb} a member of equal or higher role"
                    )));
                }
                let by = me.unwrap_or_default();
                let event = if kick {
                    if target_role.is_none() {
                        return Err(Rejection::new(
                            404,
                            "member_not_found",
                            "this user is not a member",
                        ));
                    }
                    ChatEvent::MemberKicked {
                        user_id: *user_id,
                        by,
                    }
                } else {
                    if room.banned.contains(user_id) {
                        return Err(Rejection::new(409, "already_banned", "already banned"));
                    }
                    ChatEvent::MemberBanned {
                        user_id: *user_id,
                        by,
                    }
                };
                Ok(decision(
                    vec![(rs, event)],
                    200,
                    room_answer(json!({ "user_id": user_id, "action": verb })),
                    vec![],
                ))
            }
            ChatCommand::Unban { user_id, .. } => {
                if member()? < MemberRole::Moderator {
                    return Err(forbidden("lift bans"));
                }
                if !room.banned.contains(user_id) {
                    return Err(Rejection::new(404, "not_banned", "this user is not banned"));
                }
                Ok(decision(
                    vec![(rs, ChatEvent::MemberUnbanned { user_id: *user_id })],
                    200,
                    room_answer(json!({ "user_id": user_id, "action": "unban" })),
                    vec![],
                ))
            }
            ChatCommand::SetRole { user_id, role, .. } => {
                if member()? < MemberRole::Owner {
                    return Err(forbidden("change roles"));
                }
                let Some(current) = room.members.get(user_id) else {
                    return Err(Rejection::new(
                        404,
                        "member_not_found",
                        "this user is not a member",
                    ));
                };
                if current == role {
                    return Err(Rejection::new(
                        409,
                        "role_unchanged",
                        "the member already has this role",
                    ));
                }
                if *current == MemberRole::Owner && room.owners() == 1 {
                    return Err(Rejection::new(
                        422,
                        "last_owner",
                        "the room needs an owner: make someone else owner first",
                    ));
                }
                Ok(decision(
                    vec![(
                        rs,
                        ChatEvent::MemberRoleChanged {
                            user_id: *user_id,
                            role: *role,
                        },
                    )],
                    200,
                    room_answer(json!({ "user_id": user_id, "role": role })),
                    vec![],
                ))
            }
            ChatCommand::SendMessage {
                message_id,
                kind,
                body,
                attachment,
                thread_root,
                quote,
                mentions,
                mentions_assistant,
                client_message_id,
                key_version,
                message_key,
                sent_at,
                ..
            } => {
                member()?;
                let me = me.unwrap_or_default();
                if room.archived {
                    return Err(archived());
                }
                if let Some(until) = room.muted_until(me, *sent_at) {
                    return Err(muted(until));
                }
                let ms = message_stream(*message_id);
                let existing = states.message(&ms);
                if existing.exists {
                    // The same client transaction id again: the message it sent, not a second one.
                    if existing.sender == me
                        && existing.room_id == room_id
                        && existing.client_message_id.is_some()
                        && existing.client_message_id == *client_message_id
                    {
                        return Err(Rejection::new(
                            409,
                            "duplicate_client_message_id",
                            "a message with this client_message_id was already sent",
                        )
                        .with_details(json!({ "message_id": message_id })));
                    }
                    return Err(Rejection::new(
                        409,
                        "message_exists",
                        "this message id is taken",
                    ));
                }
                if let Some(root) = thread_root {
                    let r = states.message(&message_stream(*root));
                    if !r.exists || r.room_id != room_id || r.redacted {
                        return Err(Rejection::new(
                            404,
                            "thread_root_not_found",
                            "no such message to reply to in this room",
                        ));
                    }
                    if r.thread_root.is_some() {
                        return Err(Rejection::new(
                            422,
                            "nested_thread",
                            "threads do not nest: reply to the thread's root",
                        )
                        .with_details(json!({ "thread_root": r.thread_root })));
                    }
                }
                if let Some(q) = quote {
                    let m = states.message(&message_stream(*q));
                    if !m.exists || m.room_id != room_id || m.redacted {
                        return Err(Rejection::new(
                            404,
                            "quote_not_found",
                            "no such message to quote in this room",
                        ));
                    }
                }
                // A text has no attachment; an attachment or a voice note has one.
                if (*kind == MessageKind::Text) != attachment.is_none()
                    || (*kind == MessageKind::Voice)
                        != attachment.as_ref().is_some_and(|a| a.duration_ms.is_some())
                {
                    return Err(Rejection::new(
                        422,
                        "invalid_attachment",
                        "the message kind does not match its attachment",
                    ));
                }
                if *key_version != room.key_version {
                    return Err(Rejection::new(
                        409,
                        "key_version_conflict",
                        "the room key was rotated meanwhile; send again",
                    ));
                }
                let mentions: Vec<Uuid> = mentions
                    .iter()
                    .copied()
                    .filter(|u| room.members.contains_key(u) && *u != me)
                    .collect();
                Ok(decision(
                    vec![(
                        ms,
                        ChatEvent::MessagePosted {
                            message_id: *message_id,
                            room_id,
                            sender: me,
                            kind: *kind,
                            body: body.clone(),
                            attachment: attachment.clone(),
                            thread_root: *thread_root,
                            quote: *quote,
                            mentions: mentions.clone(),
                            mentions_assistant: *mentions_assistant,
                            client_message_id: client_message_id.clone(),
                            key_version: *key_version,
                            sent_at: *sent_at,
                        },
                    )],
                    201,
                    json!({
                        "message_id": message_id,
                        "room_id": room_id,
                        "sender": me,
                        "kind": kind,
                        "thread_root": thread_root,
                        "quote": quote,
                        "mentions": mentions,
                        "client_message_id": client_message_id,
                        "sent_at": sent_at,
                    }),
                    std::iter::once(KeyOp::PutMessageKey {
                        message_id: *message_id,
                        room_id,
                        key_version: *key_version,
                        wrapped: message_key.clone(),
                    })
                    .chain(attachment.as_ref().map(|a| KeyOp::BindUpload {
                        storage_key: a.storage_key.clone(),
                        message_id: *message_id,
                    }))
                    .collect(),
                ))
            }
            ChatCommand::EditMessage {
                message_id, body, ..
            } => {
                member()?;
                let m = self.live_message(states, room_id, *message_id)?;
                if Some(m.sender) != me {
                    return Err(Rejection::new(
                        403,
                        "forbidden",
                        "only the sender can edit a message",
                    ));
                }
                if room.archived {
                    return Err(archived());
                }
                Ok(decision(
                    vec![(
                        message_stream(*message_id),
                        ChatEvent::MessageEdited {
                            body: body.clone(),
                            by: m.sender,
                        },
                    )],
                    200,
                    json!({ "message_id": message_id, "room_id": room_id, "edited": true }),
                    vec![],
                ))
            }
            ChatCommand::RedactMessage { message_id, .. } => {
                let role = member()?;
                let m = self.live_message(states, room_id, *message_id)?;
                if Some(m.sender) != me && role < MemberRole::Moderator {
                    return Err(Rejection::new(
                        403,
                        "forbidden",
                        "only the sender or a moderator can redact a message",
                    ));
                }
                Ok(decision(
                    vec![(
                        message_stream(*message_id),
                        ChatEvent::MessageRedacted {
                            by: me.unwrap_or_default(),
                        },
                    )],
                    200,
                    json!({ "message_id": message_id, "room_id": room_id, "redacted": true }),
                    vec![KeyOp::DestroyMessageKey {
                        message_id: *message_id,
                    }],
                ))
            }
            ChatCommand::React {
                message_id,
                emoji,
                add,
                ..
            } => {
                member()?;
                let me = me.unwrap_or_default();
                let m = self.live_message(states, room_id, *message_id)?;
                if room.archived {
                    return Err(archived());
                }
                let has = m.reactions.contains(&(me, emoji.clone()));
                let event = match (add, has) {
                    (true, true) => {
                        return Err(Rejection::new(
                            409,
                            "already_reacted",
                            "you already reacted with this emoji",
                        ));
                    }
                    (false, false) => {
                        return Err(Rejection::new(
                            404,
                            "reaction_not_found",
                            "you have no such reaction on this message",
                        ));
                    }
                    (true, false) => ChatEvent::ReactionAdded {
                        user_id: me,
                        emoji: emoji.clone(),
                    },
                    (false, true) => ChatEvent::ReactionRemoved {
                        user_id: me,
                        emoji: emoji.clone(),
                    },
                };
                Ok(decision(
                    vec![(message_stream(*message_id), event)],
                    200,
                    json!({ "message_id": message_id, "emoji": emoji, "reacted": add }),
                    vec![],
                ))
            }
            ChatCommand::MarkRead {
                reader,
                thread_root,
                message_id,
                ..
            } => {
                member()?;
                let me = me.unwrap_or_default();
                if *reader != me {
                    return Err(forbidden("move another reader's receipt"));
                }
                let m = states.message(&message_stream(*message_id));
                if !m.exists || m.room_id != room_id {
                    return Err(message_not_found());
                }
                // The marker belongs to one timeline: the main one (root-level
                // messages) or one thread (its root and its replies).
                let timeline = m.thread_root.or(thread_root.filter(|r| r == message_id));
                if timeline != *thread_root {
                    return Err(Rejection::new(
                        422,
                        "wrong_timeline",
                        "this message is not in that timeline",
                    ));
                }
                Ok(decision(
                    vec![(
                        reader_stream(me),
                        ChatEvent::ReceiptMoved {
                            room_id,
                            thread_root: *thread_root,
                            message_id: *message_id,
                        },
                    )],
                    200,
                    json!({ "room_id": room_id, "thread_root": thread_root, "message_id": message_id }),
                    vec![],
                ))
            }
            ChatCommand::FlagMessage { .. }
            | ChatCommand::ReportMessage { .. }
            | ChatCommand::ClearFlag { .. }
            | ChatCommand::Mute { .. }
            | ChatCommand::Unmute { .. }
            | ChatCommand::PinNote { .. }
            | ChatCommand::EditNote { .. }
            | ChatCommand::UnpinNote { .. } => self.decide_moderation(actor, states, &room),
            ChatCommand::AssistantReply {
                message_id,
                in_reply_to,
                body,
                key_version,
                message_key,
                sent_at,
                ..
            } => {
                if actor.role != crate::Role::System {
                    return Err(forbidden("speak as the assistant"));
                }
                if !room.exists || room.deleted {
                    return Err(room_not_found());
                }
                if room.archived {
                    return Err(archived());
                }
                let ms = message_stream(*message_id);
                if states.message(&ms).exists {
                    return Err(Rejection::new(
                        409,
                        "message_exists",
                        "this message id is taken",
                    ));
                }
                let asked = states.message(&message_stream(*in_reply_to));
                if !asked.exists || asked.room_id != room_id {
                    return Err(message_not_found());
                }
                if *key_version != room.key_version {
                    return Err(Rejection::new(
                        409,
                        "key_version_conflict",
                        "the room key was rotated meanwhile; send again",
                    ));
                }
                Ok(decision(
                    vec![(
                        ms,
                        ChatEvent::MessagePosted {
                            message_id: *message_id,
                            room_id,
                            sender: ASSISTANT,
                            kind: MessageKind::Text,
                            body: body.clone(),
                            attachment: None,
                            thread_root: asked.thread_root,
                            quote: Some(*in_reply_to),
                            mentions: vec![asked.sender],
                            mentions_assistant: false,
                            client_message_id: None,
                            key_version: *key_version,
                            sent_at: *sent_at,
                        },
                    )],
                    201,
                    json!({ "message_id": message_id, "room_id": room_id, "sender": ASSISTANT }),
                    vec![KeyOp::PutMessageKey {
                        message_id: *message_id,
                        room_id,
                        key_version: *key_version,
                        wrapped: message_key.clone(),
                    }],
                ))
            }
        }
    }

    fn live_message(
        &self,
        states: &StateSet,
        room_id: Uuid,
        message_id: Uuid,
    ) -> Result<Message, Rejection> {
        let m = states.message(&message_stream(message_id));
        if !m.exists || m.room_id != room_id || m.redacted {
            return Err(message_not_found());
        }
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Loaded, Role, State};

    fn actor(u: Uuid) -> Actor {
        Actor {
            user_id: Some(u),
            role: Role::User,
        }
    }

    fn sealed() -> Sealed {
        Sealed {
            nonce: Bytes64(vec![0; 12]),
            ct: Bytes64(vec![1; 20]),
        }
    }

    /// Decide `cmd` and fold its events into `states`, as the handler does.
    fn run(states: &mut StateSet, who: Uuid, cmd: ChatCommand) -> Result<Decision, Rejection> {
        for s in cmd.streams() {
            if !states.contains(&s) {
                states.insert(
                    s.clone(),
                    Loaded {
                        version: 0,
                        state: State::empty_for(&s).unwrap(),
                    },
                );
            }
        }
        let d = cmd.decide(&actor(who), states)?;
        states.apply(&d.events);
        Ok(d)
    }

    fn room(states: &mut StateSet, owner: Uuid, visibility: Visibility) -> Uuid {
        let room_id = Uuid::now_v7();
        run(
            states,
            owner,
            ChatCommand::CreateRoom {
                room_id,
                name: "r".into(),
                topic: None,
                visibility,
                room_key: Bytes64(vec![2; 60]),
            },
        )
        .unwrap();
        room_id
    }

    fn send(
        states: &mut StateSet,
        who: Uuid,
        room_id: Uuid,
        thread_root: Option<Uuid>,
    ) -> Result<Uuid, Rejection> {
        let message_id = Uuid::now_v7();
        run(
            states,
            who,
            ChatCommand::SendMessage {
                message_id,
                room_id,
                kind: MessageKind::Text,
                body: sealed(),
                attachment: None,
                thread_root,
                quote: None,
                mentions: vec![],
                mentions_assistant: false,
                client_message_id: None,
                key_version: 1,
                message_key: Bytes64(vec![3; 60]),
                sent_at: Utc::now(),
            },
        )
        .map(|_| message_id)
    }

    #[test]
    fn strangers_cannot_tell_a_private_room_exists() {
        let (owner, stranger) = (Uuid::now_v7(), Uuid::now_v7());
        let mut s = StateSet::default();
        let r = room(&mut s, owner, Visibility::Private);
        let never = Uuid::now_v7();
        for room_id in [r, never] {
            assert_eq!(
                send(&mut s, stranger, room_id, None).unwrap_err().code,
                "room_not_found"
            );
            let join = run(
                &mut s,
                stranger,
                ChatCommand::Join {
                    room_id,
                    email: None,
                },
            )
            .unwrap_err();
            assert_eq!(join.code, "room_not_found");
        }
    }

    #[test]
    fn an_invited_user_joins_sends_and_is_kicked_by_a_moderator_only() {
        let (owner, bob, carol) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        let mut s = StateSet::default();
        let r = room(&mut s, owner, Visibility::Private);
        for u in [bob, carol] {
            run(
                &mut s,
                owner,
                ChatCommand::Invite {
                    room_id: r,
                    user_id: Some(u),
                    email: None,
                },
            )
            .unwrap();
            run(
                &mut s,
                u,
                ChatCommand::Join {
                    room_id: r,
                    email: None,
                },
            )
            .unwrap();
        }
        send(&mut s, bob, r, None).unwrap();
        let e = run(
            &mut s,
            bob,
            ChatCommand::Kick {
                room_id: r,
                user_id: carol,
            },
        )
        .unwrap_err();
        assert_eq!(e.code, "forbidden");
        run(
            &mut s,
            owner,
            ChatCommand::SetRole {
                room_id: r,
                user_id: bob,
                role: MemberRole::Moderator,
            },
        )
        .unwrap();
        run(
            &mut s,
            bob,
            ChatCommand::Kick {
                room_id: r,
                user_id: carol,
            },
        )
        .unwrap();
        assert_eq!(
            send(&mut s, carol, r, None).unwrap_err().code,
            "room_not_found"
        );
        // A moderator cannot remove the owner.
        let e = run(
            &mut s,
            bob,
            ChatCommand::Ban {
                room_id: r,
                user_id: owner,
            },
        )
        .unwrap_err();
        assert_eq!(e.code, "forbidden");
    }

    #[test]
    fn threads_do_not_nest_and_banned_users_cannot_come_back() {
        let (owner, bob) = (Uuid::now_v7(), Uuid::now_v7());
        let mut s = StateSet::default();
        let r = room(&mut s, owner, Visibility::Public);
        run(
            &mut s,
            bob,
            ChatCommand::Join {
                room_id: r,
                email: None,
            },
        )
        .unwrap();
        let root = send(&mut s, owner, r, None).unwrap();
        let reply = send(&mut s, bob, r, Some(root)).unwrap();
        assert_eq!(
            send(&mut s, bob, r, Some(reply)).unwrap_err().code,
            "nested_thread"
        );
        run(
            &mut s,
            owner,
            ChatCommand::Ban {
                room_id: r,
                user_id: bob,
            },
        )
        .unwrap();
        assert_eq!(
            run(
                &mut s,
                bob,
                ChatCommand::Join {
                    room_id: r,
                    email: None
                }
            )
            .unwrap_err()
            .code,
            "room_not_found"
        );
    }

    #[test]
    fn redaction_destroys_the_message_key_and_ends_edits() {
        let owner = Uuid::now_v7();
        let mut s = StateSet::default();
        let r = room(&mut s, owner, Visibility::Private);
        let m = send(&mut s, owner, r, None).unwrap();
        let d = run(
            &mut s,
            owner,
            ChatCommand::RedactMessage {
                room_id: r,
                message_id: m,
            },
        )
        .unwrap();
        assert_eq!(d.keys, vec![KeyOp::DestroyMessageKey { message_id: m }]);
        let e = run(
            &mut s,
            owner,
            ChatCommand::EditMessage {
                room_id: r,
                message_id: m,
                body: sealed(),
            },
        )
        .unwrap_err();
        assert_eq!(e.code, "message_not_found");
    }

    #[test]
    fn an_attachment_binds_its_upload_and_must_match_the_kind() {
        let owner = Uuid::now_v7();
        let mut s = StateSet::default();
        let r = room(&mut s, owner, Visibility::Private);
        let attachment = |duration_ms| Attachment {
            sealed: sealed(),
            content_type: "audio/ogg".into(),
            size: 10,
            sha256: "00".repeat(32),
            storage_key: format!("{r}/u1"),
            duration_ms,
        };
        let post = |kind, attachment| ChatCommand::SendMessage {
            message_id: Uuid::now_v7(),
            room_id: r,
            kind,
            body: sealed(),
            attachment,
            thread_root: None,
            quote: None,
            mentions: vec![],
            mentions_assistant: false,
            client_message_id: None,
            key_version: 1,
            message_key: Bytes64(vec![3; 60]),
            sent_at: Utc::now(),
        };
        for (kind, a) in [
            (MessageKind::Text, Some(attachment(None))),
            (MessageKind::Attachment, None),
            (MessageKind::Voice, Some(attachment(None))),
            (MessageKind::Attachment, Some(attachment(Some(5)))),
        ] {
            let e = run(&mut s, owner, post(kind, a)).unwrap_err();
            assert_eq!(e.code, "invalid_attachment");
        }
        let cmd = post(MessageKind::Voice, Some(attachment(Some(5))));
        let ChatCommand::SendMessage { message_id, .. } = &cmd else {
            unreachable!()
        };
        let m = *message_id;
        let d = run(&mut s, owner, cmd).unwrap();
        assert!(d.keys.contains(&KeyOp::BindUpload {
            storage_key: format!("{r}/u1"),
            message_id: m,
        }));
    }

    #[test]
    fn the_last_owner_cannot_leave_others_behind() {
        let (owner, bob) = (Uuid::now_v7(), Uuid::now_v7());
        let mut s = StateSet::default();
        let r = room(&mut s, owner, Visibility::Public);
        run(
            &mut s,
            bob,
            ChatCommand::Join {
                room_id: r,
                email: None,
            },
        )
        .unwrap();
        assert_eq!(
            run(&mut s, owner, ChatCommand::Leave { room_id: r })
                .unwrap_err()
                .code,
            "last_owner"
        );
        run(
            &mut s,
            owner,
            ChatCommand::SetRole {
                room_id: r,
                user_id: bob,
                role: MemberRole::Owner,
            },
        )
        .unwrap();
        run(&mut s, owner, ChatCommand::Leave { room_id: r }).unwrap();
    }

    fn join(states: &mut StateSet, owner: Uuid, room_id: Uuid, user: Uuid) {
        run(
            states,
            owner,
            ChatCommand::Invite {
                room_id,
                user_id: Some(user),
                email: None,
            },
        )
        .unwrap();
        run(
            states,
            user,
            ChatCommand::Join {
                room_id,
                email: None,
            },
        )
        .unwrap();
    }

    fn flag(states: &mut StateSet, room_id: Uuid, message_id: Uuid) -> Result<Decision, Rejection> {
        let cmd = ChatCommand::FlagMessage {
            room_id,
            message_id,
            label: "spam".into(),
            score: 990,
            mute_after: 3,
            mute_for_secs: 600,
            at: Utc::now(),
        };
        let system = Actor {
            user_id: None,
            role: Role::System,
        };
        let d = cmd.decide(&system, states)?;
        states.apply(&d.events);
        Ok(d)
    }

    #[test]
    fn the_third_classifier_flag_mutes_and_a_cleared_flag_takes_its_strike_back() {
        let mut states = StateSet::default();
        let (owner, bob) = (Uuid::now_v7(), Uuid::now_v7());
        let r = room(&mut states, owner, Visibility::Private);
        join(&mut states, owner, r, bob);
        let msgs: Vec<Uuid> = (0..4)
            .map(|_| send(&mut states, bob, r, None).unwrap())
            .collect();
        // Only the system may flag as the classifier.
        let as_user = ChatCommand::FlagMessage {
            room_id: r,
            message_id: msgs[0],
            label: "spam".into(),
            score: 1,
            mute_after: 3,
            mute_for_secs: 1,
            at: Utc::now(),
        };
        assert_eq!(
            run(&mut states, owner, as_user).unwrap_err().code,
            "forbidden"
        );
        flag(&mut states, r, msgs[0]).unwrap();
        assert_eq!(
            flag(&mut states, r, msgs[0]).unwrap_err().code,
            "already_flagged"
        );
        flag(&mut states, r, msgs[1]).unwrap();
        // A moderator clears one: two strikes become one, so the next flag does not mute.
        run(
            &mut states,
            owner,
            ChatCommand::ClearFlag {
                room_id: r,
                message_id: msgs[0],
            },
        )
        .unwrap();
        let d = flag(&mut states, r, msgs[2]).unwrap();
        assert_eq!(d.events.len(), 1);
        let d = flag(&mut states, r, msgs[3]).unwrap();
        assert!(matches!(
            d.events.last(),
            Some((_, Event::Chat(ChatEvent::MemberMuted { user_id, by: None, .. }))) if *user_id == bob
        ));
        assert_eq!(send(&mut states, bob, r, None).unwrap_err().code, "muted");
        let rs = room_stream(r);
        assert!(
            states.room(&rs).strikes.is_empty(),
            "a mute resets the strikes"
        );
        run(
            &mut states,
            owner,
            ChatCommand::Unmute {
                room_id: r,
                user_id: bob,
            },
        )
        .unwrap();
        send(&mut states, bob, r, None).unwrap();
    }

    #[test]
    fn reports_are_for_review_and_never_mute() {
        let mut states = StateSet::default();
        let (owner, bob) = (Uuid::now_v7(), Uuid::now_v7());
        let r = room(&mut states, owner, Visibility::Private);
        join(&mut states, owner, r, bob);
        let m = send(&mut states, owner, r, None).unwrap();
        let mut reporters = vec![bob];
        for _ in 0..3 {
            let u = Uuid::now_v7();
            join(&mut states, owner, r, u);
            reporters.push(u);
        }
        for u in &reporters {
            let cmd = ChatCommand::ReportMessage {
                room_id: r,
                message_id: m,
                reason: "spam".into(),
            };
            run(&mut states, *u, cmd).unwrap();
        }
        let room_state = states.room(&room_stream(r));
        assert_eq!(room_state.flags[&m].reporters.len(), 4);
        assert!(room_state.strikes.is_empty() && room_state.muted.is_empty());
        let again = ChatCommand::ReportMessage {
            room_id: r,
            message_id: m,
            reason: "spam".into(),
        };
        assert_eq!(
            run(&mut states, bob, again).unwrap_err().code,
            "already_reported"
        );
        let own = ChatCommand::ReportMessage {
            room_id: r,
            message_id: m,
            reason: "spam".into(),
        };
        assert_eq!(
            run(&mut states, owner, own).unwrap_err().code,
            "own_message"
        );
        let stranger = ChatCommand::ReportMessage {
            room_id: r,
            message_id: m,
            reason: "spam".into(),
        };
        assert_eq!(
            run(&mut states, Uuid::now_v7(), stranger).unwrap_err().code,
            "room_not_found"
        );
        // A member cannot mute; a moderator cannot mute an owner.
        let mute = |who| ChatCommand::Mute {
            room_id: r,
            user_id: who,
            until: Utc::now() + chrono::Duration::minutes(5),
            at: Utc::now(),
        };
        assert_eq!(
            run(&mut states, bob, mute(reporters[1])).unwrap_err().code,
            "forbidden"
        );
        run(
            &mut states,
            owner,
            ChatCommand::SetRole {
                room_id: r,
                user_id: bob,
                role: MemberRole::Moderator,
            },
        )
        .unwrap();
        assert_eq!(
            run(&mut states, bob, mute(owner)).unwrap_err().code,
            "forbidden"
        );
        run(&mut states, bob, mute(reporters[1])).unwrap();
    }

    #[test]
    fn notes_belong_to_their_author_and_unpinning_destroys_their_key() {
        let mut states = StateSet::default();
        let (owner, bob) = (Uuid::now_v7(), Uuid::now_v7());
        let r = room(&mut states, owner, Visibility::Private);
        join(&mut states, owner, r, bob);
        let note_id = Uuid::now_v7();
        let pin = ChatCommand::PinNote {
            room_id: r,
            note_id,
            priority: NotePriority::High,
            body: sealed(),
            key_version: 1,
            note_key: Bytes64(vec![4; 60]),
        };
        let d = run(&mut states, owner, pin.clone()).unwrap();
        assert!(
            matches!(d.keys[..], [KeyOp::PutMessageKey { message_id, .. }] if message_id == note_id)
        );
        assert_eq!(
            run(&mut states, owner, pin).unwrap_err().code,
            "note_exists"
        );
        let edit = ChatCommand::EditNote {
            room_id: r,
            note_id,
            body: Some(sealed()),
            priority: None,
        };
        assert_eq!(
            run(&mut states, bob, edit.clone()).unwrap_err().code,
            "forbidden"
        );
        run(&mut states, owner, edit).unwrap();
        let unpin = ChatCommand::UnpinNote {
            room_id: r,
            note_id,
        };
        assert_eq!(
            run(&mut states, bob, unpin.clone()).unwrap_err().code,
            "forbidden"
        );
        let d = run(&mut states, owner, unpin.clone()).unwrap();
        assert_eq!(
            d.keys,
            vec![KeyOp::DestroyMessageKey {
                message_id: note_id
            }]
        );
        assert_eq!(
            run(&mut states, owner, unpin).unwrap_err().code,
            "note_not_found"
        );
    }
}
