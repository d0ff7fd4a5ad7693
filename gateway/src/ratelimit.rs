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

/// One per-user limit: `max` per fixed window of `window_secs` (0 disables it).
#[derive(Clone, Copy)]
pub struct Quota {
    /// Its name, as the 429 problem gives it.
    pub limit: &'static str,
    /// Units per window.
    pub max: u32,
    /// The window's length.
    pub window_secs: i64,
}

/// Check every window, then charge all of them or none: a request one limit
/// refuses costs nothing against the others. Returns the 1-based index of the
/// refusing quota, or 0. (ARGV: max, ttl for each key.)
static CHARGE: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        r"
for i, key in ipairs(KEYS) do
  if tonumber(redis.call('GET', key) or '0') >= tonumber(ARGV[2 * i - 1]) then return i end
end
for i, key in ipairs(KEYS) do
  redis.call('INCR', key)
  redis.call('EXPIRE', key, ARGV[2 * i])
end
return 0",
    )
});

/// Charge one unit of a per-user limit; 429 naming the limit when it is spent.
pub async fn charge(
    state: &AppState,
    limit: &'static str,
    user: uuid::Uuid,
    max: u32,
    window_secs: i64,
) -> Result<(), ApiError> {
    charge_all(
        state,
        user,
        &[Quota {
            limit,
            max,
            window_secs,
        }],
    )
    .await
}

/// Charge one unit of each of `quotas` in one Redis round trip, all or none;
/// 429 naming the first spent limit. Fails open when Redis is down.
pub async fn charge_all(
    state: &AppState,
    user: uuid::Uuid,
    quotas: &[Quota],
) -> Result<(), ApiError> {
    let quotas: Vec<&Quota> = quotas.iter().filter(|q| q.max > 0).collect();
    if quotas.is_empty() {
        return Ok(());
    }
    let now = chrono::Utc::now().timestamp();
    let mut invocation = CHARGE.prepare_invoke();
    for q in &quotas {
        invocation
            .key(state.redis_key(&format!("q:{}:{user}:{}", q.limit, now / q.window_secs)))
            .arg(q.max)
            .arg(q.window_secs + 1);
    }
    let mut redis = state.redis.clone();
    let refused: redis::RedisResult<usize> = invocation.invoke_async(&mut redis).await;
    match refused {
        Ok(0) => Ok(()),
        Ok(i) => {
            let q = quotas[(i - 1).min(quotas.len() - 1)];
            Err(ApiError::RateLimited {
                limit: q.limit,
                max: q.max,
                retry_after: (q.window_secs - now % q.window_secs).max(1) as u64,
            })
        }
        Err(e) => {
            tracing::warn!(error = %e, "quota store unavailable; letting the request through");
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
