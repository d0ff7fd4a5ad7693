//! Signals: typing, presence and assistant stream chunks. Ephemeral state in
//! Redis (with expiry, so a crashed gateway leaves no ghosts) announced on core
//! NATS `live.<room>.<kind>`; never events, never replayed.
//!
//! Every gateway listens on `live.>` and hands each signal to its connections
//! that watch the room ([`Signal`] on a broadcast channel; a connection that
//! falls behind loses signals, never events).
//!
//! - Typing: a sorted set per room, member = user, score = expiry (now + 30 s).
//!   Refreshes inside 3 s are coalesced by the connection. A new watcher gets
//!   the current typers with its subscription.
//! - Presence: a sorted set per user, member = connection, score = last
//!   heartbeat; `away` connections are in a set beside it. A user is online
//!   while a connection has beaten within 5 min (away when every live one is
//!   away), and the change is pushed to the watchers of their rooms.
//! - Assistant replies: `live.<room>.ai` chunks are forwarded as they come as
//!   `ai_stream_chunk` frames; only the final message becomes an event.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::broadcast;
use uuid::Uuid;

use crate::state::AppState;

/// A signal for the watchers of one room.
#[derive(Debug, Clone)]
pub struct Signal {
    /// The room.
    pub room_id: Uuid,
    /// The frame to send (the connection adds its subscription id).
    pub frame: Value,
}

/// How long a typing notice lasts without a refresh.
pub const TYPING_TTL: Duration = Duration::from_secs(30);
/// A connection without a heartbeat for this long no longer counts as present.
pub const PRESENCE_STALE: Duration = Duration::from_secs(300);

fn now_ms() -> f64 {
    chrono::Utc::now().timestamp_millis() as f64
}

/// The core NATS subject of a room's signals of `kind`.
pub fn subject(state: &AppState, room: Uuid, kind: &str) -> String {
    let p = state.subjects.prefix();
    if p.is_empty() {
        format!("live.{room}.{kind}")
    } else {
        format!("{p}.live.{room}.{kind}")
    }
}

fn presence_subject(state: &AppState) -> String {
    let p = state.subjects.prefix();
    if p.is_empty() {
        "live.presence".into()
    } else {
        format!("{p}.live.presence")
    }
}

/// `user` starts or stops typing in `room` (membership already checked).
pub async fn typing(state: &AppState, room: Uuid, user: Uuid, on: bool) {
    let key = state.redis_key(&format!("typing:{room}"));
    let mut redis = state.redis.clone();
    let expires = now_ms() + TYPING_TTL.as_millis() as f64;
    let stored: redis::RedisResult<()> = if on {
        redis::pipe()
            .zadd(&key, user.to_string(), expires)
            .ignore()
            .expire(&key, TYPING_TTL.as_secs() as i64 * 2)
            .ignore()
            .query_async(&mut redis)
            .await
    } else {
        redis::cmd("ZREM")
            .arg(&key)
            .arg(user.to_string())
            .query_async(&mut redis)
            .await
    };
    if let Err(e) = stored {
        tracing::warn!(error = %e, "typing not stored");
    }
    let frame = json!({
        "type": "typing", "room_id": room, "user_id": user, "typing": on,
        "expires_in": if on { TYPING_TTL.as_secs() } else { 0 },
    });
    let _ = state
        .nats
        .publish(subject(state, room, "typing"), frame.to_string().into())
        .await;
}

/// Who is typing in `room` now.
pub async fn typers(state: &AppState, room: Uuid) -> Vec<Uuid> {
    let key = state.redis_key(&format!("typing:{room}"));
    let mut redis = state.redis.clone();
    let users: Vec<String> = redis::cmd("ZRANGEBYSCORE")
        .arg(&key)
        .arg(now_ms())
        .arg("+inf")
        .query_async(&mut redis)
        .await
        .unwrap_or_default();
    users.iter().filter_map(|u| u.parse().ok()).collect()
}

/// A user's presence.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Presence {
    /// The user.
    pub user_id: Uuid,
    /// `online`, `away` or `offline`.
    pub status: String,
    /// Their latest heartbeat, if any is kept.
    pub last_seen: Option<chrono::DateTime<chrono::Utc>>,
    /// Live connections (devices).
    pub connections: u32,
}

/// Presence of `user` from Redis.
pub async fn presence(state: &AppState, user: Uuid) -> Presence {
    let key = state.redis_key(&format!("presence:{user}"));
    let away_key = state.redis_key(&format!("presence_away:{user}"));
    let mut redis = state.redis.clone();
    let fresh = now_ms() - PRESENCE_STALE.as_millis() as f64;
    let live: Vec<(String, f64)> = redis::cmd("ZRANGEBYSCORE")
        .arg(&key)
        .arg(fresh)
        .arg("+inf")
        .arg("WITHSCORES")
        .query_async(&mut redis)
        .await
        .unwrap_or_default();
    let last: Vec<(String, f64)> = redis::cmd("ZRANGE")
        .arg(&key)
        .arg(-1)
        .arg(-1)
        .arg("WITHSCORES")
        .query_async(&mut redis)
        .await
        .unwrap_or_default();
    let away: Vec<String> = redis::cmd("SMEMBERS")
        .arg(&away_key)
        .query_async(&mut redis)
        .await
        .unwrap_or_default();
    let status = if live.is_empty() {
        "offline"
    } else if live.iter().all(|(c, _)| away.contains(c)) {
        "away"
    } else {
        "online"
    };
    Presence {
        user_id: user,
        status: status.into(),
        last_seen: last
            .first()
            .and_then(|(_, ms)| chrono::DateTime::from_timestamp_millis(*ms as i64)),
        connections: live.len() as u32,
    }
}

/// A heartbeat of connection `conn` of `user` (`away` sets or clears its away flag).
pub async fn presence_beat(state: &AppState, user: Uuid, conn: Uuid, away: Option<bool>) {
    let before = presence(state, user).await.status;
    let key = state.redis_key(&format!("presence:{user}"));
    let away_key = state.redis_key(&format!("presence_away:{user}"));
    let mut redis = state.redis.clone();
    let mut pipe = redis::pipe();
    pipe.zadd(&key, conn.to_string(), now_ms())
        .ignore()
        // Drop connections that stopped beating long ago; the whole key goes a day after the last beat.
        .cmd("ZREMRANGEBYSCORE")
        .arg(&key)
        .arg("-inf")
        .arg(now_ms() - PRESENCE_STALE.as_millis() as f64)
        .ignore()
        .expire(&key, 86_400)
        .ignore();
    match away {
        Some(true) => {
            pipe.sadd(&away_key, conn.to_string())
                .ignore()
                .expire(&away_key, 86_400)
                .ignore();
        }
        Some(false) => {
            pipe.srem(&away_key, conn.to_string()).ignore();
        }
        None => {}
    }
    if let Err(e) = pipe.query_async::<()>(&mut redis).await {
        tracing::warn!(error = %e, "presence not stored");
        return;
    }
    announce_if_changed(state, user, &before).await;
}

/// Connection `conn` of `user` closed.
pub async fn presence_gone(state: &AppState, user: Uuid, conn: Uuid) {
    let before = presence(state, user).await.status;
    let key = state.redis_key(&format!("presence:{user}"));
    let away_key = state.redis_key(&format!("presence_away:{user}"));
    let mut redis = state.redis.clone();
    let _: redis::RedisResult<()> = redis::pipe()
        .zrem(&key, conn.to_string())
        .ignore()
        .srem(&away_key, conn.to_string())
        .ignore()
        .query_async(&mut redis)
        .await;
    announce_if_changed(state, user, &before).await;
}

async fn announce_if_changed(state: &AppState, user: Uuid, before: &str) {
    let now = presence(state, user).await;
    if now.status != before {
        let _ = state
            .nats
            .publish(
                presence_subject(state),
                serde_json::to_vec(&now).unwrap_or_default().into(),
            )
            .await;
    }
}

/// Listen on `live.>` until the connection ends, and hand every signal to the
/// connections of this instance.
pub async fn listen(state: AppState, tx: broadcast::Sender<Arc<Signal>>) -> anyhow::Result<()> {
    let p = state.subjects.prefix();
    let all = if p.is_empty() {
        "live.>".to_owned()
    } else {
        format!("{p}.live.>")
    };
    let mut sub = state.nats.subscribe(all).await?;
    let presence = presence_subject(&state);
    while let Some(msg) = sub.next().await {
        let Ok(mut frame) = serde_json::from_slice::<Value>(&msg.payload) else {
            continue;
        };
        if msg.subject.as_str() == presence {
            // To the watchers of every room the user is in.
            let Some(user) = frame
                .get("user_id")
                .and_then(Value::as_str)
                .and_then(|u| u.parse::<Uuid>().ok())
            else {
                continue;
            };
            let rooms: Vec<Uuid> = sqlx::query_scalar(
                "SELECT room_id FROM proj_chat_members WHERE user_id = $1 AND state = 'joined'",
            )
            .bind(user)
            .fetch_all(&state.pool)
            .await
            .unwrap_or_default();
            if let Some(o) = frame.as_object_mut() {
                o.insert("type".into(), json!("presence"));
            }
            for room_id in rooms {
                let mut f = frame.clone();
                if let Some(o) = f.as_object_mut() {
                    o.insert("room_id".into(), json!(room_id));
                }
                let _ = tx.send(Arc::new(Signal { room_id, frame: f }));
            }
            continue;
        }
        // live.<room>.<kind>
        let mut parts = msg.subject.as_str().rsplit('.');
        let kind = parts.next().unwrap_or_default();
        let Some(room_id) = parts.next().and_then(|r| r.parse::<Uuid>().ok()) else {
            continue;
        };
        let frame = match kind {
            "typing" => frame,
            "ai" => {
                if let Some(o) = frame.as_object_mut() {
                    o.insert("type".into(), json!("ai_stream_chunk"));
                    o.insert("room_id".into(), json!(room_id));
                }
                frame
            }
            _ => continue,
        };
        let _ = tx.send(Arc::new(Signal { room_id, frame }));
    }
    Ok(())
}
