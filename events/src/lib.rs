//! # events — what happened, as Mathia records it
//!
//! This crate is the innermost ring of the workspace (`events` ← `commands` ←
//! `handlers`/`projections` ← `gateway`): it has no I/O and no async.
//!
//! - [`StreamId`]: the name of one aggregate's event stream, `<domain>.<aggregate>.<id>`.
//! - [`Event`]: every event type of every domain, versioned, serialised with a
//!   `type` tag; [`wallet::WalletEvent`] and [`chat::ChatEvent`] and [`itinerary::ItineraryEvent`] are the domains.
//! - [`EventEnvelope`]: an event with its metadata as stored and as published.
//! - [`Subjects`]: the only place NATS subjects and stream names are built.
//! - [`trace`]: W3C `traceparent`, and why the trace id is the correlation id.
#![warn(missing_docs)]

pub mod chat;
mod envelope;
pub mod invoice;
pub mod itinerary;
pub mod notify;
pub mod reminder;
mod stream_id;
mod subjects;
pub mod trace;
pub mod wallet;
pub mod webhook;

pub use envelope::{EventEnvelope, NewEvent};
pub use stream_id::{StreamId, StreamIdError};
pub use subjects::{Subjects, headers};

use serde::{Deserialize, Serialize};

/// Every event of every domain. The variant is the domain; the inner enum's
/// `type` tag is the event type that appears in subjects and in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
// Short-lived values, (de)serialised at once; boxing the big variants would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum Event {
    /// Ledger accounts and their entries.
    Wallet(wallet::WalletEvent),
    /// Rooms, members, messages, receipts.
    Chat(chat::ChatEvent),
    /// Itineraries, their items and sharing, and the events catalogue.
    Itinerary(itinerary::ItineraryEvent),
    /// Reminders and their firings.
    Reminder(reminder::ReminderEvent),
    /// Users' notification inboxes.
    Notify(notify::NotifyEvent),
    /// Outbound webhook endpoints.
    Webhook(webhook::WebhookEvent),
    /// Invoices, their number counters and recurring schedules.
    Invoice(invoice::InvoiceEvent),
}

/// Errors turning stored bytes back into a typed event.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The stream's domain has no event catalogue in this build.
    #[error("unknown domain `{0}`")]
    UnknownDomain(String),
    /// The payload does not match the event type's schema.
    #[error("payload of {event_type} does not decode: {source}")]
    Payload {
        /// The event type named in the store.
        event_type: String,
        /// The serde error.
        source: serde_json::Error,
    },
}

impl Event {
    /// The event type name, e.g. `Credited`: the last token of the subject.
    pub fn event_type(&self) -> &'static str {
        match self {
            Event::Wallet(e) => e.event_type(),
            Event::Chat(e) => e.event_type(),
            Event::Itinerary(e) => e.event_type(),
            Event::Reminder(e) => e.event_type(),
            Event::Notify(e) => e.event_type(),
            Event::Webhook(e) => e.event_type(),
            Event::Invoice(e) => e.event_type(),
        }
    }

    /// The schema version of this event type's payload.
    pub fn schema_version(&self) -> i32 {
        1
    }

    /// The domain this event belongs to.
    pub fn domain(&self) -> &'static str {
        match self {
            Event::Wallet(_) => wallet::DOMAIN,
            Event::Chat(_) => chat::DOMAIN,
            Event::Itinerary(_) => itinerary::DOMAIN,
            Event::Reminder(_) => reminder::DOMAIN,
            Event::Notify(_) => notify::DOMAIN,
            Event::Webhook(_) => webhook::DOMAIN,
            Event::Invoice(_) => invoice::DOMAIN,
        }
    }

    /// Decode a stored payload of a stream in `domain`.
    pub fn decode(
        domain: &str,
        event_type: &str,
        payload: &serde_json::Value,
    ) -> Result<Self, DecodeError> {
        let payload_err = |source| DecodeError::Payload {
            event_type: event_type.to_owned(),
            source,
        };
        match domain {
            wallet::DOMAIN => Ok(Event::Wallet(
                wallet::WalletEvent::deserialize(payload).map_err(payload_err)?,
            )),
            chat::DOMAIN => Ok(Event::Chat(
                chat::ChatEvent::deserialize(payload).map_err(payload_err)?,
            )),
            itinerary::DOMAIN => Ok(Event::Itinerary(
                itinerary::ItineraryEvent::deserialize(payload).map_err(payload_err)?,
            )),
            reminder::DOMAIN => Ok(Event::Reminder(
                reminder::ReminderEvent::deserialize(payload).map_err(payload_err)?,
            )),
            notify::DOMAIN => Ok(Event::Notify(
                notify::NotifyEvent::deserialize(payload).map_err(payload_err)?,
            )),
            webhook::DOMAIN => Ok(Event::Webhook(
                webhook::WebhookEvent::deserialize(payload).map_err(payload_err)?,
            )),
            invoice::DOMAIN => Ok(Event::Invoice(
                invoice::InvoiceEvent::deserialize(payload).map_err(payload_err)?,
            )),
            other => Err(DecodeError::UnknownDomain(other.to_owned())),
        }
    }
}
