use std::collections::HashMap;

use events::{Event, StreamId};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{chat, invoice, itinerary, reminder, wallet, webhook};

/// The folded state of one stream, by domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "domain", content = "state", rename_all = "snake_case")]
pub enum State {
    /// A ledger account.
    Wallet(wallet::Account),
    /// A chat room and its members.
    Room(chat::Room),
    /// One chat message.
    Message(chat::Message),
    /// A reader's receipts (the decisions read rooms and messages, not this).
    Reader,
    /// An itinerary with its items and shares.
    Trip(itinerary::Trip),
    /// An events-catalogue entry.
    Listing(itinerary::Listing),
    /// A reminder.
    Reminder(reminder::Reminder),
    /// A notification inbox (decisions need nothing of it).
    Inbox,
    /// An outbound webhook endpoint.
    Webhook(webhook::Endpoint),
    /// An invoice.
    Invoice(invoice::Invoice),
    /// An issuer's invoice number counter of one year.
    InvoiceCounter(invoice::Counter),
    /// A recurring invoice schedule.
    InvoiceSchedule(invoice::Schedule),
}

impl State {
    /// The state of a stream that has no events yet.
    pub fn empty_for(stream: &StreamId) -> Option<State> {
        match (stream.domain(), stream.aggregate()) {
            (events::wallet::DOMAIN, _) => Some(State::Wallet(wallet::Account::default())),
            (events::chat::DOMAIN, events::chat::ROOM) => Some(State::Room(chat::Room::default())),
            (events::chat::DOMAIN, events::chat::MESSAGE) => {
                Some(State::Message(chat::Message::default()))
            }
            (events::chat::DOMAIN, events::chat::READER) => Some(State::Reader),
            (events::itinerary::DOMAIN, events::itinerary::TRIP) => {
                Some(State::Trip(itinerary::Trip::default()))
            }
            (events::itinerary::DOMAIN, events::itinerary::LISTING) => {
                Some(State::Listing(itinerary::Listing::default()))
            }
            (events::reminder::DOMAIN, _) => Some(State::Reminder(reminder::Reminder::default())),
            (events::notify::DOMAIN, _) => Some(State::Inbox),
            (events::webhook::DOMAIN, _) => Some(State::Webhook(webhook::Endpoint::default())),
            (events::invoice::DOMAIN, events::invoice::COUNTER) => {
                Some(State::InvoiceCounter(invoice::Counter::default()))
            }
            (events::invoice::DOMAIN, events::invoice::SCHEDULE) => {
                Some(State::InvoiceSchedule(invoice::Schedule::default()))
            }
            (events::invoice::DOMAIN, _) => Some(State::Invoice(invoice::Invoice::default())),
            _ => None,
        }
    }

    /// Fold one event in. An event of another domain is ignored (it cannot be
    /// in this stream: stream ids carry their domain).
    pub fn evolve(&mut self, event: &Event) {
        match (self, event) {
            (State::Wallet(s), Event::Wallet(e)) => s.evolve(e),
            (State::Room(s), Event::Chat(e)) => s.evolve(e),
            (State::Message(s), Event::Chat(e)) => s.evolve(e),
            (State::Trip(s), Event::Itinerary(e)) => s.evolve(e),
            (State::Listing(s), Event::Itinerary(e)) => s.evolve(e),
            (State::Reminder(s), Event::Reminder(e)) => s.evolve(e),
            (State::Webhook(s), Event::Webhook(e)) => s.evolve(e),
            (State::Invoice(s), Event::Invoice(e)) => s.evolve(e),
            (State::InvoiceCounter(s), Event::Invoice(e)) => s.evolve(e),
            (State::InvoiceSchedule(s), Event::Invoice(e)) => s.evolve(e),
            _ => {}
        }
    }
}

/// A stream's state and the version it reflects (0: no events).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Loaded {
    /// Version of the last event folded in.
    pub version: i64,
    /// The folded state.
    pub state: State,
}

/// The states a decision may read, keyed by stream.
#[derive(Debug, Default, Clone)]
pub struct StateSet {
    streams: HashMap<StreamId, Loaded>,
}

impl StateSet {
    /// Put a loaded state in.
    pub fn insert(&mut self, stream: StreamId, loaded: Loaded) {
        self.streams.insert(stream, loaded);
    }

    /// The loaded state of `stream`, if present.
    pub fn get(&self, stream: &StreamId) -> Option<&Loaded> {
        self.streams.get(stream)
    }

    /// Whether `stream` is loaded.
    pub fn contains(&self, stream: &StreamId) -> bool {
        self.streams.contains_key(stream)
    }

    /// The wallet account in `stream`, or the empty account when absent.
    pub fn wallet(&self, stream: &StreamId) -> wallet::Account {
        match self.streams.get(stream) {
            Some(Loaded {
                state: State::Wallet(a),
                ..
            }) => a.clone(),
            _ => wallet::Account::default(),
        }
    }

    /// The chat room in `stream`, or an empty (non-existent) room.
    pub fn room(&self, stream: &StreamId) -> chat::Room {
        match self.streams.get(stream) {
            Some(Loaded {
                state: State::Room(r),
                ..
            }) => r.clone(),
            _ => chat::Room::default(),
        }
    }

    /// The chat message in `stream`, or an empty (non-existent) message.
    pub fn message(&self, stream: &StreamId) -> chat::Message {
        match self.streams.get(stream) {
            Some(Loaded {
                state: State::Message(m),
                ..
            }) => m.clone(),
            _ => chat::Message::default(),
        }
    }

    /// The trip in `stream`, or an empty (non-existent) one.
    pub fn trip(&self, stream: &StreamId) -> itinerary::Trip {
        match self.streams.get(stream) {
            Some(Loaded {
                state: State::Trip(t),
                ..
            }) => t.clone(),
            _ => itinerary::Trip::default(),
        }
    }

    /// The catalogue entry in `stream`, or an empty one.
    pub fn listing(&self, stream: &StreamId) -> itinerary::Listing {
        match self.streams.get(stream) {
            Some(Loaded {
                state: State::Listing(l),
                ..
            }) => l.clone(),
            _ => itinerary::Listing::default(),
        }
    }

    /// The reminder in `stream`, or an empty one.
    pub fn reminder(&self, stream: &StreamId) -> reminder::Reminder {
        match self.streams.get(stream) {
            Some(Loaded {
                state: State::Reminder(r),
                ..
            }) => r.clone(),
            _ => reminder::Reminder::default(),
        }
    }

    /// The webhook endpoint in `stream`, or an empty one.
    pub fn webhook(&self, stream: &StreamId) -> webhook::Endpoint {
        match self.streams.get(stream) {
            Some(Loaded {
                state: State::Webhook(w),
                ..
            }) => w.clone(),
            _ => webhook::Endpoint::default(),
        }
    }

    /// The invoice in `stream`, or an empty (non-existent) one.
    pub fn invoice(&self, stream: &StreamId) -> invoice::Invoice {
        match self.streams.get(stream) {
            Some(Loaded {
                state: State::Invoice(i),
                ..
            }) => i.clone(),
            _ => invoice::Invoice::default(),
        }
    }

    /// The invoice number counter in `stream`, or a fresh one (nothing taken).
    pub fn invoice_counter(&self, stream: &StreamId) -> invoice::Counter {
        match self.streams.get(stream) {
            Some(Loaded {
                state: State::InvoiceCounter(c),
                ..
            }) => c.clone(),
            _ => invoice::Counter::default(),
        }
    }

    /// The invoice schedule in `stream`, or an empty one.
    pub fn invoice_schedule(&self, stream: &StreamId) -> invoice::Schedule {
        match self.streams.get(stream) {
            Some(Loaded {
                state: State::InvoiceSchedule(s),
                ..
            }) => s.clone(),
            _ => invoice::Schedule::default(),
        }
    }

    /// Apply decided events: bump versions, fold. Returns the version each event got.
    pub fn apply(&mut self, events: &[(StreamId, Event)]) -> Vec<i64> {
        events
            .iter()
            .map(|(stream, event)| {
                let entry = self
                    .streams
                    .entry(stream.clone())
                    .or_insert_with(|| Loaded {
                        version: 0,
                        state: State::empty_for(stream)
                            .unwrap_or(State::Wallet(wallet::Account::default())),
                    });
                entry.version += 1;
                entry.state.evolve(event);
                entry.version
            })
            .collect()
    }

    /// Take the loaded states out.
    pub fn into_inner(self) -> HashMap<StreamId, Loaded> {
        self.streams
    }
}

/// given the loaded `states` (streams the command reads start empty);
/// when `cmd` is decided; then its decision, folded into `states` as the
/// handler folds it. For the domains' unit tests.
#[cfg(test)]
pub(crate) fn decide_and_apply(
    states: &mut StateSet,
    actor: &Actor,
    cmd: impl Into<crate::Command>,
) -> Result<Decision, Rejection> {
    let cmd = cmd.into();
    for s in cmd.streams() {
        if !states.contains(&s) {
            let state = State::empty_for(&s).unwrap_or(State::Reader);
            states.insert(s, Loaded { version: 0, state });
        }
    }
    let d = cmd.decide(actor, states)?;
    states.apply(&d.events);
    Ok(d)
}

/// Who the command acts for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    /// The authenticated user, none for the system itself (scheduler, webhooks).
    pub user_id: Option<Uuid>,
    /// Their role.
    pub role: Role,
}

/// Roles, as SPEC §1 names them, plus the system's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// An ordinary user.
    User,
    /// An administrator.
    Admin,
    /// Mathia itself (scheduler, provider webhooks).
    System,
}

/// An accepted command: events to append and the body of the answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// The events, in order, with the stream each goes to.
    pub events: Vec<(StreamId, Event)>,
    /// HTTP status of the answer (200 or 201).
    pub status: u16,
    /// Answer body; the handler adds `position` and `version`.
    pub answer: serde_json::Value,
    /// Keystore changes committed in the same transaction as the events.
    pub keys: Vec<KeyOp>,
}

/// A change to the keystore: wrapped keys live outside the append-only log so
/// that destroying one erases what it sealed (crypto-shredding).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum KeyOp {
    /// Store a room data key version, wrapped by the master key.
    PutRoomKey {
        /// The room.
        room_id: Uuid,
        /// Its version.
        version: i32,
        /// The key wrapped by the master key.
        wrapped: events::chat::Bytes64,
    },
    /// Store a message key, wrapped by a room data key version.
    PutMessageKey {
        /// The message.
        message_id: Uuid,
        /// Its room.
        room_id: Uuid,
        /// The room key version that wraps it.
        key_version: i32,
        /// The wrapped key.
        wrapped: events::chat::Bytes64,
    },
    /// Destroy a message key (redaction).
    DestroyMessageKey {
        /// The message.
        message_id: Uuid,
    },
    /// Destroy every key of a room (deletion).
    DestroyRoomKeys {
        /// The room.
        room_id: Uuid,
    },
    /// Store a webhook endpoint's signing secret, sealed by the master key.
    PutWebhookSecret {
        /// The endpoint.
        endpoint_id: Uuid,
        /// nonce ‖ ciphertext (`commands::webhook::secret_aad`).
        sealed: events::chat::Bytes64,
    },
    /// Destroy a webhook endpoint's secret (deletion).
    DestroyWebhookSecret {
        /// The endpoint.
        endpoint_id: Uuid,
    },
    /// A message now carries an upload: erase the upload's own copy of its
    /// file key (the message's sealed attachment holds it, under the message key).
    BindUpload {
        /// The upload's storage key.
        storage_key: String,
        /// The message carrying it.
        message_id: Uuid,
    },
}

/// A refused command: a stable machine-readable code, a status, a sentence,
/// and optional details (e.g. what remains of a limit).
#[derive(Debug, Clone, PartialEq, thiserror::Error, Serialize, Deserialize)]
#[error("{code}: {message}")]
pub struct Rejection {
    /// Stable code, e.g. `insufficient_funds`.
    pub code: String,
    /// HTTP status: 403, 404, 409 or 422.
    pub status: u16,
    /// A sentence for a person.
    pub message: String,
    /// Machine-readable details.
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub details: serde_json::Value,
}

impl Rejection {
    /// A rejection without details.
    pub fn new(status: u16, code: &str, message: impl Into<String>) -> Self {
        Rejection {
            code: code.to_owned(),
            status,
            message: message.into(),
            details: serde_json::Value::Null,
        }
    }

    /// The same rejection, with details.
    pub fn with_details(mut self, details: serde_json::Value) -> Self {
        self.details = details;
        self
    }
}
