//! # commands — what a user asks for, and how the answer is decided
//!
//! Pure code, no I/O: commands, validated domain types (parse, don't validate),
//! and each aggregate as `decide` (state + command → events or rejection) and
//! `evolve` (state + event → state). The handlers crate is the I/O shell around it.
//!
//! Adding a domain is adding a variant to [`Command`] and [`State`] and a module
//! like [`wallet`]; the handler loop, the store and the bus do not change.
#![warn(missing_docs)]

mod aggregate;
pub mod assistant;
pub mod chat;
pub mod crypto;
pub mod invoice;
pub mod itinerary;
pub mod money;
pub mod reminder;
pub mod wallet;
pub mod webhook;

pub use aggregate::{Actor, Decision, KeyOp, Loaded, Rejection, Role, State, StateSet};

use events::StreamId;
use serde::{Deserialize, Serialize};

/// Every command Mathia's handlers accept, by domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "domain", content = "command", rename_all = "snake_case")]
// Short-lived values, (de)serialised at once; boxing the big variants would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum Command {
    /// Ledger accounts and money movements.
    Wallet(wallet::WalletCommand),
    /// Rooms, members, messages, receipts.
    Chat(chat::ChatCommand),
    /// Itineraries, items, sharing, the trip room, the events catalogue.
    Itinerary(itinerary::ItineraryCommand),
    /// Reminders and notification inboxes.
    Reminder(reminder::ReminderCommand),
    /// Outbound webhook endpoints.
    Webhook(webhook::WebhookCommand),
    /// Invoices and recurring invoice schedules.
    Invoice(invoice::InvoiceCommand),
}

macro_rules! from_domain {
    ($($variant:ident($ty:ty)),* $(,)?) => {
        $(impl From<$ty> for Command {
            fn from(c: $ty) -> Self {
                Command::$variant(c)
            }
        })*
    };
}

from_domain!(
    Wallet(wallet::WalletCommand),
    Chat(chat::ChatCommand),
    Itinerary(itinerary::ItineraryCommand),
    Reminder(reminder::ReminderCommand),
    Webhook(webhook::WebhookCommand),
    Invoice(invoice::InvoiceCommand),
);

impl Command {
    /// The command's name, for logs and metrics (`wallet.Transfer`).
    pub fn name(&self) -> &'static str {
        match self {
            Command::Wallet(c) => c.name(),
            Command::Chat(c) => c.name(),
            Command::Itinerary(c) => c.name(),
            Command::Reminder(c) => c.name(),
            Command::Webhook(c) => c.name(),
            Command::Invoice(c) => c.name(),
        }
    }

    /// The aggregate the command is addressed to: its subject on `COMMANDS`.
    pub fn target(&self) -> StreamId {
        match self {
            Command::Wallet(c) => c.target(),
            Command::Chat(c) => c.target(),
            Command::Itinerary(c) => c.target(),
            Command::Reminder(c) => c.target(),
            Command::Webhook(c) => c.target(),
            Command::Invoice(c) => c.target(),
        }
    }

    /// Every stream whose state the decision reads or appends to.
    pub fn streams(&self) -> Vec<StreamId> {
        match self {
            Command::Wallet(c) => c.streams(),
            Command::Chat(c) => c.streams(),
            Command::Itinerary(c) => c.streams(),
            Command::Reminder(c) => c.streams(),
            Command::Webhook(c) => c.streams(),
            Command::Invoice(c) => c.streams(),
        }
    }

    /// Decide: the events to append and the answer, or a rejection.
    /// Reads only `states`; the caller appends and evolves.
    pub fn decide(&self, actor: &Actor, states: &StateSet) -> Result<Decision, Rejection> {
        match self {
            Command::Wallet(c) => c.decide(actor, states),
            Command::Chat(c) => c.decide(actor, states),
            Command::Itinerary(c) => c.decide(actor, states),
            Command::Reminder(c) => c.decide(actor, states),
            Command::Webhook(c) => c.decide(actor, states),
            Command::Invoice(c) => c.decide(actor, states),
        }
    }
}
