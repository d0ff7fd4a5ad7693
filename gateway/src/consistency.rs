//! Read your writes: a read may ask to wait until a read model has applied a position.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::FromRequestParts;
use http::request::Parts;
use http::{HeaderMap, HeaderValue};

use crate::error::ApiError;
use crate::state::AppState;

/// The position a read wants reflected: `?after_position=N`, or the header
/// `Mathia-Consistency: after_position=N`.
#[derive(Debug, Clone, Copy, Default)]
pub struct AfterPosition(pub Option<i64>);

impl<S: Send + Sync> FromRequestParts<S> for AfterPosition {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let bad = || ApiError::Malformed("after_position must be a whole number ≥ 0".into());
        let from_query = parts.uri.query().and_then(|q| {
            q.split('&')
                .find_map(|kv| kv.strip_prefix("after_position=").map(|v| v.to_owned()))
        });
        let from_header = parts
            .headers
            .get("mathia-consistency")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.trim()
                    .strip_prefix("after_position=")
                    .map(|v| v.to_owned())
            });
        match from_query.or(from_header) {
            None => Ok(AfterPosition(None)),
            Some(v) => v
                .parse::<i64>()
                .ok()
                .filter(|p| *p >= 0)
                .map(|p| AfterPosition(Some(p)))
                .ok_or_else(bad),
        }
    }
}

/// The query parameter of a read that only asks for consistency (documented in OpenAPI).
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
pub struct ReadParams {
    /// Wait until the read model has applied this position (up to 2 s).
    pub after_position: Option<i64>,
}

/// Wait (bounded by the read-wait setting) until `model` has applied `after`.
/// Returns the checkpoint the read reflects.
pub async fn wait_for(
    state: &AppState,
    model: &str,
    after: AfterPosition,
) -> Result<i64, ApiError> {
    if let Some(seen) = state.checkpoints.recent(model)
        && after.0.is_none_or(|want| seen >= want)
    {
        return Ok(seen);
    }
    let deadline = tokio::time::Instant::now() + state.settings.read_wait;
    let mut delay = Duration::from_millis(2);
    loop {
        let checkpoint = projections::checkpoint(&state.pool, model).await?;
        state.checkpoints.saw(model, checkpoint);
        match after.0 {
            Some(want) if checkpoint < want => {
                if tokio::time::Instant::now() >= deadline {
                    return Err(ApiError::Coded {
                        status: http::StatusCode::SERVICE_UNAVAILABLE,
                        code: "read_model_behind".into(),
                        message: format!(
                            "the {model} read model has not reached position {want} yet; retry"
                        ),
                        extra: [
                            ("retry_after".to_owned(), 1.into()),
                            ("position".to_owned(), checkpoint.into()),
                            ("after_position".to_owned(), want.into()),
                        ]
                        .into_iter()
                        .collect(),
                    });
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_millis(25));
            }
            _ => return Ok(checkpoint),
        }
    }
}

/// The read models' checkpoints as this instance last read them. A read that
/// does not wait, or waits for a position already seen applied, answers from
/// here instead of asking Postgres first: at a thousand reads a second that
/// query was a third of each read's round trips. A checkpoint read less than
/// [`Checkpoints::FRESH`] ago is a lower bound of the current one (they only
/// move forward; a rebuild's swap is the one exception, and `FRESH` bounds
/// it), so `Mathia-Position` stays true: the read reflects at least that.
#[derive(Debug, Default)]
pub struct Checkpoints(Mutex<HashMap<String, (i64, Instant)>>);

impl Checkpoints {
    /// How long a checkpoint read is used for.
    pub const FRESH: Duration = Duration::from_millis(50);

    /// `model`'s checkpoint if it was read less than [`Self::FRESH`] ago.
    pub fn recent(&self, model: &str) -> Option<i64> {
        let seen = self.0.lock().unwrap_or_else(|e| e.into_inner());
        seen.get(model)
            .filter(|(_, at)| at.elapsed() < Self::FRESH)
            .map(|(position, _)| *position)
    }

    /// Remember `model`'s checkpoint, read just now.
    pub fn saw(&self, model: &str, position: i64) {
        let mut seen = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match seen.get_mut(model) {
            Some(entry) => *entry = (position, Instant::now()),
            None => {
                seen.insert(model.to_owned(), (position, Instant::now()));
            }
        }
    }
}

/// Add `Mathia-Position` to a read's headers.
pub fn position_header(position: i64) -> HeaderMap {
    let mut h = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(&position.to_string()) {
        h.insert("mathia-position", v);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkpoint_is_reused_only_while_fresh() {
        let seen = Checkpoints::default();
        assert_eq!(seen.recent("wallet"), None, "never read");
        seen.saw("wallet", 41);
        seen.saw("wallet", 42);
        assert_eq!(seen.recent("wallet"), Some(42), "the latest read");
        assert_eq!(seen.recent("chat"), None, "per model");
        std::thread::sleep(Checkpoints::FRESH + Duration::from_millis(5));
        assert_eq!(seen.recent("wallet"), None, "stale: ask Postgres again");
    }
}

/// Wait (bounded) for `model` to reach the head of the log: a row that is
/// missing may just be too new (written a moment ago, by a client that did not
/// pass `after_position`). Only a miss pays for this.
pub async fn caught_up(state: &AppState, model: &str) {
    if let Ok(head) = handlers::store::head_position(&state.pool).await {
        let _ = wait_for(state, model, AfterPosition(Some(head))).await;
    }
}

/// Run `look`, a read of `model` that finds the caller's own row (a wallet, a
/// room membership); when `found` says it found none, wait until the model
/// has [`caught_up`] and run it once more. So a client that reads right after
/// its own write, without `after_position`, finds what it wrote. Only a miss
/// pays, and the wait depends on the model, not on the row: a stranger's 404
/// takes no longer for a row that exists than for one that does not.
pub async fn look_again_when_missing<T, F, Fut>(
    state: &AppState,
    model: &str,
    look: F,
    found: impl Fn(&T) -> bool,
) -> Result<T, ApiError>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T, ApiError>>,
{
    let first = look().await?;
    if found(&first) {
        return Ok(first);
    }
    caught_up(state, model).await;
    look().await
}

/// [`look_again_when_missing`] for the usual read: at most one row, found when
/// there is one (`look` is the query, e.g. `|| query.fetch_optional(pool)`).
pub async fn find<T, F, Fut>(state: &AppState, model: &str, look: F) -> Result<Option<T>, ApiError>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>, sqlx::Error>>,
{
    look_again_when_missing(
        state,
        model,
        || async { Ok(look().await?) },
        Option::is_some,
    )
    .await
}
