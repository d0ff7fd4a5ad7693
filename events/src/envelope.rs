use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{Event, StreamId};

/// An event a handler decided, before the store gave it a position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    /// The stream it is appended to.
    pub stream_id: StreamId,
    /// Its version in that stream (1-based, no holes).
    pub version: i64,
    /// The fact itself.
    pub event: Event,
}

/// A stored event with its metadata: the row of `events`, and the body of
/// every message on the `EVENTS` stream.
///
/// ```
/// use events::{EventEnvelope, StreamId};
/// let json = r#"{"position":7,"event_id":"0191e2a0-0000-7000-8000-000000000001",
///   "stream_id":"wallet.account.a","version":2,"domain":"wallet","event_type":"Credited",
///   "schema_version":1,"payload":{"type":"Credited"},"occurred_at":"2026-11-22T10:00:00Z",
///   "correlation_id":"0191e2a0-0000-7000-8000-000000000002",
///   "causation_id":"0191e2a0-0000-7000-8000-000000000003","actor":null}"#;
/// let env: EventEnvelope = serde_json::from_str(json).unwrap();
/// assert_eq!(env.position, 7);
/// assert_eq!(env.stream_id, "wallet.account.a".parse::<StreamId>().unwrap());
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventEnvelope {
    /// Global, gapless, commit-ordered position in the log.
    pub position: i64,
    /// Unique id of the event; the `Nats-Msg-Id` when published.
    pub event_id: Uuid,
    /// The stream it belongs to.
    pub stream_id: StreamId,
    /// Its version in that stream.
    pub version: i64,
    /// The stream's domain.
    pub domain: String,
    /// The event type, e.g. `Debited`.
    pub event_type: String,
    /// The payload's schema version.
    pub schema_version: i32,
    /// The event, as JSON (decode with [`Event::decode`]).
    pub payload: serde_json::Value,
    /// When the handler decided it.
    pub occurred_at: DateTime<Utc>,
    /// The request that started the chain (the HTTP request id).
    pub correlation_id: Uuid,
    /// The command that produced it.
    pub causation_id: Uuid,
    /// The principal the command acted for, if any.
    pub actor: Option<Uuid>,
}

impl EventEnvelope {
    /// Decode the payload into a typed event.
    pub fn event(&self) -> Result<Event, crate::DecodeError> {
        Event::decode(&self.domain, &self.event_type, &self.payload)
    }
}
