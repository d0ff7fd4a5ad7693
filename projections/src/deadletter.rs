//! Poison events: an event a projector cannot apply is parked in
//! `proj_deadletters` with its error, the later events of the same stream wait
//! behind it, and every other stream flows on. Behind `mathia deadletters`.
//!
//! The runner applies a batch in one transaction. When the batch fails with an
//! error that is not [`transient`] it rolls back and applies the same range
//! again one event at a time, each under a savepoint: the events that fail are
//! parked (`parked`), the later events of their streams are held (`waiting`),
//! and the checkpoint moves past all of them in the same transaction, so
//! nothing is lost and nothing is applied twice. [`retry`] applies a stream's
//! parked event and then its waiting ones in order; [`skip`] marks the parked
//! event `skipped` (kept as the record) and applies the rest. Both hold the
//! projector's checkpoint row, so they serialise with the running projector.
//!
//! Errors that say nothing about the event are never parked: lost connections,
//! timeouts, serialisation failures and deadlocks are retried (the projector
//! waits), and so are errors that would fail every event alike (undefined table
//! or column: a deploy without its migration), as is a batch in which more than
//! [`MAX_PARKED_PER_BATCH`] events fail — those stop the projector, which
//! `mathia status` then reports as stuck, instead of parking the whole log.

use std::collections::HashSet;

use events::EventEnvelope;
use handlers::store::{self, StoreError};
use serde::Serialize;
use sqlx::{PgConnection, PgPool, Row};

use crate::Projector;

/// More failures than this in one batch is not a poison event but a broken
/// projector or database: stop instead of parking.
pub const MAX_PARKED_PER_BATCH: usize = 20;

/// Whether `e` may go away on its own (retry the batch) rather than being a
/// property of the event (park it).
pub fn transient(e: &anyhow::Error) -> bool {
    for cause in e.chain() {
        if let Some(s) = cause.downcast_ref::<StoreError>() {
            return match s {
                StoreError::Conflict { .. } => true,
                StoreError::Decode(_) => false,
                StoreError::Db(e) => sqlx_transient(e),
            };
        }
        if let Some(e) = cause.downcast_ref::<sqlx::Error>() {
            return sqlx_transient(e);
        }
    }
    false
}

fn sqlx_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            // 08 connection, 40 rollback (serialisation, deadlock), 53 resources,
            // 55 lock not available, 57 operator intervention, 58 system, XX internal;
            // 42 (undefined table/column, syntax) and 0A would fail every event alike.
            ["08", "40", "53", "55", "57", "58", "XX", "42", "0A"]
                .iter()
                .any(|class| code.starts_with(class))
        }
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        _ => false,
    }
}

/// Apply one event under a savepoint: `Ok(None)` when applied, `Ok(Some(error))`
/// when it failed for a reason of its own (rolled back to the savepoint), and
/// `Err` for a [`transient`] failure or a broken connection.
async fn try_apply<P: Projector>(
    tx: &mut PgConnection,
    projector: &P,
    event: &EventEnvelope,
) -> anyhow::Result<Option<anyhow::Error>> {
    sqlx::query("SAVEPOINT one_event").execute(&mut *tx).await?;
    match projector.apply(tx, std::slice::from_ref(event)).await {
        Ok(()) => {
            sqlx::query("RELEASE SAVEPOINT one_event")
                .execute(&mut *tx)
                .await?;
            Ok(None)
        }
        Err(e) if transient(&e) => Err(e),
        Err(e) => {
            sqlx::query("ROLLBACK TO SAVEPOINT one_event")
                .execute(&mut *tx)
                .await?;
            Ok(Some(e))
        }
    }
}

/// Record `event` as parked (with `error`) or waiting (`error` = None).
pub async fn park(
    conn: &mut PgConnection,
    model: &str,
    event: &EventEnvelope,
    error: Option<&str>,
) -> Result<(), sqlx::Error> {
    let status = if error.is_some() { "parked" } else { "waiting" };
    sqlx::query(
        "INSERT INTO proj_deadletters (model, position, stream_id, event_id, event_type, status, error, attempts)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (model, position) DO NOTHING",
    )
    .bind(model)
    .bind(event.position)
    .bind(event.stream_id.as_str())
    .bind(event.event_id)
    .bind(format!("{}.{}", event.domain, event.event_type))
    .bind(status)
    .bind(error)
    .bind(i32::from(error.is_some()))
    .execute(&mut *conn)
    .await?;
    if let Some(error) = error {
        metrics::counter!("mathia_deadletters_parked_total", "projector" => model.to_owned())
            .increment(1);
        tracing::error!(
            projector = model,
            position = event.position,
            stream = event.stream_id.as_str(),
            event_type = %event.event_type,
            error,
            "event parked: the projector cannot apply it; its stream waits (mathia deadletters list)"
        );
    }
    Ok(())
}

/// Apply `events` one by one under savepoints, parking those that fail and
/// holding the later events of their streams. `held` is updated.
pub async fn apply_one_by_one<P: Projector>(
    tx: &mut PgConnection,
    projector: &P,
    events: &[EventEnvelope],
    held: &mut HashSet<String>,
) -> anyhow::Result<()> {
    let model = projector.name();
    let mut parked = 0usize;
    for event in events {
        if held.contains(event.stream_id.as_str()) {
            park(tx, model, event, None).await?;
            continue;
        }
        if let Some(e) = try_apply(tx, projector, event).await? {
            parked += 1;
            if parked > MAX_PARKED_PER_BATCH {
                anyhow::bail!(
                    "more than {MAX_PARKED_PER_BATCH} events of one batch failed (last at position {}: {e:#}); \
                     not parking them: the projector or its database is broken",
                    event.position
                );
            }
            park(tx, model, event, Some(&format!("{e:#}"))).await?;
            held.insert(event.stream_id.as_str().to_owned());
        }
    }
    Ok(())
}

/// One row of `proj_deadletters`.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    /// Its id (`mathia deadletters retry <id>`).
    pub id: i64,
    /// The projector.
    pub model: String,
    /// The event's position in the log.
    pub position: i64,
    /// The event's stream.
    pub stream_id: String,
    /// The event's id.
    pub event_id: uuid::Uuid,
    /// `domain.EventType`.
    pub event_type: String,
    /// `parked` (failed), `waiting` (behind a parked event of its stream) or `skipped`.
    pub status: String,
    /// Why it failed (parked and skipped events).
    pub error: Option<String>,
    /// How many times applying it failed.
    pub attempts: i32,
    /// When it was parked.
    pub parked_at: chrono::DateTime<chrono::Utc>,
}

/// Dead letters, oldest first; skipped ones only with `include_skipped`.
pub async fn list(
    pool: &PgPool,
    model: Option<&str>,
    include_skipped: bool,
) -> Result<Vec<DeadLetter>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT id, model, position, stream_id, event_id, event_type, status, error, attempts, parked_at
         FROM proj_deadletters
         WHERE ($1::text IS NULL OR model = $1) AND ($2 OR status <> 'skipped')
         ORDER BY model, position",
    )
    .bind(model)
    .bind(include_skipped)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .iter()
        .map(|r| DeadLetter {
            id: r.get("id"),
            model: r.get("model"),
            position: r.get("position"),
            stream_id: r.get("stream_id"),
            event_id: r.get("event_id"),
            event_type: r.get("event_type"),
            status: r.get("status"),
            error: r.get("error"),
            attempts: r.get("attempts"),
            parked_at: r.get("parked_at"),
        })
        .collect())
}

/// The model a dead letter belongs to, if it exists.
pub async fn model_of(pool: &PgPool, id: i64) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT model FROM proj_deadletters WHERE id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await
}

/// What [`retry`] or [`skip`] did.
#[derive(Debug, Clone, Serialize)]
pub struct Settled {
    /// Events applied now.
    pub applied: usize,
    /// Events marked skipped.
    pub skipped: usize,
    /// The event that still fails, if one does (the rest of its stream keeps waiting).
    pub still_parked: Option<DeadLetter>,
}

/// Apply the parked event `id` again, then the waiting events of its stream in order.
pub async fn retry<P: Projector>(pool: &PgPool, projector: &P, id: i64) -> anyhow::Result<Settled> {
    settle(pool, projector, id, false).await
}

/// Mark the parked event `id` skipped, then apply the waiting events of its stream in order.
pub async fn skip<P: Projector>(pool: &PgPool, projector: &P, id: i64) -> anyhow::Result<Settled> {
    settle(pool, projector, id, true).await
}

async fn settle<P: Projector>(
    pool: &PgPool,
    projector: &P,
    id: i64,
    skip_first: bool,
) -> anyhow::Result<Settled> {
    let model = projector.name();
    let mut tx = pool.begin().await?;
    // Serialise with the running projector (it holds this row while it applies).
    sqlx::query("SELECT position FROM proj_checkpoints WHERE model = $1 FOR UPDATE")
        .bind(model)
        .fetch_optional(&mut *tx)
        .await?;
    let row = sqlx::query(
        "SELECT stream_id, status FROM proj_deadletters WHERE id = $1 AND model = $2 FOR UPDATE",
    )
    .bind(id)
    .bind(model)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(row) = row else {
        anyhow::bail!("no dead letter {id} of projector {model}");
    };
    let (stream, status): (String, String) = (row.get("stream_id"), row.get("status"));
    if status != "parked" {
        anyhow::bail!(
            "dead letter {id} is {status}, not parked: settle the parked event of stream {stream} first"
        );
    }
    let queue: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT id, position FROM proj_deadletters
         WHERE model = $1 AND stream_id = $2 AND status <> 'skipped' ORDER BY position FOR UPDATE",
    )
    .bind(model)
    .bind(&stream)
    .fetch_all(&mut *tx)
    .await?;
    let mut done = Settled {
        applied: 0,
        skipped: 0,
        still_parked: None,
    };
    for (i, (row_id, position)) in queue.into_iter().enumerate() {
        if i == 0 && skip_first {
            sqlx::query(
                "UPDATE proj_deadletters SET status = 'skipped', updated_at = now() WHERE id = $1",
            )
            .bind(row_id)
            .execute(&mut *tx)
            .await?;
            done.skipped += 1;
            continue;
        }
        let events = store::read_range(&mut tx, position - 1, position, 1, None).await?;
        let Some(event) = events.first() else {
            anyhow::bail!("position {position} is not in the event store");
        };
        match try_apply(&mut tx, projector, event).await? {
            None => {
                sqlx::query("DELETE FROM proj_deadletters WHERE id = $1")
                    .bind(row_id)
                    .execute(&mut *tx)
                    .await?;
                done.applied += 1;
            }
            Some(e) => {
                sqlx::query(
                    "UPDATE proj_deadletters SET status = 'parked', error = $2, attempts = attempts + 1,
                            updated_at = now() WHERE id = $1",
                )
                .bind(row_id)
                .bind(format!("{e:#}"))
                .execute(&mut *tx)
                .await?;
                break;
            }
        }
    }
    tx.commit().await?;
    done.still_parked = list(pool, Some(model), false)
        .await?
        .into_iter()
        .find(|d| d.stream_id == stream && d.status == "parked");
    Ok(done)
}
