//! The relay role: publish committed events to `EVENTS` in position order.
//!
//! The events table is the outbox. One relay instance leads at a time (a
//! Postgres advisory lock held on its own connection); others wait to take over.
//! The leader reads the log after its checkpoint, publishes a batch with
//! `Nats-Msg-Id` = event id (so a re-publish after a crash is dropped by
//! JetStream), waits for every ack, then moves its checkpoint. It wakes on
//! `NOTIFY mathia_events` and polls as a fallback.

use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream;
use events::{EventEnvelope, Subjects, headers, trace};
use sqlx::postgres::PgListener;
use sqlx::{Connection, PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

use crate::store::{self, NOTIFY_CHANNEL};

/// The advisory-lock key that elects the relay leader.
const RELAY_LOCK: i64 = 0x6d61_7468_7265_6c61;
/// Most events published before waiting for acks and moving the checkpoint.
const BATCH: i64 = 2048;

/// What the relay role needs.
#[derive(Clone)]
pub struct Relay {
    /// The event store.
    pub pool: PgPool,
    /// Connection string, for the leader's dedicated lock connection.
    pub database_url: String,
    /// JetStream.
    pub js: jetstream::Context,
    /// Subject and stream names.
    pub subjects: Subjects,
    /// The checkpoint row's name (one per EVENTS stream).
    pub name: String,
}

impl Relay {
    /// Run until `shutdown`, leading whenever this instance holds the lock.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        while !shutdown.is_cancelled() {
            match self.lead(&shutdown).await {
                Ok(()) => {}
                Err(e) => {
                    tracing::warn!(error = format!("{e:#}"), "relay lost its footing; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => {}
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                }
            }
        }
        Ok(())
    }

    async fn lead(&self, shutdown: &CancellationToken) -> anyhow::Result<()> {
        let mut lock = PgConnection::connect(&self.database_url)
            .await
            .context("opening the relay lock connection")?;
        loop {
            let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                .bind(RELAY_LOCK)
                .fetch_one(&mut lock)
                .await?;
            if got {
                break;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
        tracing::info!("relay is the leader");
        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener.listen(NOTIFY_CHANNEL).await?;
        sqlx::query(
            "INSERT INTO relay_checkpoint (name, position) VALUES ($1, 0) ON CONFLICT DO NOTHING",
        )
        .bind(&self.name)
        .execute(&self.pool)
        .await?;
        let mut checkpoint: i64 =
            sqlx::query_scalar("SELECT position FROM relay_checkpoint WHERE name = $1")
                .bind(&self.name)
                .fetch_one(&self.pool)
                .await?;
        let mut last_lock_check = tokio::time::Instant::now();
        while !shutdown.is_cancelled() {
            if last_lock_check.elapsed() > Duration::from_secs(2) {
                // Losing this connection releases the lock: stop leading at once.
                lock.ping()
                    .await
                    .context("the relay lock connection is gone")?;
                last_lock_check = tokio::time::Instant::now();
            }
            let batch = {
                let mut conn = self.pool.acquire().await?;
                store::read_range(&mut conn, checkpoint, i64::MAX, BATCH, None).await?
            };
            if batch.is_empty() {
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    n = listener.recv() => { n?; }
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                }
                continue;
            }
            let last = batch.last().map_or(checkpoint, |e| e.position);
            self.publish(&batch).await?;
            sqlx::query(
                "UPDATE relay_checkpoint SET position = $2, updated_at = now() WHERE name = $1",
            )
            .bind(&self.name)
            .bind(last)
            .execute(&self.pool)
            .await?;
            metrics::counter!("mathia_relay_events_total").increment(batch.len() as u64);
            metrics::gauge!("mathia_relay_position").set(last as f64);
            checkpoint = last;
        }
        Ok(())
    }

    /// Publish in order, pipelined, and wait for every ack.
    async fn publish(&self, batch: &[EventEnvelope]) -> anyhow::Result<()> {
        let mut acks = Vec::with_capacity(batch.len());
        for e in batch {
            let payload = serde_json::to_vec(e).context("encoding an event")?;
            let msg = jetstream::message::PublishMessage::build()
                .message_id(e.event_id.to_string())
                .header(headers::POSITION, e.position.to_string().as_str())
                .header(headers::STREAM_VERSION, e.version.to_string().as_str())
                .header(headers::EVENT_TYPE, e.event_type.as_str())
                .header(headers::REQUEST_ID, e.correlation_id.to_string().as_str())
                // The request's trace, parent = the handler's span for the command.
                .header(
                    headers::TRACEPARENT,
                    trace::for_event(e.correlation_id, e.causation_id)
                        .to_string()
                        .as_str(),
                )
                .payload(payload.into());
            let ack = self
                .js
                .send_publish(self.subjects.event(&e.stream_id, &e.event_type), msg)
                .await
                .with_context(|| format!("publishing event at position {}", e.position))?;
            acks.push((e.position, ack));
        }
        for (position, ack) in acks {
            ack.await
                .with_context(|| format!("EVENTS did not store position {position}"))?;
        }
        Ok(())
    }
}
