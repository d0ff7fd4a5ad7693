//! Chat events: rooms with their members, and messages.
//!
//! Streams:
//! - `chat.room.<room_id>`: the room and its membership, moderation, notes and key versions.
//! - `chat.message.<message_id>`: one message and what happens to it (edits, redaction,
//!   reactions). A message per stream means a busy room never serialises on one stream
//!   version: two senders in one room append to different streams; the timeline orders
//!   them by global position, which is commit order.
//! - `chat.reader.<user_id>`: one user's read receipts, in the order they were sent.
//!
//! Nothing a person wrote travels in clear: bodies and attachment names are
//! [`Sealed`] under the message's own data key, which lives outside the log (see
//! the keystore) and dies when the message is redacted or the room deleted.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD_NO_PAD;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

/// The domain token of chat streams and subjects.
pub const DOMAIN: &str = "chat";
/// The aggregate token of a room's stream.
pub const ROOM: &str = "room";
/// The aggregate token of a message's stream.
pub const MESSAGE: &str = "message";
/// The aggregate token of a reader's receipts stream.
pub const READER: &str = "reader";

/// Bytes that serialise as unpadded standard base64.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Bytes64(pub Vec<u8>);

impl fmt::Debug for Bytes64 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print key or cipher bytes in a log line; their length is enough.
        write!(f, "Bytes64({} bytes)", self.0.len())
    }
}

impl Serialize for Bytes64 {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD_NO_PAD.encode(&self.0))
    }
}

impl<'de> Deserialize<'de> for Bytes64 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        STANDARD_NO_PAD
            .decode(s.trim_end_matches('='))
            .map(Bytes64)
            .map_err(serde::de::Error::custom)
    }
}

/// AES-256-GCM ciphertext with its nonce. The key is named by context (the
/// message's data key); the associated data binds it to its message and field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sealed {
    /// 96-bit nonce, random per seal.
    pub nonce: Bytes64,
    /// Ciphertext followed by the 128-bit tag.
    pub ct: Bytes64,
}

/// Room visibility.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Visibility {
    /// Invitation only.
    Private,
    /// Anyone signed in may join.
    Public,
}

impl Visibility {
    /// The snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Visibility::Private => "private",
            Visibility::Public => "public",
        }
    }
}

/// A member's role in a room.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberRole {
    /// Reads and writes.
    Member,
    /// Also renames, invites, kicks and bans members, redacts anyone's messages, reviews flags.
    Moderator,
    /// Also changes roles, rotates keys, archives and deletes the room.
    Owner,
}

impl MemberRole {
    /// The snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            MemberRole::Member => "member",
            MemberRole::Moderator => "moderator",
            MemberRole::Owner => "owner",
        }
    }
}

/// What a message carries besides its body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MessageKind {
    /// Text only.
    Text,
    /// A file.
    Attachment,
    /// A voice note: an audio attachment with a duration and maybe a transcript.
    Voice,
}

impl MessageKind {
    /// The snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            MessageKind::Text => "text",
            MessageKind::Attachment => "attachment",
            MessageKind::Voice => "voice",
        }
    }
}

/// An attachment's metadata. What names things (the file name, a transcript)
/// is sealed; sizes, types and hashes are not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    /// Sealed JSON `{"name": …, "transcript": …}`.
    pub sealed: Sealed,
    /// MIME type.
    pub content_type: String,
    /// Bytes.
    pub size: i64,
    /// Hex SHA-256 of the content.
    pub sha256: String,
    /// Where the bytes are in object storage.
    pub storage_key: String,
    /// Voice notes: milliseconds.
    pub duration_ms: Option<i64>,
}

/// Where a flag came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FlagSource {
    /// The screening classifier: counts toward an automatic mute.
    Classifier,
    /// A member's report: waits for a moderator, never mutes by itself.
    Report,
}

impl FlagSource {
    /// The snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            FlagSource::Classifier => "classifier",
            FlagSource::Report => "report",
        }
    }
}

/// How much a room note matters. High-priority notes follow their author
/// into every room they are in (the assistant reads them there too).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NotePriority {
    /// Background.
    Low,
    /// The default.
    Normal,
    /// Shown across the author's rooms.
    High,
}

impl NotePriority {
    /// The snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            NotePriority::Low => "low",
            NotePriority::Normal => "normal",
            NotePriority::High => "high",
        }
    }
}

/// Events of chat streams (rooms, messages, readers).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type")]
// Short-lived values, (de)serialised at once; boxing the big variants would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum ChatEvent {
    // --- room streams ---
    /// A room exists, its creator is its owner, and its first data key is version 1.
    RoomCreated {
        /// Room id (= stream id).
        room_id: Uuid,
        /// Display name.
        name: String,
        /// Topic.
        topic: Option<String>,
        /// Private or public.
        visibility: Visibility,
        /// The owner.
        created_by: Uuid,
    },
    /// Name and/or topic changed.
    RoomUpdated {
        /// New name, if changed.
        name: Option<String>,
        /// New topic, if changed (empty string clears it).
        topic: Option<String>,
    },
    /// The room is read-only from now on.
    RoomArchived,
    /// The room is gone; its keys were destroyed in the same transaction.
    RoomDeleted,
    /// A new data key version seals new messages; older messages keep theirs.
    RoomKeyRotated {
        /// The new version.
        version: i32,
    },
    /// A user was invited.
    MemberInvited {
        /// Who.
        user_id: Uuid,
        /// By whom.
        by: Uuid,
    },
    /// An address without an account yet was invited; whoever registers it may accept.
    EmailInvited {
        /// Lower-cased address.
        email: String,
        /// By whom.
        by: Uuid,
    },
    /// An invitation was declined (or withdrawn).
    InviteDeclined {
        /// Who.
        user_id: Uuid,
    },
    /// A user is a member from now on.
    MemberJoined {
        /// Who.
        user_id: Uuid,
        /// With which role.
        role: MemberRole,
        /// The address invitation it used up, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        via_email: Option<String>,
    },
    /// A member left.
    MemberLeft {
        /// Who.
        user_id: Uuid,
    },
    /// A member was removed by a moderator.
    MemberKicked {
        /// Who.
        user_id: Uuid,
        /// By whom.
        by: Uuid,
    },
    /// A user was banned (and removed if a member).
    MemberBanned {
        /// Who.
        user_id: Uuid,
        /// By whom.
        by: Uuid,
    },
    /// A ban was lifted.
    MemberUnbanned {
        /// Who.
        user_id: Uuid,
    },
    /// A member's role changed.
    MemberRoleChanged {
        /// Who.
        user_id: Uuid,
        /// The new role.
        role: MemberRole,
    },
    /// A message was flagged for review, by the classifier or by a member's report.
    MessageFlagged {
        /// The message.
        message_id: Uuid,
        /// Its sender (from the message, never from the flagger).
        sender: Uuid,
        /// Classifier or report.
        source: FlagSource,
        /// The classifier's category, or the reporter's reason.
        reason: String,
        /// The classifier's confidence in thousandths; none for a report.
        score: Option<u16>,
        /// The reporter; none for the classifier.
        by: Option<Uuid>,
    },
    /// A moderator reviewed a flagged message and cleared every flag on it.
    FlagCleared {
        /// The message.
        message_id: Uuid,
        /// The moderator.
        by: Uuid,
    },
    /// A member may not post until `until`.
    MemberMuted {
        /// Who.
        user_id: Uuid,
        /// End of the mute.
        until: DateTime<Utc>,
        /// The moderator; none for the automatic mute after too many flags.
        by: Option<Uuid>,
        /// Why (e.g. `flags`, `moderator`).
        reason: String,
    },
    /// A mute was lifted early.
    MemberUnmuted {
        /// Who.
        user_id: Uuid,
        /// The moderator.
        by: Uuid,
    },
    /// A note was pinned to the room. Its text is sealed under a key of its own
    /// (kept like a message key): unpinning or deleting the room erases it.
    NotePinned {
        /// Note id.
        note_id: Uuid,
        /// Who wrote it.
        author: Uuid,
        /// How much it matters.
        priority: NotePriority,
        /// The text, sealed.
        body: Sealed,
        /// Room key version wrapping the note key.
        key_version: i32,
    },
    /// A note's text or priority changed.
    NoteEdited {
        /// Note id.
        note_id: Uuid,
        /// The new text, if changed (same key).
        body: Option<Sealed>,
        /// The new priority, if changed.
        priority: Option<NotePriority>,
        /// Who.
        by: Uuid,
    },
    /// A note was unpinned; its key was destroyed in the same transaction.
    NoteUnpinned {
        /// Note id.
        note_id: Uuid,
        /// Who.
        by: Uuid,
    },
    // --- message streams ---
    /// A message was posted.
    MessagePosted {
        /// Message id (= stream id).
        message_id: Uuid,
        /// Its room.
        room_id: Uuid,
        /// The authenticated sender.
        sender: Uuid,
        /// Text, attachment or voice.
        kind: MessageKind,
        /// The body, sealed under the message key.
        body: Sealed,
        /// Attachment metadata, if any.
        attachment: Option<Attachment>,
        /// The thread's root message, for a reply.
        thread_root: Option<Uuid>,
        /// A quoted message of the same room.
        quote: Option<Uuid>,
        /// Mentioned users (members of the room).
        mentions: Vec<Uuid>,
        /// Whether `@mathia` was mentioned.
        mentions_assistant: bool,
        /// The sender's transaction id, for idempotent sends.
        client_message_id: Option<String>,
        /// Version of the room key that wraps the message key.
        key_version: i32,
        /// When the gateway accepted it.
        sent_at: DateTime<Utc>,
    },
    /// The body was replaced; the previous one stays in the history (same key).
    MessageEdited {
        /// The new body.
        body: Sealed,
        /// Who edited (the sender).
        by: Uuid,
    },
    /// The message's key was destroyed: its body, attachment names and edits are gone.
    MessageRedacted {
        /// Who redacted (the sender or a moderator).
        by: Uuid,
    },
    /// A reaction was added.
    ReactionAdded {
        /// Who.
        user_id: Uuid,
        /// The emoji (or short code).
        emoji: String,
    },
    /// A reaction was taken back.
    ReactionRemoved {
        /// Who.
        user_id: Uuid,
        /// The emoji.
        emoji: String,
    },
    // --- reader streams ---
    /// A user has read a room (or one thread) up to and including a message.
    ReceiptMoved {
        /// The room.
        room_id: Uuid,
        /// The thread, or none for the main timeline.
        thread_root: Option<Uuid>,
        /// The last message read.
        message_id: Uuid,
    },
}

impl ChatEvent {
    /// The event type name.
    pub fn event_type(&self) -> &'static str {
        match self {
            ChatEvent::RoomCreated { .. } => "RoomCreated",
            ChatEvent::RoomUpdated { .. } => "RoomUpdated",
            ChatEvent::RoomArchived => "RoomArchived",
            ChatEvent::RoomDeleted => "RoomDeleted",
            ChatEvent::RoomKeyRotated { .. } => "RoomKeyRotated",
            ChatEvent::MemberInvited { .. } => "MemberInvited",
            ChatEvent::EmailInvited { .. } => "EmailInvited",
            ChatEvent::InviteDeclined { .. } => "InviteDeclined",
            ChatEvent::MemberJoined { .. } => "MemberJoined",
            ChatEvent::MemberLeft { .. } => "MemberLeft",
            ChatEvent::MemberKicked { .. } => "MemberKicked",
            ChatEvent::MemberBanned { .. } => "MemberBanned",
            ChatEvent::MemberUnbanned { .. } => "MemberUnbanned",
            ChatEvent::MemberRoleChanged { .. } => "MemberRoleChanged",
            ChatEvent::MessageFlagged { .. } => "MessageFlagged",
            ChatEvent::FlagCleared { .. } => "FlagCleared",
            ChatEvent::MemberMuted { .. } => "MemberMuted",
            ChatEvent::MemberUnmuted { .. } => "MemberUnmuted",
            ChatEvent::NotePinned { .. } => "NotePinned",
            ChatEvent::NoteEdited { .. } => "NoteEdited",
            ChatEvent::NoteUnpinned { .. } => "NoteUnpinned",
            ChatEvent::MessagePosted { .. } => "MessagePosted",
            ChatEvent::MessageEdited { .. } => "MessageEdited",
            ChatEvent::MessageRedacted { .. } => "MessageRedacted",
            ChatEvent::ReactionAdded { .. } => "ReactionAdded",
            ChatEvent::ReactionRemoved { .. } => "ReactionRemoved",
            ChatEvent::ReceiptMoved { .. } => "ReceiptMoved",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_bytes_travel_as_base64_and_never_print() {
        let s = Sealed {
            nonce: Bytes64(vec![1; 12]),
            ct: Bytes64(b"secret".to_vec()),
        };
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["ct"], "c2VjcmV0");
        assert_eq!(serde_json::from_value::<Sealed>(v).unwrap(), s);
        assert!(!format!("{s:?}").contains("secret"));
        assert!(format!("{s:?}").contains("6 bytes"));
    }
}
