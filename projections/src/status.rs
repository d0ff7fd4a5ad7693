//! Where everything stands: the log's head, the relay, every projector, and
//! every JetStream stream and consumer. Behind `mathia status` and
//! `GET /v1/admin/status`.

use std::time::Duration;

use async_nats::jetstream;
use chrono::{DateTime, Utc};
use events::Subjects;
use futures::StreamExt;
use serde::Serialize;
use sqlx::{PgPool, Row};

/// The whole picture.
#[derive(Debug, Serialize)]
pub struct Status {
    /// The event store's head.
    pub log: Log,
    /// The relay's progress (one row per EVENTS stream it feeds).
    pub relays: Vec<Progress>,
    /// Every projector's progress.
    pub projectors: Vec<Progress>,
    /// JetStream streams and their consumers.
    pub streams: Vec<StreamStatus>,
    /// Events parked per projector (`mathia deadletters list`).
    pub dead_letters: Vec<DeadLetters>,
    /// Rebuilds in progress or interrupted (`mathia replay`).
    pub rebuilds: Vec<Rebuild>,
    /// Human-readable reasons something is stuck; empty when all is well.
    pub stuck: Vec<String>,
}

/// The open dead letters of one projector.
#[derive(Debug, Serialize)]
pub struct DeadLetters {
    /// The projector.
    pub model: String,
    /// Events that failed.
    pub parked: i64,
    /// Later events of their streams, held behind them.
    pub waiting: i64,
    /// Streams held.
    pub streams: i64,
}

/// A rebuild in progress (or interrupted, waiting to be resumed).
#[derive(Debug, Serialize)]
pub struct Rebuild {
    /// The model.
    pub model: String,
    /// The position its shadow tables have reached.
    pub position: i64,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// When it last moved.
    pub updated_at: DateTime<Utc>,
}

/// The head of the event store.
#[derive(Debug, Serialize)]
pub struct Log {
    /// Last position handed out.
    pub head: i64,
    /// When the newest event was decided.
    pub last_event_at: Option<DateTime<Utc>>,
}

/// A reader of the log (relay or projector) and how far behind it is.
#[derive(Debug, Serialize)]
pub struct Progress {
    /// Its name.
    pub name: String,
    /// The position it has reached.
    pub position: i64,
    /// Events it has yet to handle.
    pub lag_events: i64,
    /// Age of the oldest event it has yet to handle.
    pub lag_seconds: f64,
    /// When it last moved.
    pub updated_at: DateTime<Utc>,
    /// Behind, and not moving for longer than the threshold.
    pub stuck: bool,
}

/// One JetStream stream.
#[derive(Debug, Serialize)]
pub struct StreamStatus {
    /// Stream name.
    pub name: String,
    /// Messages held.
    pub messages: u64,
    /// Bytes held.
    pub bytes: u64,
    /// First sequence held.
    pub first_seq: u64,
    /// Last sequence stored.
    pub last_seq: u64,
    /// Its consumers.
    pub consumers: Vec<ConsumerStatus>,
}

/// One durable consumer.
#[derive(Debug, Serialize)]
pub struct ConsumerStatus {
    /// Consumer name.
    pub name: String,
    /// Messages not yet delivered.
    pub num_pending: u64,
    /// Delivered, not yet acknowledged.
    pub num_ack_pending: usize,
    /// Redelivered at least once.
    pub num_redelivered: usize,
    /// Stream sequence below which everything is acknowledged.
    pub ack_floor: u64,
}

async fn progress(
    pool: &PgPool,
    table: &str,
    key: &str,
    head: i64,
    stuck_after: Duration,
) -> Result<Vec<Progress>, sqlx::Error> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT c.{key} AS name, c.position, c.updated_at,
                (SELECT occurred_at FROM events e WHERE e.position = c.position + 1) AS oldest_pending
         FROM {table} c ORDER BY 1"
    )))
    .fetch_all(pool)
    .await?;
    let now = Utc::now();
    Ok(rows
        .into_iter()
        .map(|r| {
            let position: i64 = r.get("position");
            let updated_at: DateTime<Utc> = r.get("updated_at");
            let oldest: Option<DateTime<Utc>> = r.get("oldest_pending");
            let lag_events = (head - position).max(0);
            let idle = (now - updated_at).to_std().unwrap_or_default();
            Progress {
                name: r.get("name"),
                position,
                lag_events,
                lag_seconds: oldest
                    .map_or(0.0, |t| (now - t).num_milliseconds().max(0) as f64 / 1000.0),
                updated_at,
                stuck: lag_events > 0 && idle > stuck_after,
            }
        })
        .collect())
}

/// Gather the status. A reader is stuck when it is behind and has not moved for `stuck_after`.
pub async fn gather(
    pool: &PgPool,
    js: &jetstream::Context,
    subjects: &Subjects,
    stuck_after: Duration,
) -> anyhow::Result<Status> {
    let row = sqlx::query("SELECT h.position, (SELECT occurred_at FROM events WHERE position = h.position) AS at FROM event_log_head h")
        .fetch_one(pool)
        .await?;
    let log = Log {
        head: row.get("position"),
        last_event_at: row.get("at"),
    };
    let relays = progress(pool, "relay_checkpoint", "name", log.head, stuck_after).await?;
    let projectors = progress(pool, "proj_checkpoints", "model", log.head, stuck_after).await?;
    let mut streams = vec![];
    let mut stuck = vec![];
    for name in [subjects.commands_stream(), subjects.events_stream()] {
        let mut stream = match js.get_stream(&name).await {
            Ok(s) => s,
            Err(e) => {
                stuck.push(format!("stream {name} is unavailable: {e}"));
                continue;
            }
        };
        let info = stream.info().await?.clone();
        let mut consumers = vec![];
        let mut list = stream.consumers();
        while let Some(c) = list.next().await {
            let c = c?;
            consumers.push(ConsumerStatus {
                name: c.name,
                num_pending: c.num_pending,
                num_ack_pending: c.num_ack_pending,
                num_redelivered: c.num_redelivered,
                ack_floor: c.ack_floor.stream_sequence,
            });
        }
        consumers.sort_by(|a, b| a.name.cmp(&b.name));
        streams.push(StreamStatus {
            name,
            messages: info.state.messages,
            bytes: info.state.bytes,
            first_seq: info.state.first_sequence,
            last_seq: info.state.last_sequence,
            consumers,
        });
    }
    for p in relays.iter().filter(|p| p.stuck) {
        stuck.push(format!(
            "relay {} is {} events behind and has not moved since {}",
            p.name, p.lag_events, p.updated_at
        ));
    }
    for p in projectors.iter().filter(|p| p.stuck) {
        stuck.push(format!(
            "projector {} is {} events behind and has not moved since {}",
            p.name, p.lag_events, p.updated_at
        ));
    }
    let dead_letters: Vec<DeadLetters> = sqlx::query(
        "SELECT model, count(*) FILTER (WHERE status = 'parked') AS parked,
                count(*) FILTER (WHERE status = 'waiting') AS waiting, count(DISTINCT stream_id) AS streams
         FROM proj_deadletters WHERE status <> 'skipped' GROUP BY model ORDER BY model",
    )
    .fetch_all(pool)
    .await?
    .iter()
    .map(|r| DeadLetters {
        model: r.get("model"),
        parked: r.get("parked"),
        waiting: r.get("waiting"),
        streams: r.get("streams"),
    })
    .collect();
    for d in &dead_letters {
        stuck.push(format!(
            "projector {} has {} parked event(s) holding {} stream(s) ({} waiting): see `mathia deadletters list`",
            d.model, d.parked, d.streams, d.waiting
        ));
    }
    let rebuilds = sqlx::query_as::<_, (String, i64, DateTime<Utc>, DateTime<Utc>)>(
        "SELECT model, position, started_at, updated_at FROM proj_rebuilds ORDER BY model",
    )
    .fetch_all(pool)
    .await?
    .into_iter()
    .map(|(model, position, started_at, updated_at)| Rebuild {
        model,
        position,
        started_at,
        updated_at,
    })
    .collect();
    if relays.is_empty() && log.head > 0 {
        stuck.push("no relay has ever run: nothing reaches EVENTS".into());
    }
    Ok(Status {
        log,
        relays,
        projectors,
        streams,
        dead_letters,
        rebuilds,
        stuck,
    })
}
