//! `GET /v1/sync`: the WebSocket's stream for clients that cannot hold a
//! socket, with the same cursors; and `GET /v1/presence`.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::auth::Principal;
use crate::error::{ApiError, ApiResult, Problem};
use crate::extract::AppQuery;
use crate::realtime::{self, Cursor, Item, NotRecovered};
use crate::signals::{self, Presence};
use crate::state::AppState;

/// Long-poll parameters.
#[derive(Debug, Deserialize, IntoParams)]
pub struct SyncParams {
    /// The `next` of the previous answer (or a WebSocket event's `cursor`).
    /// Omit it to get a starting cursor: take it *before* loading state over REST.
    pub since: Option<String>,
    /// How long to wait for news when there is none, 0 to 30,000 ms (default 25,000).
    pub timeout_ms: Option<u64>,
    /// Most events per answer, 1 to 1,000 (default 500).
    pub limit: Option<i64>,
}

/// One event, as the WebSocket's `event` frame carries it.
#[derive(Debug, Serialize, ToSchema)]
pub struct SyncItem {
    /// `room:<id>` or `user:<id>`.
    pub topic: String,
    /// Resume after this event.
    pub cursor: String,
    /// The event type.
    pub kind: String,
    /// Its fields, bodies in clear.
    #[schema(value_type = Object)]
    pub data: serde_json::Value,
    /// When it happened.
    pub occurred_at: chrono::DateTime<chrono::Utc>,
}

/// Events of the caller's stream and rooms after `since`, oldest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct SyncPage {
    /// Events.
    pub items: Vec<SyncItem>,
    /// Pass as `since` next time.
    pub next: String,
    /// False: the gap since `since` cannot be replayed whole (see `reason`);
    /// reload over REST, then go on from `next`.
    pub recovered: bool,
    /// `epoch_changed` (a read model was rebuilt) or `retention` (too old).
    #[schema(value_type = Option<String>)]
    pub reason: Option<NotRecovered>,
}

async fn topics(state: &AppState, user: Uuid) -> ApiResult<Vec<String>> {
    let rooms: Vec<Uuid> = sqlx::query_scalar(
        "SELECT room_id FROM proj_chat_members WHERE user_id = $1 AND state = 'joined'",
    )
    .bind(user)
    .fetch_all(&state.pool)
    .await?;
    let mut t: Vec<String> = rooms
        .into_iter()
        .map(projections::feed::room_topic)
        .collect();
    t.push(projections::feed::user_topic(user));
    Ok(t)
}

/// Everything after `since` in the caller's own stream and their rooms; waits
/// up to `timeout_ms` when there is nothing yet. No gap, no duplicate; a gap
/// that cannot be replayed whole answers `recovered: false`.
#[utoipa::path(get, path = "/v1/sync", tag = "realtime", security(("bearer" = [])), params(SyncParams),
    responses((status = 200, body = SyncPage, example = json!({"items": [{"topic": "room:0193…", "cursor": "YzE6Mzo0Mg", "kind": "MessagePosted",
        "data": {"message_id": "0193…", "room_id": "0193…", "sender": "0193…", "body": "Ferry at 7?"}, "occurred_at": "2026-12-01T10:00:00Z"}],
        "next": "YzE6Mzo0Mg", "recovered": true, "reason": null})),
        (status = 400, body = Problem), (status = 401, body = Problem), (status = 422, body = Problem)))]
pub async fn sync(
    State(state): State<AppState>,
    principal: Principal,
    AppQuery(params): AppQuery<SyncParams>,
) -> ApiResult<Json<SyncPage>> {
    let limit = params.limit.unwrap_or(500);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::field("limit", "1 to 1000"));
    }
    let timeout = Duration::from_millis(params.timeout_ms.unwrap_or(25_000));
    if timeout > Duration::from_secs(30) {
        return Err(ApiError::field("timeout_ms", "0 to 30000"));
    }
    let since = match &params.since {
        None => None,
        Some(s) => Some(
            Cursor::decode(s)
                .ok_or_else(|| ApiError::field("since", "not a cursor of this server"))?,
        ),
    };
    let (position, epoch) = state.hub.now();
    let Some(since) = since else {
        return Ok(Json(SyncPage {
            items: vec![],
            next: Cursor { epoch, position }.encode(),
            recovered: true,
            reason: None,
        }));
    };
    let topics = topics(&state, principal.user_id).await?;
    let mut up_to = position;
    // Wait until something for this caller arrives or the timeout is spent: the
    // feed also moves for events that concern other people, which must not end
    // the poll with an empty page.
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let items = match realtime::replay(&state, &topics, since, up_to, epoch, limit + 1).await? {
            Ok(items) => items,
            Err(reason) => {
                return Ok(Json(SyncPage {
                    items: vec![],
                    next: Cursor {
                        epoch,
                        position: up_to,
                    }
                    .encode(),
                    recovered: false,
                    reason: Some(reason),
                }));
            }
        };
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if items.is_empty() && !left.is_zero() {
            state.hub.wait_past(up_to, left).await;
            let (now, now_epoch) = state.hub.now();
            if now_epoch != epoch {
                return Ok(Json(SyncPage {
                    items: vec![],
                    next: Cursor {
                        epoch: now_epoch,
                        position: now,
                    }
                    .encode(),
                    recovered: false,
                    reason: Some(NotRecovered::EpochChanged),
                }));
            }
            if now > up_to {
                up_to = now;
                continue;
            }
        }
        return Ok(Json(page(items, limit, epoch, up_to)));
    }
}

/// Cut at `limit` without splitting one position's events (the next page
/// starts at the first position left out).
fn page(mut items: Vec<Item>, limit: i64, epoch: i64, up_to: i64) -> SyncPage {
    let mut next = up_to;
    if items.len() as i64 > limit {
        let cut = items[limit as usize].position;
        let kept: Vec<Item> = items.iter().filter(|i| i.position < cut).cloned().collect();
        if !kept.is_empty() {
            items = kept;
            next = cut - 1;
        } else {
            next = cut;
            items.retain(|i| i.position == cut);
        }
    }
    SyncPage {
        items: items
            .into_iter()
            .map(|i| SyncItem {
                cursor: Cursor {
                    epoch,
                    position: i.position,
                }
                .encode(),
                topic: i.topic,
                kind: i.kind,
                data: i.data,
                occurred_at: i.occurred_at,
            })
            .collect(),
        next: Cursor {
            epoch,
            position: next,
        }
        .encode(),
        recovered: true,
        reason: None,
    }
}

/// Presence query.
#[derive(Debug, Deserialize, IntoParams)]
pub struct PresenceParams {
    /// Comma-separated user ids (at most 100).
    pub user_ids: String,
}

/// Presence of people who share a room with the caller (others are left out).
#[utoipa::path(get, path = "/v1/presence", tag = "realtime", security(("bearer" = [])), params(PresenceParams),
    responses((status = 200, body = [Presence], example = json!([{"user_id": "0193…", "status": "online", "last_seen": "2026-12-01T10:00:00Z", "connections": 2}])),
        (status = 400, body = Problem), (status = 401, body = Problem), (status = 422, body = Problem)))]
pub async fn presence(
    State(state): State<AppState>,
    principal: Principal,
    AppQuery(params): AppQuery<PresenceParams>,
) -> ApiResult<Json<Vec<Presence>>> {
    let ids: Vec<Uuid> = params
        .user_ids
        .split(',')
        .map(|s| s.trim().parse())
        .collect::<Result<_, _>>()
        .map_err(|_| ApiError::field("user_ids", "comma-separated user ids"))?;
    if ids.is_empty() || ids.len() > 100 {
        return Err(ApiError::field("user_ids", "1 to 100 ids"));
    }
    let visible: Vec<Uuid> = sqlx::query_scalar(
        "SELECT DISTINCT o.user_id FROM proj_chat_members o
         JOIN proj_chat_members m ON m.room_id = o.room_id AND m.user_id = $1 AND m.state = 'joined'
         WHERE o.user_id = ANY($2) AND o.state = 'joined'",
    )
    .bind(principal.user_id)
    .bind(&ids)
    .fetch_all(&state.pool)
    .await?;
    let mut out = vec![];
    for id in ids {
        if id == principal.user_id || visible.contains(&id) {
            out.push(signals::presence(&state, id).await);
        }
    }
    Ok(Json(out))
}
