//! End-to-end tests of Mathia against real Postgres, NATS JetStream and Redis.
//! One binary (z2p style); each test isolates itself (see `mathia_tests`).

mod accounts;
mod assistant;
mod attachments;
mod chat;
mod crash;
mod input;
mod invoices;
mod itineraries;
mod keys;
mod ledger;
mod moderation;
mod nats;
mod observability;
mod openapi;
mod realtime;
mod reminders;
mod replay;
mod store;
mod wallet;
mod webhooks;
