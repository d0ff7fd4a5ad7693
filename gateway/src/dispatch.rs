//! The write path: a command in, its answer out, idempotently.
//!
//! 1. The command id is the `Idempotency-Key` made unique per principal and
//!    route (UUIDv5 of the three), or a fresh UUIDv7 without a key.
//! 2. A decided command is in the ledger: same request hash → the stored answer
//!    again with `Idempotent-Replayed: true`; another hash → 422. The handler
//!    answers a redelivered command from the ledger, so the hot path has no
//!    extra read.
//! 3. Requests for one command id on this instance share one publish and one
//!    outcome; a twin with another body → 422.
//! 4. The envelope goes to `COMMANDS` with `Nats-Msg-Id` = command id; the
//!    handlers answer on this instance's inbox. No answer within the command
//!    timeout (or `Prefer: respond-async`) → 202 with `Location: /v1/commands/{id}`.

use std::time::Duration;

use axum::Json;
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use commands::Command;
use handlers::{CommandEnvelope, Outcome, bus, ledger};
use http::{HeaderValue, StatusCode};
use redis::AsyncCommands;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use uuid::Uuid;

use crate::auth::Principal;
use crate::error::{ApiError, ApiResult, problem_response};
use crate::extract::WriteOptions;
use crate::state::{AppState, Registration};

const COMMAND_NS: Uuid = Uuid::from_u128(0x6d61_7468_6961_5f63_6d64_5f6e_7300_0001);

/// How long the "sent but not decided yet" marker lives in Redis.
const PENDING_TTL_SECS: u64 = 24 * 3600;

/// The route a write was made on, for the idempotency scope: `POST /v1/transfers`.
pub struct Route<'a> {
    /// HTTP method.
    pub method: &'a str,
    /// Concrete path.
    pub path: &'a str,
}

impl<'a> Route<'a> {
    /// A POST to `uri`'s path.
    pub fn post(uri: &'a http::Uri) -> Self {
        Route {
            method: "POST",
            path: uri.path(),
        }
    }
}

/// The usual write: send `command` for the route `method` + `uri` (the command
/// id is the idempotency key's, or fresh) and answer with its outcome.
#[allow(clippy::too_many_arguments)]
pub async fn send<B: Serialize>(
    state: &AppState,
    principal: &Principal,
    method: &str,
    uri: &http::Uri,
    options: &WriteOptions,
    correlation_id: Uuid,
    body: &B,
    command: impl Into<Command>,
) -> ApiResult<Response> {
    let command = command.into();
    dispatch(
        state,
        principal,
        Route {
            method,
            path: uri.path(),
        },
        options,
        correlation_id,
        body,
        |_| Ok(command),
    )
    .await
}

/// Send `command` and answer with its outcome.
pub async fn dispatch<B: Serialize>(
    state: &AppState,
    principal: &Principal,
    route: Route<'_>,
    options: &WriteOptions,
    correlation_id: Uuid,
    body: &B,
    command: impl FnOnce(Uuid) -> ApiResult<Command>,
) -> ApiResult<Response> {
    let command_id = match &options.idempotency_key {
        Some(key) => Uuid::new_v5(
            &COMMAND_NS,
            format!(
                "{}|{} {}|{key}",
                principal.user_id, route.method, route.path
            )
            .as_bytes(),
        ),
        None => Uuid::now_v7(),
    };
    let request_hash = request_hash(&route, body, options.if_match)?;
    let command = command(command_id)?;
    // What a reused key's answer is compared with, to name the field that differs.
    let fields = match &command {
        Command::Wallet(c) => c.request_fields(),
        _ => serde_json::Value::Null,
    };

    // No ledger read here: a command decided before is answered from the ledger
    // by the handler (flagged `replayed`), or, inside JetStream's duplicate
    // window, found by polling the ledger in `wait`.
    let receiver = match state.register(command_id, &request_hash) {
        Registration::Mismatch => return Err(key_reused(None, &fields)),
        Registration::Joined(rx) => {
            return wait(state, rx, command_id, &request_hash, &fields, true).await;
        }
        Registration::First(rx) => rx,
    };

    let envelope = CommandEnvelope {
        command_id,
        correlation_id,
        actor: principal.actor(),
        issued_at: Utc::now(),
        request_hash: request_hash.clone(),
        command,
        expected_version: options.if_match,
    };
    let duplicate = match bus::publish_command_in(
        &state.js,
        &state.subjects,
        &envelope,
        &state.reply_subject(command_id),
        crate::trace::current(),
    )
    .await
    {
        Ok(bus::Published::Stored { duplicate }) => duplicate,
        Ok(bus::Published::Unknown) => {
            // It may be stored: promise nothing, point at the poll.
            state.forget(command_id);
            mark_pending(state, command_id, principal.user_id).await;
            return Ok(accepted(command_id));
        }
        Err(e) => {
            state.forget(command_id);
            return Err(ApiError::Unavailable(format!(
                "the command bus is unavailable: {e}"
            )));
        }
    };
    if options.respond_async {
        // Nobody waits on this one here: do not keep a registration for it.
        state.forget(command_id);
        mark_pending(state, command_id, principal.user_id).await;
        return Ok(accepted(command_id));
    }
    // A duplicate publish means another instance sent it: its answer goes there, so poll the ledger.
    let res = wait(
        state,
        receiver,
        command_id,
        &request_hash,
        &fields,
        duplicate,
    )
    .await;
    if matches!(&res, Ok(r) if r.status() == StatusCode::ACCEPTED) {
        mark_pending(state, command_id, principal.user_id).await;
    }
    res
}

async fn wait(
    state: &AppState,
    mut rx: watch::Receiver<Option<Outcome>>,
    command_id: Uuid,
    request_hash: &str,
    fields: &serde_json::Value,
    replayed: bool,
) -> ApiResult<Response> {
    let deadline = tokio::time::Instant::now() + state.settings.command_timeout;
    let mut poll = tokio::time::interval(Duration::from_millis(50));
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Poll the ledger when the answer goes elsewhere (another instance sent the
    // command) or when the registration was dropped (its first request gave up).
    let mut polling = replayed;
    loop {
        tokio::select! {
            changed = rx.changed(), if !polling => {
                match changed {
                    Ok(()) => {
                        if let Some(outcome) = rx.borrow_and_update().clone() {
                            // Always compare hashes: after JetStream's window a differently-bodied
                            // retry can be answered with the original's outcome.
                            if outcome.request_hash != request_hash {
                                return Err(key_reused(Some(&outcome), fields));
                            }
                            let was_replayed = replayed || outcome.replayed;
                            return Ok(answer(outcome, was_replayed));
                        }
                    }
                    Err(_) => polling = true,
                }
            }
            _ = poll.tick(), if polling => {
                if let Some(prior) = ledger::find(&state.pool, &[command_id]).await?.remove(&command_id) {
                    state.forget(command_id);
                    return replay(prior, request_hash, fields);
                }
            }
            _ = tokio::time::sleep_until(deadline) => {
                state.forget(command_id);
                return Ok(accepted(command_id));
            }
        }
    }
}

/// 422 for a key reused with another body. When the first command's answer
/// (or rejection) carries its request fields (wallet commands do), the problem
/// names the first field that differs and its first value.
fn key_reused(first: Option<&Outcome>, fields: &serde_json::Value) -> ApiError {
    let original = first.and_then(|o| {
        o.body
            .get("request")
            .or_else(|| o.body.get("details").and_then(|d| d.get("request")))
    });
    let differing = match (original, fields) {
        (Some(serde_json::Value::Object(was)), serde_json::Value::Object(now)) => now
            .iter()
            .find(|(k, v)| was.get(*k).unwrap_or(&serde_json::Value::Null) != *v)
            .map(|(k, _)| (k.clone(), was.get(k).cloned().unwrap_or_default())),
        _ => None,
    };
    let mut extra = serde_json::Map::new();
    let message = match differing {
        Some((field, was)) => {
            let message = format!(
                "this Idempotency-Key was used with a different request: `{field}` differs (first request: {was})"
            );
            extra.insert("field".into(), field.clone().into());
            extra.insert("original".into(), was);
            message
        }
        None => "this Idempotency-Key was used with a different request body".into(),
    };
    ApiError::Coded {
        status: StatusCode::UNPROCESSABLE_ENTITY,
        code: "idempotency_key_reused".into(),
        message,
        extra,
    }
}

fn replay(outcome: Outcome, request_hash: &str, fields: &serde_json::Value) -> ApiResult<Response> {
    if outcome.request_hash != request_hash {
        return Err(key_reused(Some(&outcome), fields));
    }
    Ok(answer(outcome, true))
}

/// Render a decided command: the resource, or the rejection as a problem.
pub fn answer(outcome: Outcome, replayed: bool) -> Response {
    let status = StatusCode::from_u16(outcome.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let version = outcome.body.get("version").and_then(|v| v.as_i64());
    let mut res = if status.is_success() {
        (status, Json(outcome.body)).into_response()
    } else {
        let rejection: commands::Rejection =
            serde_json::from_value(outcome.body).unwrap_or_else(|_| {
                commands::Rejection::new(outcome.status, "rejected", "the command was rejected")
            });
        let mut extra = serde_json::Map::new();
        if let serde_json::Value::Object(details) = rejection.details {
            extra = details;
        }
        if replayed {
            // TigerBeetle's contract: the id is spent on a failure; a new attempt needs a new id.
            extra.insert("result".into(), "id_already_failed".into());
        }
        let err = ApiError::Coded {
            status,
            code: rejection.code,
            message: rejection.message,
            extra,
        };
        problem_response(&err.problem())
    };
    let headers = res.headers_mut();
    if let Some(p) = outcome.position
        && let Ok(v) = HeaderValue::from_str(&p.to_string())
    {
        headers.insert("mathia-position", v);
    }
    if replayed {
        headers.insert("idempotent-replayed", HeaderValue::from_static("true"));
        // `exists`: the id was decided before and this is its first answer again.
        let result = if status.is_success() {
            "exists"
        } else {
            "id_already_failed"
        };
        headers.insert("mathia-result", HeaderValue::from_static(result));
    }
    if status.is_success()
        && let Some(v) = version.and_then(|v| HeaderValue::from_str(&format!("\"{v}\"")).ok())
    {
        headers.insert(http::header::ETAG, v);
    }
    res
}

fn accepted(command_id: Uuid) -> Response {
    let location = format!("/v1/commands/{command_id}");
    let mut res = (
        StatusCode::ACCEPTED,
        Json(serde_json::json!({ "command_id": command_id, "status": "pending", "location": location })),
    )
        .into_response();
    if let Ok(v) = HeaderValue::from_str(&location) {
        res.headers_mut().insert(http::header::LOCATION, v);
    }
    res
}

/// Remember that `command_id` was sent for `principal`, so polling it says
/// "pending" rather than "not found" before it is decided.
async fn mark_pending(state: &AppState, command_id: Uuid, principal: Uuid) {
    let mut redis = state.redis.clone();
    let key = state.redis_key(&format!("cmd:pending:{command_id}"));
    let r: Result<(), _> = redis
        .set_ex(key, principal.to_string(), PENDING_TTL_SECS)
        .await;
    if let Err(e) = r {
        tracing::warn!(error = %e, "could not mark a command pending in Redis");
    }
}

/// Whether `command_id` was sent by `principal` and is not decided yet.
pub async fn is_pending(state: &AppState, command_id: Uuid, principal: Uuid) -> ApiResult<bool> {
    let mut redis = state.redis.clone();
    let owner: Option<String> = redis
        .get(state.redis_key(&format!("cmd:pending:{command_id}")))
        .await?;
    Ok(owner.as_deref() == Some(principal.to_string().as_str()))
}

fn request_hash<B: Serialize>(
    route: &Route<'_>,
    body: &B,
    if_match: Option<i64>,
) -> ApiResult<String> {
    // serde_json maps keep keys sorted, so the hash ignores key order and white space.
    let canonical = serde_json::to_value(body).map_err(anyhow::Error::from)?;
    let mut h = Sha256::new();
    h.update(route.method.as_bytes());
    h.update(b" ");
    h.update(route.path.as_bytes());
    h.update(b"\n");
    h.update(canonical.to_string().as_bytes());
    if let Some(v) = if_match {
        h.update(format!("\nif-match {v}").as_bytes());
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}
