//! Notifications: one inbox stream per user, `notify.inbox.<user>`.
//!
//! A notification is persisted (an event) before it is pushed anywhere: the
//! realtime feed carries it on the user's stream, so an offline user gets what
//! they missed when they resume.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The domain token of notification streams and subjects.
pub const DOMAIN: &str = "notify";
/// The aggregate token.
pub const INBOX: &str = "inbox";

/// What kind of notice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Category {
    /// For information.
    Info,
    /// Something went well.
    Success,
    /// Something needs attention.
    Warning,
    /// Something failed.
    Error,
    /// Something to do (reminders).
    Task,
    /// About a conversation.
    Chat,
}

/// Events of one user's inbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum NotifyEvent {
    /// A notification for the inbox's owner.
    NotificationCreated {
        /// Its id.
        notification_id: Uuid,
        /// Category.
        category: Category,
        /// One line.
        title: String,
        /// More.
        body: Option<String>,
        /// Where it points (`reminder:<id>`, `room:<id>`, …).
        link: Option<String>,
    },
    /// Notifications were read.
    NotificationsRead {
        /// Which (empty with `all`).
        ids: Vec<Uuid>,
        /// Every notification so far.
        all: bool,
    },
}

impl NotifyEvent {
    /// The event type name.
    pub fn event_type(&self) -> &'static str {
        match self {
            NotifyEvent::NotificationCreated { .. } => "NotificationCreated",
            NotifyEvent::NotificationsRead { .. } => "NotificationsRead",
        }
    }
}
