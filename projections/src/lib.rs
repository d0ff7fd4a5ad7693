//! # projections — read models built from events
//!
//! Each read model is a named [`Projector`]. The [`runner`] gives it a durable
//! consumer `proj-<name>` on `EVENTS` and a row in `proj_checkpoints`, and applies
//! events in position order inside one transaction that also moves the checkpoint.
//!
//! The stream tells the projector *that* there is something new and *up to
//! where*; the event store tells it *what*. Because positions are commit-ordered
//! and gapless, reading `(checkpoint, up_to]` from Postgres can never skip an
//! event, whatever the stream lost, reordered or redelivered; and applying an
//! event twice is impossible because its position is ≤ the checkpoint the second
//! time. A tick also catches up to the head of the log when the bus is silent.
//!
//! Read models: [`wallet`] (balances and history), [`chat`] (rooms, timeline,
//! unread counts, search index, flags, mutes, notes). [`screen`] is the
//! moderation reactor: a queue projector and the screener that judges it with a
//! [`classifier`]. [`itinerary`] holds the trip read models and the trip-room
//! reactor (a queue projector and the poster that publishes system posts).
#![warn(missing_docs)]

pub mod assistant;
pub mod chat;
pub mod classifier;
pub mod deadletter;
pub mod feed;
pub mod invoice;
pub mod itinerary;
pub mod links;
pub mod rebuild;
pub mod reconcile;
pub mod reminder;
pub mod runner;
pub mod scheduler;
pub mod screen;
pub mod status;
pub mod wallet;
pub mod webhook;

use std::future::Future;

use events::EventEnvelope;
use sqlx::PgConnection;

/// A read model: a name, the domains it reads, and how it applies a batch.
pub trait Projector: Send + Sync + 'static {
    /// Unique name: the checkpoint row and the consumer `proj-<name>`.
    fn name(&self) -> &'static str;
    /// The event domains it reads.
    fn domains(&self) -> &'static [&'static str];
    /// Apply `events` (in position order, none seen before) inside `tx`.
    fn apply(
        &self,
        tx: &mut PgConnection,
        events: &[EventEnvelope],
    ) -> impl Future<Output = anyhow::Result<()>> + Send;
    /// The tables this projector alone writes: what a rebuild recreates in a
    /// shadow schema and swaps in ([`rebuild`]). Empty (the default) for a
    /// reactor, whose rows trigger side effects (moderation calls, assistant
    /// replies, webhook deliveries, trip-room posts): rebuilding it would fire
    /// them again, so it cannot be rebuilt.
    fn tables(&self) -> &'static [&'static str] {
        &[]
    }
    /// Indexes of [`tables`](Projector::tables) that `apply` never reads
    /// through. A rebuild creates them once the shadow is filled, before it is
    /// compared or swapped in: one sorted build instead of an insertion per
    /// row (a GIN index especially).
    fn deferred_indexes(&self) -> &'static [&'static str] {
        &[]
    }
    /// SQL run inside a new shadow schema before the first event (`$1` = the
    /// position the rebuild starts after): rows a migration seeded.
    fn shadow_seed(&self) -> Option<&'static str> {
        None
    }
}

/// The position projector `model` has applied (0 if it never ran).
pub async fn checkpoint(pool: &sqlx::PgPool, model: &str) -> Result<i64, sqlx::Error> {
    Ok(
        sqlx::query_scalar("SELECT position FROM proj_checkpoints WHERE model = $1")
            .bind(model)
            .fetch_optional(pool)
            .await?
            .unwrap_or(0),
    )
}
