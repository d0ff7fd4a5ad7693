//! Rate limits in Redis: fixed one-minute windows per authenticated principal
//! (`api`; a token we signed counts against its user even when expired, so an
//! app resuming after a night is not charged to a shared carrier IP) and per IP
//! for requests without one (`anonymous`).
//! Redis being down does not take the API down: the limit fails open, loudly.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::auth;
use crate::error::ApiError;
use crate::state::AppState;

/// Count this request against its limit; 429 when over.
pub async fn middleware(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    if !path.starts_with("/v1/") {
        return next.run(req).await;
    }
    let (limit, key, max) =
        match auth::bearer(req.headers()).and_then(|t| auth::signed_subject(&state.keys, t)) {
            Some(sub) => (
                "api_per_principal",
                format!("p:{sub}"),
                state.settings.rate_limit_api_per_min,
            ),
            None => {
                let ip = req
                    .extensions()
                    .get::<ConnectInfo<SocketAddr>>()
                    .map(|c| c.0.ip().to_string())
                    .unwrap_or_else(|| "unknown".into());
                (
                    "anonymous_per_ip",
                    format!("ip:{ip}"),
                    state.settings.rate_limit_anon_per_min,
                )
            }
        };
    if max > 0 {
        match hit(&state, &key).await {
            Ok((count, ttl)) if count > max as i64 => {
                return ApiError::RateLimited {
                    limit,
                    max,
                    retry_after: ttl.max(1) as u64,
                }
                .into_response();
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "rate limiter unavailable; letting the request through")
            }
        }
    }
    next.run(req).await
}

/// Charge one unit of a per-user limit (`max` per fixed window of `window_secs`);
/// 429 naming the limit when it is spent. 0 disables it. Fails open when Redis is down.
pub async fn charge(
    state: &AppState,
    limit: &'static str,
    user: uuid::Uuid,
    max: u32,
    window_secs: i64,
) -> Result<(), ApiError> {
    if max == 0 {
        return Ok(());
    }
    let now = chrono::Utc::now().timestamp();
    let window = now / window_secs;
    let key = state.redis_key(&format!("q:{limit}:{user}:{window}"));
    let mut redis = state.redis.clone();
    let counted: redis::RedisResult<(i64, i64)> = redis::pipe()
        .incr(&key, 1)
        .expire(&key, window_secs + 1)
        .query_async(&mut redis)
        .await;
    match counted {
        Ok((count, _)) if count > max as i64 => Err(ApiError::RateLimited {
            limit,
            max,
            retry_after: (window_secs - now % window_secs).max(1) as u64,
        }),
        Ok(_) => Ok(()),
        Err(e) => {
            tracing::warn!(error = %e, limit, "quota store unavailable; letting the request through");
            Ok(())
        }
    }
}

/// Increment the current window's counter; returns (count, seconds left).
async fn hit(state: &AppState, who: &str) -> redis::RedisResult<(i64, i64)> {
    let window = chrono::Utc::now().timestamp() / 60;
    let key = state.redis_key(&format!("rl:{who}:{window}"));
    let mut redis = state.redis.clone();
    let (count, _): (i64, i64) = redis::pipe()
        .incr(&key, 1)
        .expire(&key, 61)
        .query_async(&mut redis)
        .await?;
    let left = 60 - chrono::Utc::now().timestamp() % 60;
    Ok((count, left))
}
