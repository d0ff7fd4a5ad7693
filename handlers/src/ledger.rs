//! The command ledger: every decided command with its answer, kept for ever,
//! so a retry days later still gets the first answer (JetStream's duplicate
//! window is two minutes).

use std::collections::HashMap;

use sqlx::{PgConnection, PgPool, Row};
use uuid::Uuid;

use crate::bus::Outcome;

/// One ledger row to write.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The principal the command acted for.
    pub principal: Option<Uuid>,
    /// The command's name.
    pub command_type: String,
    /// The aggregate it addressed.
    pub stream_id: String,
    /// The outcome.
    pub outcome: Outcome,
}

/// The stored outcomes of those of `ids` that have been decided.
pub async fn find(pool: &PgPool, ids: &[Uuid]) -> Result<HashMap<Uuid, Outcome>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT command_id, status, answer, position, request_hash FROM command_ledger WHERE command_id = ANY($1)",
    )
    .bind(ids)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let id: Uuid = r.get("command_id");
            let status: i16 = r.get("status");
            (
                id,
                Outcome {
                    command_id: id,
                    status: status as u16,
                    body: r.get("answer"),
                    position: r.get("position"),
                    request_hash: r.get("request_hash"),
                    replayed: true,
                },
            )
        })
        .collect())
}

/// The stored outcome of one command, visible only to its principal.
pub async fn find_for(
    pool: &PgPool,
    id: Uuid,
    principal: Uuid,
) -> Result<Option<Outcome>, sqlx::Error> {
    let mut found = find(pool, &[id]).await?;
    let owner: Option<Option<Uuid>> =
        sqlx::query_scalar("SELECT principal FROM command_ledger WHERE command_id = $1")
            .bind(id)
            .fetch_optional(pool)
            .await?;
    Ok(match owner {
        Some(Some(p)) if p == principal => found.remove(&id),
        _ => None,
    })
}

/// Insert ledger rows; a command id already present is a conflict (another
/// handler decided it first), which fails the transaction.
pub async fn insert(tx: &mut PgConnection, entries: &[Entry]) -> Result<(), sqlx::Error> {
    if entries.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = entries.iter().map(|e| e.outcome.command_id).collect();
    let principals: Vec<Option<Uuid>> = entries.iter().map(|e| e.principal).collect();
    let types: Vec<&str> = entries.iter().map(|e| e.command_type.as_str()).collect();
    let streams: Vec<&str> = entries.iter().map(|e| e.stream_id.as_str()).collect();
    let hashes: Vec<&str> = entries
        .iter()
        .map(|e| e.outcome.request_hash.as_str())
        .collect();
    let statuses: Vec<i16> = entries.iter().map(|e| e.outcome.status as i16).collect();
    let answers: Vec<String> = entries.iter().map(|e| e.outcome.body.to_string()).collect();
    let positions: Vec<Option<i64>> = entries.iter().map(|e| e.outcome.position).collect();
    sqlx::query(
        "INSERT INTO command_ledger (command_id, principal, command_type, stream_id, request_hash, status, answer, position)
         SELECT id, p, t, s, h, st, a::jsonb, pos
         FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::smallint[], $7::text[], $8::bigint[])
              AS u(id, p, t, s, h, st, a, pos)",
    )
    .bind(&ids)
    .bind(&principals)
    .bind(&types)
    .bind(&streams)
    .bind(&hashes)
    .bind(&statuses)
    .bind(&answers)
    .bind(&positions)
    .execute(&mut *tx)
    .await?;
    Ok(())
}
