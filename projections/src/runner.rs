//! Runs one projector: consumer wake-ups, catch-up from the store, checkpoint in the same transaction.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use events::{Subjects, headers};
use futures::StreamExt;
use handlers::{bus, store};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::{Projector, deadletter};

/// Most events applied in one transaction.
const BATCH: i64 = 2000;
/// How often a silent projector checks the head of the log.
const TICK: Duration = Duration::from_millis(250);

/// What a projector needs to run.
#[derive(Clone)]
pub struct Runner {
    /// The event store and read models.
    pub pool: PgPool,
    /// JetStream.
    pub js: jetstream::Context,
    /// Subject and stream names.
    pub subjects: Subjects,
}

impl Runner {
    /// Run `projector` until `shutdown`.
    pub async fn run<P: Projector>(
        self,
        projector: Arc<P>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let name = projector.name();
        sqlx::query(
            "INSERT INTO proj_checkpoints (model, position) VALUES ($1, 0) ON CONFLICT DO NOTHING",
        )
        .bind(name)
        .execute(&self.pool)
        .await?;
        // Catch up with the store first: the stream may no longer hold what we missed.
        let head = store::head_position(&self.pool).await?;
        self.catch_up(&*projector, head).await?;
        let config = bus::projector_consumer_config(&self.subjects, name, projector.domains())?;
        tracing::info!(projector = name, "projector started");
        while !shutdown.is_cancelled() {
            // (Re)create the consumer whenever pulling fails, so a deleted consumer
            // or a recreated stream heals on its own; meanwhile the store is the source.
            let pulled = match bus::ensure_consumer(
                &self.js,
                &self.subjects.events_stream(),
                config.clone(),
            )
            .await
            {
                Ok(consumer) => consumer
                    .stream()
                    .max_messages_per_batch(BATCH as usize)
                    .heartbeat(Duration::from_secs(5))
                    .expires(Duration::from_secs(30))
                    .messages()
                    .await
                    .map_err(anyhow::Error::from),
                Err(e) => Err(e),
            };
            let messages = match pulled {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(
                        projector = name,
                        error = format!("{e:#}"),
                        "cannot pull from EVENTS; catching up from the store"
                    );
                    self.tick(&*projector).await;
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                    continue;
                }
            };
            let mut chunks = messages.ready_chunks(BATCH as usize);
            let mut ticker = tokio::time::interval(TICK);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = ticker.tick() => self.tick(&*projector).await,
                    chunk = chunks.next() => {
                        let Some(chunk) = chunk else { break };
                        let mut up_to = 0i64;
                        let mut msgs = Vec::with_capacity(chunk.len());
                        let mut broken = false;
                        for m in chunk {
                            match m {
                                Ok(m) => {
                                    let pos = m.headers.as_ref()
                                        .and_then(|h| h.get(headers::POSITION))
                                        .and_then(|v| v.as_str().parse::<i64>().ok())
                                        .unwrap_or(0);
                                    up_to = up_to.max(pos);
                                    msgs.push(m);
                                }
                                Err(e) => {
                                    tracing::warn!(projector = name, error = %e, "EVENTS pull stream failed; reopening");
                                    broken = true;
                                }
                            }
                        }
                        match self.catch_up(&*projector, up_to).await {
                            Ok(()) => {
                                // Ack-all: acking the last acks the batch (the store, not the
                                // messages, is what gets applied, so this loses nothing).
                                if let Some(last) = msgs.last() {
                                    let _ = last.ack().await;
                                }
                            }
                            Err(e) => {
                                tracing::error!(projector = name, error = format!("{e:#}"), "projection failed; will retry");
                                for m in msgs {
                                    let _ = m.ack_with(jetstream::AckKind::Nak(Some(Duration::from_secs(1)))).await;
                                }
                                tokio::time::sleep(Duration::from_millis(500)).await;
                            }
                        }
                        if broken { break; }
                    }
                }
            }
        }
        Ok(())
    }

    async fn tick<P: Projector>(&self, projector: &P) {
        let result = async {
            let head = store::head_position(&self.pool).await?;
            self.catch_up(projector, head).await
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(
                projector = projector.name(),
                error = format!("{e:#}"),
                "catch-up failed; will retry"
            );
        }
    }

    /// Apply everything of the projector's domains up to `up_to`, in batches,
    /// each in one transaction with the checkpoint. An event that cannot be
    /// applied is parked (see [`deadletter`]) and only its stream waits.
    pub async fn catch_up<P: Projector>(&self, projector: &P, up_to: i64) -> anyhow::Result<()> {
        let mut one_by_one = false;
        loop {
            let mut tx = begin_derived(&self.pool).await?;
            // The row lock serialises instances of the same projector (and
            // `mathia deadletters`, and the swap of a rebuild).
            // One round trip: the checkpoint, the head of the log (never go past it:
            // a position announced by the bus that the store does not have, after a
            // restore, must not move the checkpoint) and the streams held behind a
            // parked event (see `deadletter`).
            let (checkpoint, head, held): (i64, i64, Vec<String>) = sqlx::query_as(
                "SELECT c.position, h.position,
                        ARRAY(SELECT DISTINCT d.stream_id FROM proj_deadletters d
                              WHERE d.model = $1 AND d.status <> 'skipped')
                 FROM proj_checkpoints c, event_log_head h WHERE c.model = $1 FOR UPDATE OF c",
            )
            .bind(projector.name())
            .fetch_one(&mut *tx)
            .await?;
            let up_to = up_to.min(head);
            if checkpoint >= up_to {
                return Ok(());
            }
            // Go to the head (it only moves by whole transactions), so a batch never
            // ends inside one command's events, e.g. between a transfer's two legs.
            let mut until = head.min(checkpoint + BATCH);
            if until < head {
                until = command_boundary(&mut tx, checkpoint, until).await?;
            }
            let events =
                store::read_range(&mut tx, checkpoint, until, BATCH, Some(projector.domains()))
                    .await?;
            if !events.is_empty() {
                let mut held: HashSet<String> = held.into_iter().collect();
                if one_by_one {
                    deadletter::apply_one_by_one(&mut tx, projector, &events, &mut held).await?;
                    one_by_one = false;
                } else {
                    let (ready, waiting): (Vec<_>, Vec<_>) = events
                        .iter()
                        .cloned()
                        .partition(|e| !held.contains(e.stream_id.as_str()));
                    let span =
                        crate::links::batch_span(projector.name(), checkpoint, until, &ready);
                    if !ready.is_empty()
                        && let Err(e) = projector.apply(&mut tx, &ready).instrument(span).await
                    {
                        if deadletter::transient(&e) {
                            return Err(e);
                        }
                        // Some event of this batch cannot be applied: roll back and
                        // go through the same range one event at a time.
                        tracing::warn!(
                            projector = projector.name(),
                            error = format!("{e:#}"),
                            "batch failed; applying it one event at a time to find the poison event"
                        );
                        drop(tx);
                        one_by_one = true;
                        continue;
                    }
                    for event in &waiting {
                        deadletter::park(&mut tx, projector.name(), event, None).await?;
                    }
                }
            }
            sqlx::query(
                "UPDATE proj_checkpoints SET position = $2, updated_at = now() WHERE model = $1",
            )
            .bind(projector.name())
            .bind(until)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            metrics::counter!("mathia_projected_events_total", "projector" => projector.name())
                .increment(events.len() as u64);
            metrics::gauge!("mathia_projector_position", "projector" => projector.name())
                .set(until as f64);
            if until >= up_to {
                return Ok(());
            }
        }
    }
}

/// Begin a transaction that writes only state derived from the event store,
/// committed asynchronously (in the same round trip as `BEGIN`).
///
/// A read model's rows and its checkpoint commit together, so a crash that
/// loses the last commits (Postgres' `synchronous_commit = off`: the WAL flush
/// is not waited for, nothing is ever half applied) only sends the projector
/// back to an earlier checkpoint, to apply the same events again and reach the
/// same rows. The event store's own writes stay synchronous.
pub async fn begin_derived(
    pool: &PgPool,
) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, sqlx::Error> {
    pool.begin_with("BEGIN; SET LOCAL synchronous_commit = off")
        .await
}

/// The greatest position ≤ `until` (and > `after`) that ends a command's run
/// of events: when the event after `until` was decided by the same command as
/// the one at `until`, step back before that command's first event in range.
/// (A command whose events alone exceed the range keeps `until`.)
async fn command_boundary(
    tx: &mut sqlx::PgConnection,
    after: i64,
    until: i64,
) -> Result<i64, sqlx::Error> {
    let start: Option<i64> = sqlx::query_scalar(
        "SELECT min(e.position) FROM events e
         WHERE e.position > $1 AND e.position <= $2
           AND e.causation_id = (SELECT causation_id FROM events WHERE position = $2 + 1)
           AND EXISTS (SELECT 1 FROM events x WHERE x.position = $2 AND x.causation_id = e.causation_id)",
    )
    .bind(after)
    .bind(until)
    .fetch_one(&mut *tx)
    .await?;
    Ok(match start {
        Some(first) if first - 1 > after => first - 1,
        _ => until,
    })
}
