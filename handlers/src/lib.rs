//! # handlers — the I/O shell around the pure domain
//!
//! - [`store`]: the Postgres event store. Appends with expected versions under a
//!   commit-order fence, loads streams (snapshot + tail), reads the global log.
//! - [`ledger`]: the command ledger, every command id with its answer, forever.
//! - [`bus`]: JetStream streams and consumers, the command envelope and the outcome.
//! - [`handler`]: the handlers role: pull commands, decide in batches, append, answer, ack.
//! - [`relay`]: the relay role: publish committed events to `EVENTS` in position order.
//! - [`keystore`]: wrapped room and message keys, destroyed to erase (crypto-shredding).
//! - [`master_key`]: re-wrapping the keystore under a new master key.
//! - [`infra`]: connecting to Postgres and NATS, migrations.
//!
//! Data flow: gateway → `COMMANDS` → [`handler`] → Postgres → [`relay`] → `EVENTS` → projections.
#![warn(missing_docs)]

pub mod bus;
pub mod handler;
pub mod infra;
pub mod keystore;
pub mod ledger;
pub mod master_key;
pub mod relay;
pub mod store;

pub use bus::{CommandEnvelope, Outcome};
