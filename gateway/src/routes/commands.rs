//! Polling a command that was answered 202.

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use uuid::Uuid;

use crate::auth::Principal;
use crate::dispatch::{answer, is_pending};
use crate::error::{ApiError, ApiResult, Problem};
use crate::extract::AppPath;
use crate::state::AppState;

/// The command's answer once decided (the same status and body the write
/// would have returned); 202 while it is still on its way.
#[utoipa::path(get, path = "/v1/commands/{command_id}", tag = "commands", security(("bearer" = [])),
    params(("command_id" = Uuid, Path)),
    responses((status = 200, description = "decided: the original answer (status 200/201 or a problem)"),
        (status = 202, description = "not decided yet"), (status = 401, body = Problem),
        (status = 404, description = "unknown, or not yours", body = Problem)))]
pub async fn get_command(
    State(state): State<AppState>,
    principal: Principal,
    AppPath(command_id): AppPath<Uuid>,
) -> ApiResult<Response> {
    if let Some(outcome) =
        handlers::ledger::find_for(&state.pool, command_id, principal.user_id).await?
    {
        return Ok(answer(outcome, false));
    }
    let pending = is_pending(&state, command_id, principal.user_id)
        .await
        .map_err(|_| {
            ApiError::Unavailable("cannot tell whether the command is pending; retry".into())
        })?;
    if pending {
        return Ok((
            StatusCode::ACCEPTED,
            Json(serde_json::json!({ "command_id": command_id, "status": "pending" })),
        )
            .into_response());
    }
    Err(ApiError::NotFound("no such command".into()))
}
