//! Rebuilding a read model without downtime: `mathia replay`.
//!
//! A rebuild copies the shape of the projector's [`tables`](Projector::tables)
//! (columns, constraints, indexes, same names) into a shadow schema
//! `mathia_rebuild_<model>` and fills it from the event log with the projector's
//! own `apply`, run with `search_path` set to the shadow schema first: the
//! projector's SQL is unchanged and its reads of tables it does not own (keys,
//! users) still reach the live ones. Each batch moves `proj_rebuilds.position`
//! in the same transaction as the shadow rows, so a rebuild that is
//! interrupted resumes where it stopped. Meanwhile the live tables keep serving
//! and the live projector keeps running; nobody reads the shadow schema.
//!
//! The swap is one transaction: it takes the live projector's checkpoint row
//! (the live projector pauses), brings the shadow to the head of the log, locks
//! the live tables (`lock_timeout` bounded, retried), moves them out and the
//! shadow ones in (`ALTER TABLE … SET SCHEMA`), sets the checkpoint to the
//! shadow's position with a new epoch (realtime cursors of the old generation
//! are refused), and drops the old tables. A reader sees the old tables or the
//! new ones, never a half-built one. A dry run brings the shadow to exactly the
//! live checkpoint instead, compares every table row for row, reports the
//! differences and throws the shadow away.
//!
//! Reactors (empty `tables()`) cannot be rebuilt: their rows trigger side
//! effects, which must never fire again. Events parked for the live projector
//! ([`crate::deadletter`]) are left out of the rebuild as they are out of the
//! live model.

use std::time::{Duration, Instant};

use handlers::store;
use serde::Serialize;
use sqlx::{PgConnection, PgPool, Row};

use crate::Projector;

/// Most events applied in one rebuild transaction.
const BATCH: i64 = 5000;
/// Differing rows shown per table and side in a dry run.
const SAMPLES: i64 = 3;

/// How a rebuild runs.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Start after this position instead of 0 (a new rebuild only; events at or
    /// before it are left out of the rebuilt model).
    pub from: Option<i64>,
    /// Compare with the live model and discard the shadow instead of swapping.
    pub dry_run: bool,
    /// Throw away an interrupted rebuild of this model and start again.
    pub restart: bool,
    /// Stop (resumably) once this many events have been applied in this run.
    pub max_events: Option<u64>,
    /// Events per transaction (default 5,000).
    pub batch: Option<i64>,
}

/// Where a running rebuild stands (for a progress bar).
#[derive(Debug, Clone)]
pub struct Progress {
    /// The model.
    pub model: &'static str,
    /// Position the shadow has reached.
    pub position: i64,
    /// The head of the log it is heading for.
    pub target: i64,
    /// The position it started from (this run).
    pub started_at: i64,
    /// Events applied in this run.
    pub events: u64,
    /// Events per second over this run.
    pub rate: f64,
    /// Time since this run started.
    pub elapsed: Duration,
}

/// How a rebuild ended.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// The rebuilt tables replaced the live ones.
    Swapped {
        /// The model.
        model: &'static str,
        /// The checkpoint the new tables stand at.
        position: i64,
        /// The model's new epoch.
        epoch: i64,
        /// Events applied in this run.
        events: u64,
        /// Events per second over this run.
        rate: f64,
        /// Whether it continued an interrupted rebuild.
        resumed: bool,
    },
    /// A dry run: the rebuilt tables compared with the live ones, then dropped.
    DryRun {
        /// The model.
        model: &'static str,
        /// The position both were compared at.
        position: i64,
        /// One entry per table.
        tables: Vec<TableDiff>,
        /// Events applied in this run.
        events: u64,
        /// Events per second over this run.
        rate: f64,
    },
    /// Stopped after `max_events`; run again to resume.
    Paused {
        /// The model.
        model: &'static str,
        /// Position the shadow has reached.
        position: i64,
        /// Events applied in this run.
        events: u64,
    },
}

/// Differences between a live table and its rebuild.
#[derive(Debug, Clone, Serialize)]
pub struct TableDiff {
    /// The table.
    pub table: &'static str,
    /// Rows in the live table.
    pub live_rows: i64,
    /// Rows in the rebuilt table.
    pub rebuilt_rows: i64,
    /// Rows only the live table has (counting duplicates).
    pub only_live: i64,
    /// Rows only the rebuilt table has.
    pub only_rebuilt: i64,
    /// A few rows only the live table has, as JSON.
    pub samples_live: Vec<serde_json::Value>,
    /// A few rows only the rebuilt table has, as JSON.
    pub samples_rebuilt: Vec<serde_json::Value>,
}

impl Outcome {
    /// A dry run that found a difference.
    pub fn differs(&self) -> bool {
        match self {
            Outcome::DryRun { tables, .. } => {
                tables.iter().any(|t| t.only_live > 0 || t.only_rebuilt > 0)
            }
            _ => false,
        }
    }
}

/// The shadow schema of `model`.
pub fn shadow_schema(model: &str) -> String {
    format!("mathia_rebuild_{}", model.replace('-', "_"))
}

fn retired_schema(model: &str) -> String {
    format!("mathia_retired_{}", model.replace('-', "_"))
}

fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `SET LOCAL search_path` to `schemas`, first match wins.
async fn search_path(tx: &mut PgConnection, schemas: &[&str]) -> Result<(), sqlx::Error> {
    let list: Vec<String> = schemas.iter().map(|s| ident(s)).collect();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "SET LOCAL search_path TO {}",
        list.join(", ")
    )))
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Rebuild `projector`'s read model (see the module doc).
pub async fn rebuild<P: Projector>(
    pool: &PgPool,
    projector: &P,
    options: &Options,
    mut progress: impl FnMut(&Progress),
) -> anyhow::Result<Outcome> {
    let model = projector.name();
    if projector.tables().is_empty() {
        anyhow::bail!(
            "{model} is a reactor (its rows trigger side effects, which must not fire again): it cannot be rebuilt"
        );
    }
    let shadow = shadow_schema(model);
    let live: String = sqlx::query_scalar("SELECT current_schema()")
        .fetch_one(pool)
        .await?;
    let existing: Option<(i64, i64)> =
        sqlx::query_as("SELECT from_position, position FROM proj_rebuilds WHERE model = $1")
            .bind(model)
            .fetch_optional(pool)
            .await?;
    if existing.is_some() && (options.restart || options.from.is_some()) {
        discard(pool, model).await?;
    }
    let resumed = existing.is_some() && !options.restart && options.from.is_none();
    if !resumed {
        create_shadow(pool, projector, &live, &shadow, options.from.unwrap_or(0)).await?;
    }

    // Fill the shadow up to the head, batch by batch, while everything serves.
    let started = Instant::now();
    let start_position: i64 =
        sqlx::query_scalar("SELECT position FROM proj_rebuilds WHERE model = $1")
            .bind(model)
            .fetch_one(pool)
            .await?;
    let mut events = 0u64;
    loop {
        let target = store::head_position(pool).await?;
        let mut tx = pool.begin().await?;
        let batch = options.batch.unwrap_or(BATCH).max(1);
        let (reached, n) = step(&mut tx, projector, &shadow, &live, target, batch).await?;
        tx.commit().await?;
        let position = reached;
        events += n;
        let rate = events as f64 / started.elapsed().as_secs_f64().max(1e-3);
        progress(&Progress {
            model,
            position,
            target,
            started_at: start_position,
            events,
            rate,
            elapsed: started.elapsed(),
        });
        if options.max_events.is_some_and(|max| events >= max) && position < target {
            return Ok(Outcome::Paused {
                model,
                position,
                events,
            });
        }
        // Caught up with the head as it was: what came since is applied inside the swap.
        if position >= target {
            break;
        }
    }

    build_deferred(pool, projector, &live, &shadow).await?;

    if options.dry_run {
        let outcome = compare(pool, projector, &live, &shadow).await;
        discard(pool, model).await?;
        let (position, tables) = outcome?;
        let rate = events as f64 / started.elapsed().as_secs_f64().max(1e-3);
        return Ok(Outcome::DryRun {
            model,
            position,
            tables,
            events,
            rate,
        });
    }

    let mut attempt = 0;
    let (position, epoch, n) = loop {
        attempt += 1;
        match swap(pool, projector, &live, &shadow).await {
            Ok(done) => break done,
            // Readers hold the live tables longer than the lock timeout, or a
            // deadlock with one of them: let them finish and try again.
            Err(e) if attempt < 20 && crate::deadletter::transient(&e) => {
                tracing::warn!(
                    projector = model,
                    error = format!("{e:#}"),
                    "swap: retrying"
                );
                tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
            }
            Err(e) => return Err(e),
        }
    };
    events += n;
    Ok(Outcome::Swapped {
        model,
        position,
        epoch,
        events,
        rate: events as f64 / started.elapsed().as_secs_f64().max(1e-3),
        resumed,
    })
}

/// Drop an interrupted (or dry-run) rebuild of `model`.
pub async fn discard(pool: &PgPool, model: &str) -> anyhow::Result<()> {
    let mut tx = pool.begin().await?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "SET LOCAL client_min_messages = warning; DROP SCHEMA IF EXISTS {} CASCADE",
        ident(&shadow_schema(model))
    )))
    .execute(&mut *tx)
    .await?;
    sqlx::query("DELETE FROM proj_rebuilds WHERE model = $1")
        .bind(model)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

/// The shadow schema: every table of the model with the live one's columns,
/// defaults, constraints and indexes under the same names, and no rows.
async fn create_shadow<P: Projector>(
    pool: &PgPool,
    projector: &P,
    live: &str,
    shadow: &str,
    from: i64,
) -> anyhow::Result<()> {
    let model = projector.name();
    let mut tx = pool.begin().await?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "SET LOCAL client_min_messages = warning; DROP SCHEMA IF EXISTS {0} CASCADE; CREATE SCHEMA {0}",
        ident(shadow)
    )))
    .execute(&mut *tx)
    .await?;
    for table in projector.tables() {
        let live_table = format!("{}.{}", ident(live), ident(table));
        let shadow_table = format!("{}.{}", ident(shadow), ident(table));
        let triggers: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = $1::regclass AND NOT tgisinternal",
        )
        .bind(&live_table)
        .fetch_one(&mut *tx)
        .await?;
        if triggers > 0 {
            anyhow::bail!("{live_table} has triggers; a rebuild would not copy them");
        }
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "CREATE TABLE {shadow_table} (LIKE {live_table} INCLUDING DEFAULTS INCLUDING GENERATED
             INCLUDING IDENTITY INCLUDING STORAGE INCLUDING COMMENTS INCLUDING COMPRESSION)"
        )))
        .execute(&mut *tx)
        .await?;
        // Storage parameters (a hot counter table's fillfactor) are not LIKE's to copy.
        let options: Option<String> = sqlx::query_scalar(
            "SELECT array_to_string(reloptions, ', ') FROM pg_class WHERE oid = $1::regclass",
        )
        .bind(&live_table)
        .fetch_one(&mut *tx)
        .await?;
        if let Some(options) = options.filter(|o| !o.is_empty()) {
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "ALTER TABLE {shadow_table} SET ({options})"
            )))
            .execute(&mut *tx)
            .await?;
        }
        // Constraints (primary key first: it names its index) and the other indexes,
        // with the live names, so the swapped-in tables are indistinguishable.
        let constraints = sqlx::query(
            "SELECT conname, pg_get_constraintdef(oid) AS def FROM pg_constraint
             WHERE conrelid = $1::regclass AND contype IN ('p', 'u', 'c', 'x')
             ORDER BY contype = 'p' DESC, conname",
        )
        .bind(&live_table)
        .fetch_all(&mut *tx)
        .await?;
        for c in constraints {
            let (name, def): (String, String) = (c.get("conname"), c.get("def"));
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "ALTER TABLE {shadow_table} ADD CONSTRAINT {} {def}",
                ident(&name)
            )))
            .execute(&mut *tx)
            .await?;
        }
        copy_indexes(&mut tx, live, shadow, table, |name| {
            !projector.deferred_indexes().contains(&name)
        })
        .await?;
    }
    if let Some(seed) = projector.shadow_seed() {
        search_path(&mut *tx, &[shadow, live]).await?;
        sqlx::query(sqlx::AssertSqlSafe(seed.to_owned()))
            .bind(from)
            .execute(&mut *tx)
            .await?;
        search_path(&mut *tx, &[live]).await?;
    }
    sqlx::query(
        "INSERT INTO proj_rebuilds (model, shadow_schema, from_position, position) VALUES ($1, $2, $3, $3)",
    )
    .bind(model)
    .bind(shadow)
    .bind(from)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    tracing::info!(
        projector = model,
        shadow,
        from,
        "rebuild: shadow tables created"
    );
    Ok(())
}

/// Create on the shadow copy of `table` the live table's indexes that are not
/// constraints' and that `wanted` picks by name, with the live definitions and
/// names (`IF NOT EXISTS`: a resumed rebuild may already have some).
async fn copy_indexes(
    tx: &mut PgConnection,
    live: &str,
    shadow: &str,
    table: &str,
    wanted: impl Fn(&str) -> bool,
) -> anyhow::Result<()> {
    let live_table = format!("{}.{}", ident(live), ident(table));
    let shadow_table = format!("{}.{}", ident(shadow), ident(table));
    let indexes: Vec<(String, String)> = sqlx::query_as(
        "SELECT c.relname::text, pg_get_indexdef(i.indexrelid) FROM pg_index i
         JOIN pg_class c ON c.oid = i.indexrelid
         WHERE i.indrelid = $1::regclass
           AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = i.indexrelid)",
    )
    .bind(&live_table)
    .fetch_all(&mut *tx)
    .await?;
    // `CREATE [UNIQUE] INDEX name ON schema.table USING …`: the same index on the shadow table.
    let qualified: String = sqlx::query_scalar("SELECT $1::regclass::text")
        .bind(&live_table)
        .fetch_one(&mut *tx)
        .await?;
    let on_live = format!(" ON {qualified} USING ");
    let on_live_full = format!(" ON {live}.{table} USING ");
    for (_, def) in indexes.into_iter().filter(|(name, _)| wanted(name)) {
        let redirected = if def.contains(&on_live_full) {
            def.replacen(&on_live_full, &format!(" ON {shadow_table} USING "), 1)
        } else if def.contains(&on_live) {
            def.replacen(&on_live, &format!(" ON {shadow_table} USING "), 1)
        } else {
            anyhow::bail!("cannot copy index of {live_table}: {def}");
        };
        let redirected = redirected.replacen(" INDEX ", " INDEX IF NOT EXISTS ", 1);
        sqlx::raw_sql(sqlx::AssertSqlSafe(redirected))
            .execute(&mut *tx)
            .await?;
    }
    Ok(())
}

/// Build the projector's deferred indexes on the filled shadow.
async fn build_deferred<P: Projector>(
    pool: &PgPool,
    projector: &P,
    live: &str,
    shadow: &str,
) -> anyhow::Result<()> {
    let deferred = projector.deferred_indexes();
    if deferred.is_empty() {
        return Ok(());
    }
    let mut tx = pool.begin().await?;
    // A sorted build in memory rather than in temporary files.
    sqlx::raw_sql("SET LOCAL maintenance_work_mem = '256MB'")
        .execute(&mut *tx)
        .await?;
    for table in projector.tables() {
        copy_indexes(&mut tx, live, shadow, table, |name| {
            deferred.contains(&name)
        })
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Apply one batch of events after the shadow's position, up to `target`, into
/// the shadow; returns (position reached, events applied).
async fn step<P: Projector>(
    tx: &mut PgConnection,
    projector: &P,
    shadow: &str,
    live: &str,
    target: i64,
    batch: i64,
) -> anyhow::Result<(i64, u64)> {
    let position: i64 =
        sqlx::query_scalar("SELECT position FROM proj_rebuilds WHERE model = $1 FOR UPDATE")
            .bind(projector.name())
            .fetch_one(&mut *tx)
            .await?;
    if position >= target {
        return Ok((position, 0));
    }
    let mut events =
        store::read_range(tx, position, target, batch, Some(projector.domains())).await?;
    let reached = if events.len() as i64 == batch {
        events.last().map_or(target, |e| e.position)
    } else {
        target
    };
    // What the live projector parked (or skipped) stays out, as it is out of the live model.
    let parked: Vec<i64> = sqlx::query_scalar(
        "SELECT position FROM proj_deadletters WHERE model = $1 AND position > $2 AND position <= $3",
    )
    .bind(projector.name())
    .bind(position)
    .bind(reached)
    .fetch_all(&mut *tx)
    .await?;
    events.retain(|e| !parked.contains(&e.position));
    if !events.is_empty() {
        search_path(&mut *tx, &[shadow, live]).await?;
        projector.apply(tx, &events).await.map_err(|e| {
            e.context(format!(
                "rebuild of {}: cannot apply the events after position {position}",
                projector.name()
            ))
        })?;
        search_path(&mut *tx, &[live]).await?;
    }
    sqlx::query("UPDATE proj_rebuilds SET position = $2, updated_at = now() WHERE model = $1")
        .bind(projector.name())
        .bind(reached)
        .execute(&mut *tx)
        .await?;
    Ok((reached, events.len() as u64))
}

/// Bring the shadow to `target` inside `tx`.
async fn catch_up_to<P: Projector>(
    tx: &mut PgConnection,
    projector: &P,
    shadow: &str,
    live: &str,
    target: i64,
) -> anyhow::Result<u64> {
    let mut n = 0;
    loop {
        let (reached, applied) = step(tx, projector, shadow, live, target, BATCH).await?;
        n += applied;
        if reached >= target {
            return Ok(n);
        }
    }
}

/// The swap transaction (see the module doc): (position, epoch, events applied).
async fn swap<P: Projector>(
    pool: &PgPool,
    projector: &P,
    live: &str,
    shadow: &str,
) -> anyhow::Result<(i64, i64, u64)> {
    let model = projector.name();
    let mut tx = pool.begin().await?;
    sqlx::query("SET LOCAL lock_timeout = '2s'")
        .execute(&mut *tx)
        .await?;
    // The live projector pauses here (it takes this row for every batch).
    sqlx::query("SELECT position FROM proj_checkpoints WHERE model = $1 FOR UPDATE")
        .bind(model)
        .fetch_optional(&mut *tx)
        .await?;
    let head: i64 = sqlx::query_scalar("SELECT position FROM event_log_head")
        .fetch_one(&mut *tx)
        .await?;
    let n = catch_up_to(&mut tx, projector, shadow, live, head).await?;
    let tables = projector.tables();
    let live_tables: Vec<String> = tables
        .iter()
        .map(|t| format!("{}.{}", ident(live), ident(t)))
        .collect();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "LOCK TABLE {} IN ACCESS EXCLUSIVE MODE",
        live_tables.join(", ")
    )))
    .execute(&mut *tx)
    .await?;
    let retired = retired_schema(model);
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "SET LOCAL client_min_messages = warning; DROP SCHEMA IF EXISTS {0} CASCADE; CREATE SCHEMA {0}",
        ident(&retired)
    )))
    .execute(&mut *tx)
    .await?;
    for table in tables {
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "ALTER TABLE {}.{t} SET SCHEMA {}; ALTER TABLE {}.{t} SET SCHEMA {}",
            ident(live),
            ident(&retired),
            ident(shadow),
            ident(live),
            t = ident(table),
        )))
        .execute(&mut *tx)
        .await?;
    }
    let epoch: i64 = sqlx::query_scalar(
        "INSERT INTO proj_checkpoints (model, position, epoch) VALUES ($1, $2, 2)
         ON CONFLICT (model) DO UPDATE SET position = $2, epoch = proj_checkpoints.epoch + 1, updated_at = now()
         RETURNING epoch",
    )
    .bind(model)
    .bind(head)
    .fetch_one(&mut *tx)
    .await?;
    sqlx::query("DELETE FROM proj_rebuilds WHERE model = $1")
        .bind(model)
        .execute(&mut *tx)
        .await?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "SET LOCAL client_min_messages = warning; DROP SCHEMA {} CASCADE; DROP SCHEMA {}",
        ident(&retired),
        ident(shadow)
    )))
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    tracing::info!(
        projector = model,
        position = head,
        epoch,
        "rebuild: swapped in"
    );
    Ok((head, epoch, n))
}

/// Bring the shadow to exactly the live checkpoint and compare every table.
async fn compare<P: Projector>(
    pool: &PgPool,
    projector: &P,
    live: &str,
    shadow: &str,
) -> anyhow::Result<(i64, Vec<TableDiff>)> {
    let model = projector.name();
    for _ in 0..600 {
        let mut tx = pool.begin().await?;
        // Holding the checkpoint row keeps the live model still while comparing.
        let checkpoint: i64 =
            sqlx::query_scalar("SELECT position FROM proj_checkpoints WHERE model = $1 FOR UPDATE")
                .bind(model)
                .fetch_optional(&mut *tx)
                .await?
                .unwrap_or(0);
        let reached: i64 =
            sqlx::query_scalar("SELECT position FROM proj_rebuilds WHERE model = $1")
                .bind(model)
                .fetch_one(&mut *tx)
                .await?;
        if reached > checkpoint {
            // The live projector is behind the rebuild: let it catch up.
            drop(tx);
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        catch_up_to(&mut tx, projector, shadow, live, checkpoint).await?;
        let mut diffs = Vec::new();
        for table in projector.tables() {
            let l = format!("{}.{}", ident(live), ident(table));
            let s = format!("{}.{}", ident(shadow), ident(table));
            let row = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT (SELECT count(*) FROM {l}) AS live_rows, (SELECT count(*) FROM {s}) AS rebuilt_rows,
                        (SELECT count(*) FROM (SELECT to_jsonb(x) FROM {l} x EXCEPT ALL SELECT to_jsonb(y) FROM {s} y) d) AS only_live,
                        (SELECT count(*) FROM (SELECT to_jsonb(y) FROM {s} y EXCEPT ALL SELECT to_jsonb(x) FROM {l} x) d) AS only_rebuilt,
                        ARRAY(SELECT r FROM (SELECT to_jsonb(x) AS r FROM {l} x EXCEPT ALL SELECT to_jsonb(y) FROM {s} y) d LIMIT {SAMPLES}) AS samples_live,
                        ARRAY(SELECT r FROM (SELECT to_jsonb(y) AS r FROM {s} y EXCEPT ALL SELECT to_jsonb(x) FROM {l} x) d LIMIT {SAMPLES}) AS samples_rebuilt"
            )))
            .fetch_one(&mut *tx)
            .await?;
            diffs.push(TableDiff {
                table,
                live_rows: row.get("live_rows"),
                rebuilt_rows: row.get("rebuilt_rows"),
                only_live: row.get("only_live"),
                only_rebuilt: row.get("only_rebuilt"),
                samples_live: row.get("samples_live"),
                samples_rebuilt: row.get("samples_rebuilt"),
            });
        }
        // Nothing of the comparison is kept.
        tx.rollback().await?;
        return Ok((checkpoint, diffs));
    }
    anyhow::bail!(
        "the live projector {model} stayed behind the rebuild for a minute; is it running?"
    )
}
