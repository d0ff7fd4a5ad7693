//! Moderation: members report messages; the screener's classifier flags them
//! (three classifier flags mute the sender in that room); moderators list the
//! flagged messages, clear them after review, and mute or unmute members.
//! Operators see every room's flags at `/v1/admin/flags` (audited).
//!
//! Existence stays private: a non-member gets 404 on every endpoint here; a
//! member without the moderator role gets 403 on the moderators' ones.

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use commands::chat::{ChatCommand, REPORT_REASONS};
use serde::{Deserialize, Serialize};
use sqlx::Row;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::auth::Principal;
use crate::consistency::{AfterPosition, position_header, wait_for};
use crate::error::{ApiError, ApiResult, Problem};
use crate::extract::{AppJson, AppPath, AppQuery, RequestId, WriteOptions};
use crate::paging;
use crate::routes::messages::{MessageView, one};
use crate::routes::rooms::{MODEL, require_member, room_command};
use crate::state::AppState;

/// Report a message to the room's moderators.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReportRequest {
    /// `spam`, `harassment`, `hate`, `violence`, `sexual`, `self_harm` or `other`.
    #[schema(example = "spam")]
    pub reason: String,
}

/// Mute a member (moderators, over lower roles).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MuteRequest {
    /// Minutes, 1 to 525,600 (a year).
    #[schema(example = 60)]
    pub minutes: i64,
}

/// A flagged message, for review.
#[derive(Debug, Serialize, ToSchema)]
pub struct FlagView {
    /// The message (its body is null once redacted).
    pub message: MessageView,
    /// Its sender.
    pub sender: Uuid,
    /// The classifier's category, if it flagged the message.
    pub classifier_label: Option<String>,
    /// The classifier's confidence, 0 to 1.
    pub classifier_score: Option<f64>,
    /// How many members reported it.
    pub reports: i32,
    /// Their reasons.
    pub report_reasons: Vec<String>,
    /// First flag.
    pub first_flagged_at: DateTime<Utc>,
    /// Latest flag.
    pub last_flagged_at: DateTime<Utc>,
}

/// Flagged messages, most recently flagged first.
#[derive(Debug, Serialize, ToSchema)]
pub struct FlagPage {
    /// Flags.
    pub items: Vec<FlagView>,
    /// Cursor of the next page; null when there is no more.
    pub next: Option<String>,
}

/// A mute in force.
#[derive(Debug, Serialize, ToSchema)]
pub struct MuteView {
    /// Who.
    pub user_id: Uuid,
    /// Until when.
    pub until: DateTime<Utc>,
    /// `flags` (automatic) or `moderator`.
    pub reason: String,
    /// The moderator; null for an automatic mute.
    pub muted_by: Option<Uuid>,
}

/// Paging of flag lists.
#[derive(Debug, Deserialize, IntoParams)]
pub struct FlagParams {
    /// 1 to 100 (default 50).
    pub limit: Option<i64>,
    /// `next` of the previous page.
    pub cursor: Option<String>,
    /// Only flags from this source: `classifier` or `report`.
    pub source: Option<String>,
    /// Wait until the read model has applied this position.
    pub after_position: Option<i64>,
}

async fn require_moderator(state: &AppState, room: Uuid, user: Uuid) -> ApiResult<()> {
    match require_member(state, room, user).await?.as_str() {
        "moderator" | "owner" => Ok(()),
        _ => Err(ApiError::Forbidden(
            "only the room's moderators review flags and mutes".into(),
        )),
    }
}

/// One page of flags, of one room or of all.
async fn flag_page(
    state: &AppState,
    room: Option<Uuid>,
    params: &FlagParams,
) -> ApiResult<FlagPage> {
    let limit = paging::limit(params.limit)?;
    let before = params
        .cursor
        .as_deref()
        .map(|c| paging::parse_cursor("f1", c).map(|(p, _)| p))
        .transpose()?
        .unwrap_or(i64::MAX);
    let source = match params.source.as_deref() {
        None => None,
        Some(s @ ("classifier" | "report")) => Some(s),
        Some(_) => return Err(ApiError::field("source", "classifier or report")),
    };
    let rows = sqlx::query(
        "SELECT message_id, room_id, sender, classifier_label, classifier_score, reports, report_reasons,
                first_flagged_at, last_flagged_at, position
         FROM proj_chat_flags
         WHERE ($1::uuid IS NULL OR room_id = $1) AND position < $2
           AND ($3::text IS NULL OR ($3 = 'classifier' AND classifier_label IS NOT NULL)
                                 OR ($3 = 'report' AND reports > 0))
         ORDER BY position DESC LIMIT $4",
    )
    .bind(room)
    .bind(before)
    .bind(source)
    .bind(limit + 1)
    .fetch_all(&state.pool)
    .await?;
    let more = rows.len() as i64 > limit;
    let mut items = Vec::with_capacity(rows.len());
    let mut last = None;
    for r in rows.iter().take(limit as usize) {
        let (message_id, room_id): (Uuid, Uuid) = (r.get("message_id"), r.get("room_id"));
        last = Some((r.get::<i64, _>("position"), message_id));
        items.push(FlagView {
            message: one(state, room_id, message_id).await?,
            sender: r.get("sender"),
            classifier_label: r.get("classifier_label"),
            classifier_score: r
                .get::<Option<i16>, _>("classifier_score")
                .map(|s| f64::from(s) / 1000.0),
            reports: r.get("reports"),
            report_reasons: r.get("report_reasons"),
            first_flagged_at: r.get("first_flagged_at"),
            last_flagged_at: r.get("last_flagged_at"),
        });
    }
    Ok(FlagPage {
        items,
        next: last
            .filter(|_| more)
            .map(|(p, id)| paging::cursor("f1", p, id)),
    })
}

/// Report someone else's message to the room's moderators (once per message).
/// Reports never mute anyone by themselves: a moderator reviews them.
#[utoipa::path(post, path = "/v1/rooms/{room_id}/messages/{message_id}/reports", tag = "chat", security(("bearer" = [])),
    request_body = ReportRequest,
    params(("room_id" = Uuid, Path), ("message_id" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header)),
    responses((status = 201, description = "reported", example = json!({"room_id": "0193…", "message_id": "0193…", "reported": true, "position": 57})),
        (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 404, description = "no such room (or not a member) or message", body = Problem),
        (status = 409, description = "already reported", body = Problem),
        (status = 422, description = "unknown reason, or your own message", body = Problem)))]
pub async fn report(
    State(state): State<AppState>,
    principal: Principal,
    options: WriteOptions,
    RequestId(rid): RequestId,
    uri: http::Uri,
    AppPath((room_id, message_id)): AppPath<(Uuid, Uuid)>,
    AppJson(req): AppJson<ReportRequest>,
) -> ApiResult<Response> {
    if !REPORT_REASONS.contains(&req.reason.as_str()) {
        return Err(ApiError::field(
            "reason",
            format!("one of {}", REPORT_REASONS.join(", ")),
        ));
    }
    let cmd = ChatCommand::ReportMessage {
        room_id,
        message_id,
        reason: req.reason.clone(),
    };
    room_command(&state, &principal, "POST", &uri, &options, rid, &req, cmd).await
}

/// The room's flagged messages, most recently flagged first (moderators).
#[utoipa::path(get, path = "/v1/rooms/{room_id}/flags", tag = "chat", security(("bearer" = [])),
    params(("room_id" = Uuid, Path), FlagParams),
    responses((status = 200, body = FlagPage), (status = 401, body = Problem),
        (status = 403, description = "not a moderator", body = Problem), (status = 404, body = Problem),
        (status = 422, body = Problem)))]
pub async fn list_flags(
    State(state): State<AppState>,
    principal: Principal,
    AppPath(room_id): AppPath<Uuid>,
    AppQuery(params): AppQuery<FlagParams>,
    after: AfterPosition,
) -> ApiResult<Response> {
    let position = wait_for(
        &state,
        MODEL,
        AfterPosition(params.after_position.or(after.0)),
    )
    .await?;
    require_moderator(&state, room_id, principal.user_id).await?;
    let page = flag_page(&state, Some(room_id), &params).await?;
    Ok((position_header(position), Json(page)).into_response())
}

/// Clear every flag of a message after review; a classifier flag's strike
/// against the sender is taken back (moderators).
#[utoipa::path(delete, path = "/v1/rooms/{room_id}/flags/{message_id}", tag = "chat", security(("bearer" = [])),
    params(("room_id" = Uuid, Path), ("message_id" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header)),
    responses((status = 200, description = "cleared"), (status = 401, body = Problem),
        (status = 403, body = Problem), (status = 404, description = "no such room, or no open flag", body = Problem)))]
pub async fn clear_flag(
    State(state): State<AppState>,
    principal: Principal,
    options: WriteOptions,
    RequestId(rid): RequestId,
    uri: http::Uri,
    AppPath((room_id, message_id)): AppPath<(Uuid, Uuid)>,
) -> ApiResult<Response> {
    let cmd = ChatCommand::ClearFlag {
        room_id,
        message_id,
    };
    room_command(&state, &principal, "DELETE", &uri, &options, rid, &(), cmd).await
}

/// Mute a member for some minutes: their messages are refused with 403 `muted` (moderators).
#[utoipa::path(put, path = "/v1/rooms/{room_id}/members/{user_id}/mute", tag = "chat", security(("bearer" = [])),
    request_body = MuteRequest,
    params(("room_id" = Uuid, Path), ("user_id" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header)),
    responses((status = 200, description = "muted", example = json!({"room_id": "0193…", "user_id": "0193…", "muted_until": "2026-12-01T20:00:00Z"})),
        (status = 400, body = Problem), (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 404, body = Problem), (status = 422, body = Problem)))]
pub async fn mute(
    State(state): State<AppState>,
    principal: Principal,
    options: WriteOptions,
    RequestId(rid): RequestId,
    uri: http::Uri,
    AppPath((room_id, user_id)): AppPath<(Uuid, Uuid)>,
    AppJson(req): AppJson<MuteRequest>,
) -> ApiResult<Response> {
    if !(1..=525_600).contains(&req.minutes) {
        return Err(ApiError::field("minutes", "1 to 525600"));
    }
    let at = Utc::now();
    let cmd = ChatCommand::Mute {
        room_id,
        user_id,
        until: at + chrono::Duration::minutes(req.minutes),
        at,
    };
    room_command(&state, &principal, "PUT", &uri, &options, rid, &req, cmd).await
}

/// Lift a mute (moderators).
#[utoipa::path(delete, path = "/v1/rooms/{room_id}/members/{user_id}/mute", tag = "chat", security(("bearer" = [])),
    params(("room_id" = Uuid, Path), ("user_id" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header)),
    responses((status = 200, description = "unmuted"), (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 404, description = "no such room, or not muted", body = Problem)))]
pub async fn unmute(
    State(state): State<AppState>,
    principal: Principal,
    options: WriteOptions,
    RequestId(rid): RequestId,
    uri: http::Uri,
    AppPath((room_id, user_id)): AppPath<(Uuid, Uuid)>,
) -> ApiResult<Response> {
    let cmd = ChatCommand::Unmute { room_id, user_id };
    room_command(&state, &principal, "DELETE", &uri, &options, rid, &(), cmd).await
}

/// The mutes in force in a room (moderators).
#[utoipa::path(get, path = "/v1/rooms/{room_id}/mutes", tag = "chat", security(("bearer" = [])),
    params(("room_id" = Uuid, Path), crate::consistency::ReadParams),
    responses((status = 200, body = [MuteView]), (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 404, body = Problem)))]
pub async fn list_mutes(
    State(state): State<AppState>,
    principal: Principal,
    AppPath(room_id): AppPath<Uuid>,
    after: AfterPosition,
) -> ApiResult<Response> {
    let position = wait_for(&state, MODEL, after).await?;
    require_moderator(&state, room_id, principal.user_id).await?;
    let rows = sqlx::query(
        "SELECT user_id, until, reason, muted_by FROM proj_chat_mutes
         WHERE room_id = $1 AND until > now() ORDER BY until",
    )
    .bind(room_id)
    .fetch_all(&state.pool)
    .await?;
    let mutes: Vec<MuteView> = rows
        .iter()
        .map(|r| MuteView {
            user_id: r.get("user_id"),
            until: r.get("until"),
            reason: r.get("reason"),
            muted_by: r.get("muted_by"),
        })
        .collect();
    Ok((position_header(position), Json(mutes)).into_response())
}

/// Every room's flagged messages, most recently flagged first (admins; audited).
#[utoipa::path(get, path = "/v1/admin/flags", tag = "operations", security(("bearer" = [])), params(FlagParams),
    responses((status = 200, body = FlagPage), (status = 401, body = Problem),
        (status = 403, description = "not an admin", body = Problem), (status = 422, body = Problem)))]
pub async fn admin_flags(
    State(state): State<AppState>,
    principal: Principal,
    AppQuery(params): AppQuery<FlagParams>,
    after: AfterPosition,
) -> ApiResult<Response> {
    if !principal.admin {
        return Err(ApiError::Forbidden("admins only".into()));
    }
    let position = wait_for(
        &state,
        MODEL,
        AfterPosition(params.after_position.or(after.0)),
    )
    .await?;
    sqlx::query("INSERT INTO audit_log (actor, action, subject) VALUES ($1, 'admin.flags', NULL)")
        .bind(principal.user_id)
        .execute(&state.pool)
        .await?;
    let page = flag_page(&state, None, &params).await?;
    Ok((position_header(position), Json(page)).into_response())
}
