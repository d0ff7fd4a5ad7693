//! Admin endpoints: operators only, every call audited.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use http::StatusCode;
use utoipa::IntoParams;

use crate::auth::Principal;
use crate::error::{ApiError, ApiResult, Problem};
use crate::extract::AppQuery;
use crate::state::AppState;

/// Status options.
#[derive(Debug, serde::Deserialize, IntoParams)]
pub struct StatusParams {
    /// A reader behind the head that has not moved for this many seconds is stuck (default 60).
    pub stuck_after_secs: Option<u64>,
}

/// Where the log's head, the relay, every projector and every JetStream stream
/// and consumer stand (the same as `mathia status --json`). 503 when something is stuck.
#[utoipa::path(get, path = "/v1/admin/status", tag = "operations", security(("bearer" = [])), params(StatusParams),
    responses((status = 200, description = "all readers moving", body = Object),
        (status = 503, description = "something is stuck: see `stuck`", body = Object),
        (status = 401, body = Problem), (status = 403, description = "not an admin", body = Problem)))]
pub async fn status(
    State(state): State<AppState>,
    principal: Principal,
    AppQuery(params): AppQuery<StatusParams>,
) -> ApiResult<(StatusCode, Json<serde_json::Value>)> {
    if !principal.admin {
        return Err(ApiError::Forbidden("admins only".into()));
    }
    sqlx::query("INSERT INTO audit_log (actor, action, subject) VALUES ($1, 'admin.status', NULL)")
        .bind(principal.user_id)
        .execute(&state.pool)
        .await?;
    let stuck_after = Duration::from_secs(params.stuck_after_secs.unwrap_or(60));
    let status =
        projections::status::gather(&state.pool, &state.js, &state.subjects, stuck_after).await?;
    let code = if status.stuck.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    Ok((
        code,
        Json(serde_json::to_value(&status).map_err(anyhow::Error::from)?),
    ))
}
