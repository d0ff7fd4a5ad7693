//! NATS subjects and stream names, built in one place.

use crate::StreamId;

/// Header names Mathia sets on the messages it publishes.
pub mod headers {
    /// JetStream's dedup header: the command id or the event id.
    pub const MSG_ID: &str = "Nats-Msg-Id";
    /// The event's global position.
    pub const POSITION: &str = "Mathia-Position";
    /// The event's version in its stream.
    pub const STREAM_VERSION: &str = "Mathia-Stream-Version";
    /// The event type.
    pub const EVENT_TYPE: &str = "Mathia-Event-Type";
    /// Where the handler sends the command's outcome (core NATS).
    pub const REPLY_TO: &str = "Mathia-Reply-To";
    /// The request id that started the chain.
    pub const REQUEST_ID: &str = "X-Request-Id";
    /// W3C trace context of the span that published the message.
    pub const TRACEPARENT: &str = "traceparent";
}

/// Builds every subject and stream name, under an optional prefix.
///
/// The prefix is empty in a deployment; tests give each run its own so that
/// many can share one NATS server without seeing each other.
///
/// ```
/// use events::{StreamId, Subjects};
/// let s = Subjects::default();
/// let id: StreamId = "wallet.account.7".parse().unwrap();
/// assert_eq!(s.command(&id), "cmd.wallet.account.7");
/// assert_eq!(s.event(&id, "Credited"), "evt.wallet.account.7.Credited");
/// assert_eq!(s.events_stream(), "EVENTS");
/// let t = Subjects::with_prefix("t1");
/// assert_eq!(t.event(&id, "Credited"), "t1.evt.wallet.account.7.Credited");
/// assert_eq!(t.commands_stream(), "T1_COMMANDS");
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Subjects {
    prefix: String,
}

impl Subjects {
    /// Subjects under `prefix` (one subject token: letters, digits, `_`, `-`).
    pub fn with_prefix(prefix: &str) -> Self {
        Subjects {
            prefix: prefix.to_owned(),
        }
    }

    /// The prefix, empty by default.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn subject(&self, rest: &str) -> String {
        if self.prefix.is_empty() {
            rest.to_owned()
        } else {
            format!("{}.{rest}", self.prefix)
        }
    }

    fn stream_name(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_owned()
        } else {
            format!(
                "{}_{name}",
                self.prefix.to_ascii_uppercase().replace('-', "_")
            )
        }
    }

    /// `cmd.<domain>.<aggregate>.<id>`: where a command for that aggregate is published.
    pub fn command(&self, stream: &StreamId) -> String {
        self.subject(&format!("cmd.{stream}"))
    }

    /// `cmd.>`: every command.
    pub fn all_commands(&self) -> String {
        self.subject("cmd.>")
    }

    /// `evt.<domain>.<aggregate>.<id>.<EventType>`: where an event is published.
    pub fn event(&self, stream: &StreamId, event_type: &str) -> String {
        self.subject(&format!("evt.{stream}.{event_type}"))
    }

    /// `evt.>`: every event.
    pub fn all_events(&self) -> String {
        self.subject("evt.>")
    }

    /// `evt.<domain>.>`: every event of one domain.
    pub fn domain_events(&self, domain: &str) -> String {
        self.subject(&format!("evt.{domain}.>"))
    }

    /// The inbox prefix under which handlers answer one gateway instance.
    pub fn outcome_inbox(&self, gateway_id: &str) -> String {
        self.subject(&format!("_outcome.{gateway_id}"))
    }

    /// The `COMMANDS` stream.
    pub fn commands_stream(&self) -> String {
        self.stream_name("COMMANDS")
    }

    /// The `EVENTS` stream.
    pub fn events_stream(&self) -> String {
        self.stream_name("EVENTS")
    }
}
