//! The Postgres event store.
//!
//! ## The global position is commit-ordered
//! A sequence value is taken at insert but becomes visible at commit, so with
//! concurrent appenders position 11 can be visible before 10 is; a reader that
//! trusts "max position seen" then skips 10 for ever (the bug Marten, Eventuous
//! and Axon shipped). Here [`append`] takes positions from the single row of
//! `event_log_head` with `UPDATE … RETURNING`: the row lock is held until the
//! transaction ends, so the next appender gets its positions only after this one
//! has committed or rolled back. Positions therefore become visible in order and
//! without holes, and a reader can trust the maximum it has seen.
//!
//! The lock is taken last in the transaction (after deciding, loading and the
//! ledger rows are ready), so it is held only for the event insert and the commit;
//! batching many commands per transaction makes that one lock hold serve hundreds
//! of commands.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use commands::{Loaded, State};
use events::{Event, EventEnvelope, StreamId};
use sqlx::{PgConnection, PgPool, Row};
use uuid::Uuid;

/// The Postgres channel notified (with the last position) when events commit.
pub const NOTIFY_CHANNEL: &str = "mathia_events";

/// Write a snapshot whenever a stream's version crosses a multiple of this.
pub const SNAPSHOT_EVERY: i64 = 64;

/// Errors of the event store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another writer appended to one of the streams first (unique `(stream_id, version)`),
    /// or decided the same command first (ledger primary key). Decide again.
    #[error("concurrent write on {constraint}")]
    Conflict {
        /// The unique constraint that was violated.
        constraint: String,
    },
    /// A stored payload does not decode.
    #[error(transparent)]
    Decode(#[from] events::DecodeError),
    /// Any other database error.
    #[error(transparent)]
    Db(sqlx::Error),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        StoreError::from_db(e)
    }
}

impl StoreError {
    /// Map unique-key violations, deadlocks and serialization failures to [`StoreError::Conflict`].
    pub fn from_db(e: sqlx::Error) -> Self {
        if let sqlx::Error::Database(db) = &e
            && matches!(db.code().as_deref(), Some("23505" | "40P01" | "40001"))
        {
            return StoreError::Conflict {
                constraint: db.constraint().unwrap_or("unique key").to_owned(),
            };
        }
        StoreError::Db(e)
    }
}

/// An event ready to append: the decided fact with its metadata.
#[derive(Debug, Clone)]
pub struct PendingEvent {
    /// Its id (`Nats-Msg-Id` when published).
    pub event_id: Uuid,
    /// The stream.
    pub stream_id: StreamId,
    /// The version it must get (the stream's current version + 1 when decided).
    pub version: i64,
    /// The fact.
    pub event: Event,
    /// When it was decided.
    pub occurred_at: DateTime<Utc>,
    /// The originating request.
    pub correlation_id: Uuid,
    /// The command that decided it.
    pub causation_id: Uuid,
    /// Who the command acted for.
    pub actor: Option<Uuid>,
}

/// Append `events` in one statement and return the position of the first.
///
/// Must run inside the caller's transaction, as its last write before commit
/// (see the module doc). Notifies [`NOTIFY_CHANNEL`] on commit.
pub async fn append(tx: &mut PgConnection, events: &[PendingEvent]) -> Result<i64, StoreError> {
    if events.is_empty() {
        let head: i64 = sqlx::query_scalar("SELECT position FROM event_log_head")
            .fetch_one(&mut *tx)
            .await?;
        return Ok(head + 1);
    }
    let n = events.len() as i64;
    let last: i64 =
        sqlx::query_scalar("UPDATE event_log_head SET position = position + $1 RETURNING position")
            .bind(n)
            .fetch_one(&mut *tx)
            .await?;
    let first = last - n + 1;
    let mut positions = Vec::with_capacity(events.len());
    let mut ids = Vec::with_capacity(events.len());
    let mut streams = Vec::with_capacity(events.len());
    let mut versions = Vec::with_capacity(events.len());
    let mut domains = Vec::with_capacity(events.len());
    let mut types = Vec::with_capacity(events.len());
    let mut schemas = Vec::with_capacity(events.len());
    let mut payloads = Vec::with_capacity(events.len());
    let mut times = Vec::with_capacity(events.len());
    let mut correlations = Vec::with_capacity(events.len());
    let mut causations = Vec::with_capacity(events.len());
    let mut actors = Vec::with_capacity(events.len());
    for (i, e) in events.iter().enumerate() {
        positions.push(first + i as i64);
        ids.push(e.event_id);
        streams.push(e.stream_id.as_str().to_owned());
        versions.push(e.version);
        domains.push(e.event.domain());
        types.push(e.event.event_type());
        schemas.push(e.event.schema_version());
        payloads.push(
            serde_json::to_string(&e.event)
                .map_err(|e| StoreError::Db(sqlx::Error::Encode(e.into())))?,
        );
        times.push(e.occurred_at);
        correlations.push(e.correlation_id);
        causations.push(e.causation_id);
        actors.push(e.actor);
    }
    sqlx::query(
        "INSERT INTO events (position, event_id, stream_id, version, domain, event_type, schema_version,
                             payload, occurred_at, correlation_id, causation_id, actor)
         SELECT p, id, s, v, d, t, sv, pl::jsonb, o, c, ca, a
         FROM UNNEST($1::bigint[], $2::uuid[], $3::text[], $4::bigint[], $5::text[], $6::text[], $7::int[],
                     $8::text[], $9::timestamptz[], $10::uuid[], $11::uuid[], $12::uuid[])
              AS u(p, id, s, v, d, t, sv, pl, o, c, ca, a)",
    )
    .bind(&positions)
    .bind(&ids)
    .bind(&streams)
    .bind(&versions)
    .bind(&domains)
    .bind(&types)
    .bind(&schemas)
    .bind(&payloads)
    .bind(&times)
    .bind(&correlations)
    .bind(&causations)
    .bind(&actors)
    .execute(&mut *tx)
    .await
    .map_err(StoreError::from_db)?;
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(NOTIFY_CHANNEL)
        .bind(last.to_string())
        .execute(&mut *tx)
        .await?;
    Ok(first)
}

/// Upsert snapshots for the streams whose new version crossed a multiple of [`SNAPSHOT_EVERY`].
pub async fn save_snapshots(
    tx: &mut PgConnection,
    snaps: &[(StreamId, Loaded)],
) -> Result<(), StoreError> {
    if snaps.is_empty() {
        return Ok(());
    }
    let ids: Vec<&str> = snaps.iter().map(|(s, _)| s.as_str()).collect();
    let versions: Vec<i64> = snaps.iter().map(|(_, l)| l.version).collect();
    let states: Vec<String> = snaps
        .iter()
        .map(|(_, l)| serde_json::to_string(&l.state))
        .collect::<Result<_, _>>()
        .map_err(|e| StoreError::Db(sqlx::Error::Encode(e.into())))?;
    sqlx::query(
        "INSERT INTO snapshots (stream_id, version, state)
         SELECT s, v, st::jsonb FROM UNNEST($1::text[], $2::bigint[], $3::text[]) AS u(s, v, st)
         ON CONFLICT (stream_id) DO UPDATE SET version = excluded.version, state = excluded.state, taken_at = now()
         WHERE snapshots.version < excluded.version",
    )
    .bind(&ids)
    .bind(&versions)
    .bind(&states)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Load the state of each stream: its snapshot, if any, plus the events after it.
/// A stream with no events loads as its domain's empty state at version 0.
pub async fn load_streams(
    pool: &PgPool,
    streams: &[StreamId],
) -> Result<HashMap<StreamId, Loaded>, StoreError> {
    let mut out: HashMap<StreamId, Loaded> = HashMap::with_capacity(streams.len());
    if streams.is_empty() {
        return Ok(out);
    }
    let ids: Vec<&str> = streams.iter().map(|s| s.as_str()).collect();
    for s in streams {
        if let Some(state) = State::empty_for(s) {
            out.insert(s.clone(), Loaded { version: 0, state });
        }
    }
    let snaps =
        sqlx::query("SELECT stream_id, version, state FROM snapshots WHERE stream_id = ANY($1)")
            .bind(&ids)
            .fetch_all(pool)
            .await?;
    for row in snaps {
        let id: String = row.get("stream_id");
        let state: serde_json::Value = row.get("state");
        if let (Ok(stream), Ok(state)) = (
            id.parse::<StreamId>(),
            serde_json::from_value::<State>(state),
        ) {
            out.insert(
                stream,
                Loaded {
                    version: row.get("version"),
                    state,
                },
            );
        }
    }
    // The tail starts after the snapshot *this load decoded* (0 when none, or
    // when it did not decode), never after whatever snapshot exists by now.
    let from: Vec<i64> = streams
        .iter()
        .map(|s| out.get(s).map_or(0, |l| l.version))
        .collect();
    let rows = sqlx::query(
        // One index range per stream, as a LATERAL the planner cannot flatten
        // (its ORDER BY): as a plain join of a few hundred streams it chose a
        // hash join over a sequential scan of the whole log (18 ms at 62,000
        // events, growing with the log).
        "SELECT e.* FROM UNNEST($1::text[], $2::bigint[]) AS w(stream_id, after)
         CROSS JOIN LATERAL (
             SELECT stream_id, version, domain, event_type, payload FROM events
             WHERE stream_id = w.stream_id AND version > w.after
             ORDER BY version) e
         ORDER BY e.stream_id, e.version",
    )
    .bind(&ids)
    .bind(&from)
    .fetch_all(pool)
    .await?;
    for row in rows {
        let id: String = row.get("stream_id");
        let Ok(stream) = id.parse::<StreamId>() else {
            continue;
        };
        let event = Event::decode(
            row.get("domain"),
            row.get("event_type"),
            &row.get::<serde_json::Value, _>("payload"),
        )?;
        if let Some(loaded) = out.get_mut(&stream) {
            loaded.version = row.get("version");
            loaded.state.evolve(&event);
        }
    }
    Ok(out)
}

/// The current version of each stream that has events (read-set validation).
pub async fn stream_versions(
    conn: &mut PgConnection,
    streams: &[&str],
) -> Result<HashMap<String, i64>, StoreError> {
    let rows = sqlx::query(
        "SELECT s AS stream_id, (SELECT max(version) FROM events e WHERE e.stream_id = s) AS version
         FROM UNNEST($1::text[]) AS s",
    )
    .bind(streams)
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows
        .into_iter()
        .filter_map(|r| {
            r.get::<Option<i64>, _>("version")
                .map(|v| (r.get("stream_id"), v))
        })
        .collect())
}

/// The last position handed out (0 when the log is empty).
pub async fn head_position(pool: &PgPool) -> Result<i64, StoreError> {
    Ok(sqlx::query_scalar("SELECT position FROM event_log_head")
        .fetch_one(pool)
        .await?)
}

fn envelope(row: &sqlx::postgres::PgRow) -> Result<EventEnvelope, StoreError> {
    let stream_id: String = row.get("stream_id");
    Ok(EventEnvelope {
        position: row.get("position"),
        event_id: row.get("event_id"),
        stream_id: stream_id
            .parse()
            .map_err(|e: events::StreamIdError| StoreError::Db(sqlx::Error::Decode(e.into())))?,
        version: row.get("version"),
        domain: row.get("domain"),
        event_type: row.get("event_type"),
        schema_version: row.get("schema_version"),
        payload: row.get("payload"),
        occurred_at: row.get("occurred_at"),
        correlation_id: row.get("correlation_id"),
        causation_id: row.get("causation_id"),
        actor: row.get("actor"),
    })
}

const ENVELOPE_COLUMNS: &str = "position, event_id, stream_id, version, domain, event_type, schema_version, payload, occurred_at, correlation_id, causation_id, actor";

/// Events with `after < position <= until`, in position order, at most `limit`;
/// only those of `domains` when given.
pub async fn read_range(
    conn: &mut PgConnection,
    after: i64,
    until: i64,
    limit: i64,
    domains: Option<&[&str]>,
) -> Result<Vec<EventEnvelope>, StoreError> {
    let rows = match domains {
        None => {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {ENVELOPE_COLUMNS} FROM events WHERE position > $1 AND position <= $2 ORDER BY position LIMIT $3"
            )))
            .bind(after)
            .bind(until)
            .bind(limit)
            .fetch_all(&mut *conn)
            .await?
        }
        Some(domains) => {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {ENVELOPE_COLUMNS} FROM events
                 WHERE domain = ANY($4) AND position > $1 AND position <= $2 ORDER BY position LIMIT $3"
            )))
            .bind(after)
            .bind(until)
            .bind(limit)
            .bind(domains)
            .fetch_all(&mut *conn)
            .await?
        }
    };
    rows.iter().map(envelope).collect()
}

/// All events of one stream, in version order.
pub async fn read_stream(
    pool: &PgPool,
    stream: &StreamId,
) -> Result<Vec<EventEnvelope>, StoreError> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {ENVELOPE_COLUMNS} FROM events WHERE stream_id = $1 ORDER BY version"
    )))
    .bind(stream.as_str())
    .fetch_all(pool)
    .await?;
    rows.iter().map(envelope).collect()
}

/// What `mathia events` asks the log for. Every filter is optional.
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    /// Only after this position.
    pub after: i64,
    /// Only this stream.
    pub stream_id: Option<String>,
    /// Only this domain.
    pub domain: Option<String>,
    /// Only this event type.
    pub event_type: Option<String>,
    /// Only events of this request.
    pub correlation_id: Option<uuid::Uuid>,
    /// Only events decided at or after this time.
    pub since: Option<DateTime<Utc>>,
    /// Only events decided before this time.
    pub until: Option<DateTime<Utc>>,
    /// At most this many, oldest first.
    pub limit: i64,
}

/// Events matching `filter`, in position order.
pub async fn query_events(
    pool: &PgPool,
    filter: &EventFilter,
) -> Result<Vec<EventEnvelope>, StoreError> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {ENVELOPE_COLUMNS} FROM events
         WHERE position > $1
           AND ($2::text IS NULL OR stream_id = $2)
           AND ($3::text IS NULL OR domain = $3)
           AND ($4::text IS NULL OR event_type = $4)
           AND ($5::uuid IS NULL OR correlation_id = $5)
           AND ($6::timestamptz IS NULL OR occurred_at >= $6)
           AND ($7::timestamptz IS NULL OR occurred_at < $7)
         ORDER BY position LIMIT $8"
    )))
    .bind(filter.after)
    .bind(&filter.stream_id)
    .bind(&filter.domain)
    .bind(&filter.event_type)
    .bind(filter.correlation_id)
    .bind(filter.since)
    .bind(filter.until)
    .bind(filter.limit.max(1))
    .fetch_all(pool)
    .await?;
    rows.iter().map(envelope).collect()
}

/// One event, by position or by event id.
pub async fn find_event(pool: &PgPool, key: &str) -> Result<Option<EventEnvelope>, StoreError> {
    let row = match (key.parse::<i64>(), key.parse::<uuid::Uuid>()) {
        (Ok(p), _) => {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {ENVELOPE_COLUMNS} FROM events WHERE position = $1"
            )))
            .bind(p)
            .fetch_optional(pool)
            .await?
        }
        (_, Ok(id)) => {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {ENVELOPE_COLUMNS} FROM events WHERE event_id = $1"
            )))
            .bind(id)
            .fetch_optional(pool)
            .await?
        }
        _ => None,
    };
    row.as_ref().map(envelope).transpose()
}
