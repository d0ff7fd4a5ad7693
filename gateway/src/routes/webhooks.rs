//! Outbound webhooks: register an endpoint with an event filter, list, change,
//! disable, delete; its deliveries and dead letters; redrive one or all.
//! Only the owner sees or touches an endpoint: anyone else gets 404.
//!
//! The signing secret is made here, sealed by the master key before it goes
//! into the command, and added to the 201 answer on the way out, so neither
//! the command ledger (saved answers) nor any event holds it in clear. It is
//! shown that once: an idempotent replay, a 202 and every read leave it out
//! (lost it? delete the endpoint and register a new one).

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use commands::Command;
use commands::webhook::{WebhookCommand, check_filter, check_url};
use serde::{Deserialize, Serialize};
use sqlx::Row;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::auth::Principal;
use crate::consistency::{AfterPosition, ReadParams, find, position_header, wait_for};
use crate::dispatch::send as command;
use crate::dispatch::{Route, dispatch};
use crate::error::{ApiError, ApiResult, Problem};
use crate::extract::{AppJson, AppPath, AppQuery, RequestId, WriteOptions};
use crate::paging::{cursor, limit, parse_cursor};
use crate::state::AppState;

/// The read model behind these endpoints.
pub const MODEL: &str = projections::webhook::MODEL;

/// Most endpoints one user may have.
pub const MAX_ENDPOINTS: i64 = 20;

/// Register an endpoint.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterWebhookRequest {
    /// Where deliveries are POSTed (http or https).
    #[schema(example = "https://example.com/hooks/mathia")]
    pub url: String,
    /// Event types (`wallet.Credited`), domain wildcards (`notify.*`) or `*`.
    /// Domains: wallet, notify, reminder, itinerary, chat; only your own events are delivered.
    #[schema(example = json!(["notify.*", "wallet.*", "reminder.ReminderFired"]))]
    pub filter: Vec<String>,
    /// A note for yourself (at most 200 characters).
    pub description: Option<String>,
}

/// Change an endpoint; `enabled: false` disables it (nothing is queued for it).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateWebhookRequest {
    /// New URL.
    pub url: Option<String>,
    /// New filter.
    pub filter: Option<Vec<String>>,
    /// New description.
    pub description: Option<String>,
    /// Enable or disable.
    pub enabled: Option<bool>,
}

/// An endpoint (never its secret).
#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookView {
    /// Id.
    pub webhook_id: Uuid,
    /// URL.
    pub url: String,
    /// Filter.
    pub filter: Vec<String>,
    /// Note.
    pub description: Option<String>,
    /// Enabled.
    pub enabled: bool,
    /// Registered at.
    pub created_at: DateTime<Utc>,
    /// Version (for `If-Match`).
    pub version: i64,
}

/// A page of endpoints, oldest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookPage {
    /// Endpoints.
    pub items: Vec<WebhookView>,
    /// Next page; null at the end.
    pub next: Option<String>,
}

/// One delivery of one event to one endpoint.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeliveryView {
    /// Id (the `Mathia-Webhook-Id` header).
    pub delivery_id: Uuid,
    /// The event delivered (the body's `id`).
    pub event_id: Uuid,
    /// `<domain>.<EventType>`.
    pub event_type: String,
    /// `pending`, `delivered`, `dead` or `cancelled`.
    pub status: String,
    /// Attempts so far (since the last redrive).
    pub attempts: i32,
    /// HTTP status of the last attempt, if it got one.
    pub last_status: Option<i32>,
    /// Why the last attempt failed.
    pub last_error: Option<String>,
    /// When the last attempt was made.
    pub last_attempt_at: Option<DateTime<Utc>>,
    /// When the next attempt is due (pending only).
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// When it was delivered.
    pub delivered_at: Option<DateTime<Utc>>,
    /// When it was dead-lettered.
    pub dead_at: Option<DateTime<Utc>>,
    /// The event's global position.
    pub position: i64,
}

/// A page of deliveries, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeliveryPage {
    /// Deliveries.
    pub items: Vec<DeliveryView>,
    /// Next page; null at the end.
    pub next: Option<String>,
}

/// Paging.
#[derive(Debug, Deserialize, IntoParams)]
pub struct PageParams {
    /// 1 to 100 (default 50).
    pub limit: Option<i64>,
    /// `next` of the previous page.
    pub cursor: Option<String>,
    /// Wait until the read model has this position.
    pub after_position: Option<i64>,
}

/// Paging and a status filter.
#[derive(Debug, Deserialize, IntoParams)]
pub struct DeliveryParams {
    /// `pending`, `delivered`, `dead` or `cancelled`.
    pub status: Option<String>,
    /// 1 to 100 (default 50).
    pub limit: Option<i64>,
    /// `next` of the previous page.
    pub cursor: Option<String>,
    /// Wait until the read model has this position.
    pub after_position: Option<i64>,
}

fn not_found() -> ApiError {
    ApiError::coded(
        http::StatusCode::NOT_FOUND,
        "webhook_not_found",
        "no such webhook",
    )
}

fn check(url: Option<&str>, filter: Option<&[String]>, description: Option<&str>) -> ApiResult<()> {
    if let Some(u) = url {
        check_url(u).map_err(|m| ApiError::field("url", m))?;
        reqwest::Url::parse(u).map_err(|_| ApiError::field("url", "not a URL"))?;
    }
    if let Some(f) = filter {
        check_filter(f).map_err(|m| ApiError::field("filter", m))?;
    }
    if let Some(d) = description
        && (d.chars().count() > commands::webhook::MAX_DESCRIPTION || d.contains('\0'))
    {
        return Err(ApiError::field(
            "description",
            "at most 200 characters, without NUL",
        ));
    }
    Ok(())
}

/// Whether `id` is `user`'s live endpoint.
async fn require_owner(state: &AppState, id: Uuid, user: Uuid) -> ApiResult<()> {
    let found: Option<i32> = find(state, MODEL, || {
        sqlx::query_scalar(
            "SELECT 1 FROM proj_webhooks WHERE webhook_id = $1 AND owner = $2 AND NOT deleted",
        )
        .bind(id)
        .bind(user)
        .fetch_optional(&state.pool)
    })
    .await?;
    found.map(|_| ()).ok_or_else(not_found)
}

/// Register an endpoint. The answer carries the signing secret, this once:
/// verify `Mathia-Signature: v1=<hex hmac-sha256(secret, "<Mathia-Webhook-Timestamp>.<body>")>`.
#[utoipa::path(post, path = "/v1/webhooks", tag = "webhooks", security(("bearer" = [])),
    request_body = RegisterWebhookRequest,
    params(("Idempotency-Key" = Option<String>, Header)),
    responses((status = 201, description = "registered; `secret` is shown only here", example = json!({
            "webhook_id": "0193…", "url": "https://example.com/hooks/mathia", "filter": ["notify.*", "wallet.*"],
            "description": null, "enabled": true, "secret": "whsec_5f0c…", "position": 120, "version": 1})),
        (status = 400, body = Problem), (status = 401, body = Problem), (status = 409, body = Problem),
        (status = 422, body = Problem), (status = 429, body = Problem)))]
pub async fn register_webhook(
    State(state): State<AppState>,
    principal: Principal,
    options: WriteOptions,
    RequestId(rid): RequestId,
    uri: http::Uri,
    AppJson(req): AppJson<RegisterWebhookRequest>,
) -> ApiResult<Response> {
    check(
        Some(&req.url),
        Some(&req.filter),
        req.description.as_deref(),
    )?;
    let count: i64 =
        sqlx::query_scalar("SELECT count(*) FROM proj_webhooks WHERE owner = $1 AND NOT deleted")
            .bind(principal.user_id)
            .fetch_one(&state.pool)
            .await?;
    if count >= MAX_ENDPOINTS {
        return Err(ApiError::Coded {
            status: http::StatusCode::UNPROCESSABLE_ENTITY,
            code: "too_many_webhooks".into(),
            message: format!("at most {MAX_ENDPOINTS} webhooks per user"),
            extra: Default::default(),
        });
    }
    let secret = format!(
        "whsec_{}",
        rand::random::<[u8; 32]>()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    );
    let res = dispatch(
        &state,
        &principal,
        Route::post(&uri),
        &options,
        rid,
        &req,
        |id| {
            Ok(Command::Webhook(WebhookCommand::RegisterWebhook {
                endpoint_id: id,
                url: req.url.clone(),
                filter: req.filter.clone(),
                description: req.description.clone(),
                sealed_secret: events::chat::Bytes64(
                    state.keystore.seal_webhook_secret(id, secret.as_bytes()),
                ),
            }))
        },
    )
    .await?;
    // Only a fresh decision stored *this* secret; a replay's was stored by the first request.
    if res.status() != http::StatusCode::CREATED
        || res.headers().contains_key("idempotent-replayed")
    {
        return Ok(res);
    }
    let (mut parts, body) = res.into_parts();
    let bytes = axum::body::to_bytes(body, 1 << 20)
        .await
        .map_err(|e| anyhow::anyhow!("reading the answer: {e}"))?;
    let mut answer: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(anyhow::Error::from)?;
    crate::audit::record(
        &state.pool,
        Some(principal.user_id),
        "webhook.registered",
        answer["webhook_id"].as_str(),
        None,
        serde_json::json!({"url": crate::audit::safe_url(&req.url), "filter": req.filter}),
    )
    .await;
    answer["secret"] = secret.into();
    parts.headers.remove(http::header::CONTENT_LENGTH);
    Ok(Response::from_parts(
        parts,
        Body::from(serde_json::to_vec(&answer).map_err(anyhow::Error::from)?),
    ))
}

fn view(r: &sqlx::postgres::PgRow) -> WebhookView {
    WebhookView {
        webhook_id: r.get("webhook_id"),
        url: r.get("url"),
        filter: r.get("filter"),
        description: r.get("description"),
        enabled: r.get("enabled"),
        created_at: r.get("created_at"),
        version: r.get("version"),
    }
}

/// Your endpoints, oldest first.
#[utoipa::path(get, path = "/v1/webhooks", tag = "webhooks", security(("bearer" = [])), params(PageParams),
    responses((status = 200, body = WebhookPage), (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 422, body = Problem)))]
pub async fn list_webhooks(
    State(state): State<AppState>,
    principal: Principal,
    AppQuery(params): AppQuery<PageParams>,
    after: AfterPosition,
) -> ApiResult<Response> {
    let position = wait_for(
        &state,
        MODEL,
        AfterPosition(params.after_position.or(after.0)),
    )
    .await?;
    let limit = limit(params.limit)?;
    let (after_us, after_id) = match &params.cursor {
        Some(c) => parse_cursor("w1", c)?,
        None => (i64::MIN, Uuid::nil()),
    };
    let rows = sqlx::query(
        "SELECT webhook_id, url, filter, description, enabled, created_at, version,
                (extract(epoch FROM created_at) * 1000000)::bigint AS us
         FROM proj_webhooks WHERE owner = $1 AND NOT deleted
           AND ((extract(epoch FROM created_at) * 1000000)::bigint, webhook_id) > ($2, $3)
         ORDER BY created_at, webhook_id LIMIT $4",
    )
    .bind(principal.user_id)
    .bind(after_us)
    .bind(after_id)
    .bind(limit + 1)
    .fetch_all(&state.pool)
    .await?;
    let more = rows.len() as i64 > limit;
    let items = rows.iter().take(limit as usize).map(view).collect();
    let next = rows
        .get(limit as usize - 1)
        .filter(|_| more)
        .map(|r| cursor("w1", r.get("us"), r.get("webhook_id")));
    Ok((position_header(position), Json(WebhookPage { items, next })).into_response())
}

/// One of your endpoints.
#[utoipa::path(get, path = "/v1/webhooks/{webhook_id}", tag = "webhooks", security(("bearer" = [])),
    params(("webhook_id" = Uuid, Path), ReadParams),
    responses((status = 200, body = WebhookView), (status = 401, body = Problem), (status = 404, body = Problem)))]
pub async fn get_webhook(
    State(state): State<AppState>,
    principal: Principal,
    AppPath(id): AppPath<Uuid>,
    after: AfterPosition,
) -> ApiResult<Response> {
    let position = wait_for(&state, MODEL, after).await?;
    let row = find(&state, MODEL, || {
        sqlx::query(
            "SELECT webhook_id, url, filter, description, enabled, created_at, version FROM proj_webhooks
             WHERE webhook_id = $1 AND owner = $2 AND NOT deleted",
        )
        .bind(id)
        .bind(principal.user_id)
        .fetch_optional(&state.pool)
    })
    .await?
    .ok_or_else(not_found)?;
    Ok((position_header(position), Json(view(&row))).into_response())
}

/// Change the URL, the filter or the description, or disable (`enabled: false`) / enable.
#[utoipa::path(patch, path = "/v1/webhooks/{webhook_id}", tag = "webhooks", security(("bearer" = [])),
    request_body = UpdateWebhookRequest,
    params(("webhook_id" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header), ("If-Match" = Option<String>, Header)),
    responses((status = 200, description = "changed", example = json!({"webhook_id": "0193…", "enabled": false, "position": 130, "version": 2})),
        (status = 400, body = Problem), (status = 401, body = Problem), (status = 404, body = Problem),
        (status = 412, body = Problem), (status = 422, body = Problem)))]
pub async fn update_webhook(
    State(state): State<AppState>,
    principal: Principal,
    options: WriteOptions,
    RequestId(rid): RequestId,
    uri: http::Uri,
    AppPath(endpoint_id): AppPath<Uuid>,
    AppJson(req): AppJson<UpdateWebhookRequest>,
) -> ApiResult<Response> {
    check(
        req.url.as_deref(),
        req.filter.as_deref(),
        req.description.as_deref(),
    )?;
    let cmd = WebhookCommand::UpdateWebhook {
        endpoint_id,
        url: req.url.clone(),
        filter: req.filter.clone(),
        description: req.description.clone(),
        enabled: req.enabled,
    };
    let res = command(&state, &principal, "PATCH", &uri, &options, rid, &req, cmd).await?;
    let url = req.url.as_deref().map(crate::audit::safe_url);
    let subject = endpoint_id.to_string();
    let detail = serde_json::json!({"url": url, "enabled": req.enabled});
    Ok(crate::audit::if_ok(
        &state.pool,
        res,
        principal.user_id,
        "webhook.updated",
        &subject,
        detail,
    )
    .await)
}

/// Delete an endpoint: its secret is destroyed and pending deliveries are cancelled.
#[utoipa::path(delete, path = "/v1/webhooks/{webhook_id}", tag = "webhooks", security(("bearer" = [])),
    params(("webhook_id" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header)),
    responses((status = 200, description = "deleted", example = json!({"webhook_id": "0193…", "deleted": true, "position": 140, "version": 3})),
        (status = 401, body = Problem), (status = 404, body = Problem)))]
pub async fn delete_webhook(
    State(state): State<AppState>,
    principal: Principal,
    options: WriteOptions,
    RequestId(rid): RequestId,
    uri: http::Uri,
    AppPath(endpoint_id): AppPath<Uuid>,
) -> ApiResult<Response> {
    let cmd = WebhookCommand::DeleteWebhook { endpoint_id };
    let res = command(&state, &principal, "DELETE", &uri, &options, rid, &(), cmd).await?;
    let subject = endpoint_id.to_string();
    let detail = serde_json::json!({"secret_destroyed": true});
    Ok(crate::audit::if_ok(
        &state.pool,
        res,
        principal.user_id,
        "webhook.deleted",
        &subject,
        detail,
    )
    .await)
}

async fn deliveries(
    state: &AppState,
    principal: &Principal,
    id: Uuid,
    status: Option<&str>,
    params: &DeliveryParams,
    after: AfterPosition,
) -> ApiResult<Response> {
    let position = wait_for(
        state,
        MODEL,
        AfterPosition(params.after_position.or(after.0)),
    )
    .await?;
    require_owner(state, id, principal.user_id).await?;
    let limit = limit(params.limit)?;
    if let Some(s) = status
        && !["pending", "delivered", "dead", "cancelled"].contains(&s)
    {
        return Err(ApiError::field(
            "status",
            "pending, delivered, dead or cancelled",
        ));
    }
    let before = match &params.cursor {
        Some(c) => parse_cursor("d1", c)?.0,
        None => i64::MAX,
    };
    let rows = sqlx::query(
        "SELECT delivery_id, event_id, event_type, status, attempts, last_status, last_error, last_attempt_at,
                next_attempt_at, delivered_at, dead_at, position
         FROM webhook_deliveries WHERE webhook_id = $1 AND ($2::text IS NULL OR status = $2) AND position < $3
         ORDER BY position DESC LIMIT $4",
    )
    .bind(id)
    .bind(status)
    .bind(before)
    .bind(limit + 1)
    .fetch_all(&state.pool)
    .await?;
    let more = rows.len() as i64 > limit;
    let items = rows
        .iter()
        .take(limit as usize)
        .map(|r| DeliveryView {
            delivery_id: r.get("delivery_id"),
            event_id: r.get("event_id"),
            event_type: r.get("event_type"),
            status: r.get("status"),
            attempts: r.get("attempts"),
            last_status: r.get("last_status"),
            last_error: r.get("last_error"),
            last_attempt_at: r.get("last_attempt_at"),
            next_attempt_at: r.get("next_attempt_at"),
            delivered_at: r.get("delivered_at"),
            dead_at: r.get("dead_at"),
            position: r.get("position"),
        })
        .collect();
    let next = rows
        .get(limit as usize - 1)
        .filter(|_| more)
        .map(|r| cursor("d1", r.get("position"), r.get("delivery_id")));
    Ok((
        position_header(position),
        Json(DeliveryPage { items, next }),
    )
        .into_response())
}

/// An endpoint's deliveries, newest first: status, attempts, last error, next attempt.
#[utoipa::path(get, path = "/v1/webhooks/{webhook_id}/deliveries", tag = "webhooks", security(("bearer" = [])),
    params(("webhook_id" = Uuid, Path), DeliveryParams),
    responses((status = 200, body = DeliveryPage, example = json!({"items": [{"delivery_id": "5b1e…", "event_id": "0193…",
            "event_type": "notify.NotificationCreated", "status": "pending", "attempts": 2, "last_status": 503,
            "last_error": "HTTP 503", "last_attempt_at": "2026-12-01T19:00:01Z", "next_attempt_at": "2026-12-01T19:00:03Z",
            "delivered_at": null, "dead_at": null, "position": 88}], "next": null})),
        (status = 400, body = Problem), (status = 401, body = Problem), (status = 404, body = Problem), (status = 422, body = Problem)))]
pub async fn list_deliveries(
    State(state): State<AppState>,
    principal: Principal,
    AppPath(id): AppPath<Uuid>,
    AppQuery(params): AppQuery<DeliveryParams>,
    after: AfterPosition,
) -> ApiResult<Response> {
    let status = params.status.clone();
    deliveries(&state, &principal, id, status.as_deref(), &params, after).await
}

/// An endpoint's dead letters: deliveries whose retry schedule is spent.
#[utoipa::path(get, path = "/v1/webhooks/{webhook_id}/dead-letters", tag = "webhooks", security(("bearer" = [])),
    params(("webhook_id" = Uuid, Path), PageParams),
    responses((status = 200, body = DeliveryPage), (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 404, body = Problem), (status = 422, body = Problem)))]
pub async fn list_dead_letters(
    State(state): State<AppState>,
    principal: Principal,
    AppPath(id): AppPath<Uuid>,
    AppQuery(params): AppQuery<PageParams>,
    after: AfterPosition,
) -> ApiResult<Response> {
    let params = DeliveryParams {
        status: None,
        limit: params.limit,
        cursor: params.cursor,
        after_position: params.after_position,
    };
    deliveries(&state, &principal, id, Some("dead"), &params, after).await
}

/// Put one dead letter back in the queue, with a fresh retry schedule.
#[utoipa::path(post, path = "/v1/webhooks/{webhook_id}/dead-letters/{delivery_id}/redrive", tag = "webhooks",
    security(("bearer" = [])),
    params(("webhook_id" = Uuid, Path), ("delivery_id" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header)),
    responses((status = 200, description = "queued again", example = json!({"webhook_id": "0193…", "redriven": "5b1e…", "position": 150, "version": 4})),
        (status = 401, body = Problem), (status = 404, description = "no such webhook, or not a dead letter", body = Problem)))]
pub async fn redrive_one(
    State(state): State<AppState>,
    principal: Principal,
    options: WriteOptions,
    RequestId(rid): RequestId,
    uri: http::Uri,
    AppPath((endpoint_id, delivery_id)): AppPath<(Uuid, Uuid)>,
) -> ApiResult<Response> {
    require_owner(&state, endpoint_id, principal.user_id).await?;
    let dead: Option<i32> = sqlx::query_scalar(
        "SELECT 1 FROM webhook_deliveries WHERE delivery_id = $1 AND webhook_id = $2 AND status = 'dead'",
    )
    .bind(delivery_id)
    .bind(endpoint_id)
    .fetch_optional(&state.pool)
    .await?;
    if dead.is_none() {
        return Err(ApiError::coded(
            http::StatusCode::NOT_FOUND,
            "dead_letter_not_found",
            "no such dead letter",
        ));
    }
    let cmd = WebhookCommand::RedriveDeadLetters {
        endpoint_id,
        delivery_id: Some(delivery_id),
    };
    command(&state, &principal, "POST", &uri, &options, rid, &(), cmd).await
}

/// Put every dead letter of the endpoint back in the queue.
#[utoipa::path(post, path = "/v1/webhooks/{webhook_id}/dead-letters/redrive", tag = "webhooks",
    security(("bearer" = [])),
    params(("webhook_id" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header)),
    responses((status = 200, description = "queued again", example = json!({"webhook_id": "0193…", "redriven": "all", "position": 151, "version": 5})),
        (status = 401, body = Problem), (status = 404, body = Problem)))]
pub async fn redrive_all(
    State(state): State<AppState>,
    principal: Principal,
    options: WriteOptions,
    RequestId(rid): RequestId,
    uri: http::Uri,
    AppPath(endpoint_id): AppPath<Uuid>,
) -> ApiResult<Response> {
    let cmd = WebhookCommand::RedriveDeadLetters {
        endpoint_id,
        delivery_id: None,
    };
    command(&state, &principal, "POST", &uri, &options, rid, &(), cmd).await
}
