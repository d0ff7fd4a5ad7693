//! Room notes ("memory"): pinned notes that the members and the assistant read.
//!
//! A note's text is sealed under a key of its own, kept like a message key
//! (wrapped by the room key), so unpinning a note or deleting its room erases
//! it. A high-priority note follows its author: the notes list of every room
//! the author is in shows it too (marked with its own `room_id`), to the
//! author only, and only while they are still a member of the room it was
//! pinned in.

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use commands::Command;
use commands::chat::ChatCommand;
use commands::crypto;
use events::chat::{Bytes64, NotePriority, Sealed};
use serde::{Deserialize, Serialize};
use sqlx::Row;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::auth::Principal;
use crate::consistency::{AfterPosition, ReadParams, position_header, wait_for};
use crate::dispatch::{Route, dispatch};
use crate::error::{ApiError, ApiResult, Problem};
use crate::extract::{AppJson, AppPath, RequestId, WriteOptions};
use crate::routes::rooms::{MODEL, require_member, room_not_found};
use crate::state::AppState;

/// Longest note, in bytes.
pub const MAX_NOTE: usize = 4 * 1024;

/// Pin a note.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PinNoteRequest {
    /// 1 to 4,096 bytes of UTF-8.
    #[schema(example = "Ferry leaves Mokowe at 7:00; bring cash for the jetty fee.")]
    pub body: String,
    /// `low`, `normal` (default) or `high` (shown across your rooms).
    #[schema(value_type = Option<String>, example = "high")]
    pub priority: Option<NotePriority>,
}

/// Change a note (its author, or a moderator).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EditNoteRequest {
    /// New text.
    pub body: Option<String>,
    /// New priority.
    #[schema(value_type = Option<String>)]
    pub priority: Option<NotePriority>,
}

/// A note as a member sees it.
#[derive(Debug, Serialize, ToSchema)]
pub struct NoteView {
    /// Note id.
    pub note_id: Uuid,
    /// The room it is pinned in.
    pub room_id: Uuid,
    /// Who wrote it.
    pub author: Uuid,
    /// `low`, `normal` or `high`.
    pub priority: String,
    /// The text.
    pub body: Option<String>,
    /// Pinned at.
    pub created_at: DateTime<Utc>,
    /// Last changed at.
    pub updated_at: DateTime<Utc>,
    /// True for one of your high-priority notes from another room.
    pub from_other_room: bool,
}

/// The notes of a room, then your high-priority notes of your other rooms.
#[derive(Debug, Serialize, ToSchema)]
pub struct NoteList {
    /// Notes, this room's first (high priority first, then oldest first).
    pub items: Vec<NoteView>,
}

fn note_text(body: &str) -> ApiResult<()> {
    if body.trim().is_empty() {
        return Err(ApiError::field("body", "must not be empty"));
    }
    if body.len() > MAX_NOTE {
        return Err(ApiError::field(
            "body",
            format!("at most {MAX_NOTE} bytes of UTF-8"),
        ));
    }
    if body.contains('\0') {
        return Err(ApiError::field("body", "must not contain NUL characters"));
    }
    Ok(())
}

/// What the idempotency hash sees: a keyed fingerprint of the text, never the text.
#[derive(Serialize)]
struct Hashed {
    fingerprint: Option<String>,
    priority: Option<NotePriority>,
}

/// Pin a note to the room (any member).
#[utoipa::path(post, path = "/v1/rooms/{room_id}/notes", tag = "chat", security(("bearer" = [])), request_body = PinNoteRequest,
    params(("room_id" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header)),
    responses((status = 201, description = "pinned", example = json!({"room_id": "0193…", "note_id": "0193…", "author": "0193…", "priority": "high", "position": 61, "version": 9})),
        (status = 400, body = Problem), (status = 401, body = Problem), (status = 404, body = Problem),
        (status = 409, description = "archived room", body = Problem), (status = 422, body = Problem)))]
pub async fn pin_note(
    State(state): State<AppState>,
    principal: Principal,
    options: WriteOptions,
    RequestId(rid): RequestId,
    uri: http::Uri,
    AppPath(room_id): AppPath<Uuid>,
    AppJson(req): AppJson<PinNoteRequest>,
) -> ApiResult<Response> {
    note_text(&req.body)?;
    let Some(keys) = state.keystore.room_keys(&state.pool, room_id).await? else {
        return Err(room_not_found());
    };
    let priority = req.priority.unwrap_or(NotePriority::Normal);
    let hashed = Hashed {
        fingerprint: Some(crypto::fingerprint(&keys.search, req.body.as_bytes())),
        priority: Some(priority),
    };
    dispatch(
        &state,
        &principal,
        Route::post(&uri),
        &options,
        rid,
        &hashed,
        |note_id| {
            let (key, wrapped) = handlers::keystore::new_message_key(&keys.current, note_id);
            let body = crypto::seal(
                &key,
                &crypto::field_aad(note_id, "note"),
                req.body.as_bytes(),
            );
            Ok(Command::Chat(ChatCommand::PinNote {
                room_id,
                note_id,
                priority,
                body,
                key_version: keys.version,
                note_key: Bytes64(wrapped),
            }))
        },
    )
    .await
}

/// The room's notes, then the caller's high-priority notes from their other rooms.
#[utoipa::path(get, path = "/v1/rooms/{room_id}/notes", tag = "chat", security(("bearer" = [])),
    params(("room_id" = Uuid, Path), ReadParams),
    responses((status = 200, body = NoteList), (status = 401, body = Problem), (status = 404, body = Problem)))]
pub async fn list_notes(
    State(state): State<AppState>,
    principal: Principal,
    AppPath(room_id): AppPath<Uuid>,
    after: AfterPosition,
) -> ApiResult<Response> {
    let position = wait_for(&state, MODEL, after).await?;
    require_member(&state, room_id, principal.user_id).await?;
    let rows = sqlx::query(
        "SELECT n.note_id, n.room_id, n.author, n.priority, n.body, n.created_at, n.updated_at,
                n.room_id <> $1 AS other
         FROM proj_chat_notes n
         WHERE n.room_id = $1
            OR (n.author = $2 AND n.priority = 'high' AND EXISTS (
                  SELECT 1 FROM proj_chat_members m
                  WHERE m.room_id = n.room_id AND m.user_id = $2 AND m.state = 'joined'))
         ORDER BY other, n.priority = 'high' DESC, n.position",
    )
    .bind(room_id)
    .bind(principal.user_id)
    .fetch_all(&state.pool)
    .await?;
    let ids: Vec<Uuid> = rows.iter().map(|r| r.get("note_id")).collect();
    let mut conn = state.pool.acquire().await?;
    let keys = state.keystore.message_keys(&mut conn, &ids).await?;
    let items = rows
        .iter()
        .map(|r| {
            let id: Uuid = r.get("note_id");
            let body = serde_json::from_value::<Sealed>(r.get("body"))
                .ok()
                .and_then(|s| crypto::open(keys.get(&id)?, &crypto::field_aad(id, "note"), &s).ok())
                .map(|b| String::from_utf8_lossy(&b).into_owned());
            NoteView {
                note_id: id,
                room_id: r.get("room_id"),
                author: r.get("author"),
                priority: r.get("priority"),
                body,
                created_at: r.get("created_at"),
                updated_at: r.get("updated_at"),
                from_other_room: r.get("other"),
            }
        })
        .collect();
    Ok((position_header(position), Json(NoteList { items })).into_response())
}

/// Change a note's text or priority (its author, or a moderator).
#[utoipa::path(patch, path = "/v1/rooms/{room_id}/notes/{note_id}", tag = "chat", security(("bearer" = [])),
    request_body = EditNoteRequest,
    params(("room_id" = Uuid, Path), ("note_id" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header)),
    responses((status = 200, description = "changed"), (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 403, body = Problem), (status = 404, body = Problem), (status = 422, body = Problem)))]
pub async fn edit_note(
    State(state): State<AppState>,
    principal: Principal,
    options: WriteOptions,
    RequestId(rid): RequestId,
    uri: http::Uri,
    AppPath((room_id, note_id)): AppPath<(Uuid, Uuid)>,
    AppJson(req): AppJson<EditNoteRequest>,
) -> ApiResult<Response> {
    if let Some(b) = &req.body {
        note_text(b)?;
    }
    if req.body.is_none() && req.priority.is_none() {
        return Err(ApiError::field("body", "give a body, a priority or both"));
    }
    // Strangers learn nothing, not even whether the note exists.
    require_member(&state, room_id, principal.user_id).await?;
    let Some(room_keys) = state.keystore.room_keys(&state.pool, room_id).await? else {
        return Err(room_not_found());
    };
    // The note keeps its key; a missing key means no such note (or unpinned).
    let key = match &req.body {
        None => None,
        Some(_) => {
            let mut conn = state.pool.acquire().await?;
            let mut keys = state.keystore.message_keys(&mut conn, &[note_id]).await?;
            Some(keys.remove(&note_id).ok_or_else(|| {
                ApiError::coded(
                    http::StatusCode::NOT_FOUND,
                    "note_not_found",
                    "no such note in this room",
                )
            })?)
        }
    };
    let hashed = Hashed {
        fingerprint: req
            .body
            .as_ref()
            .map(|b| crypto::fingerprint(&room_keys.search, b.as_bytes())),
        priority: req.priority,
    };
    dispatch(
        &state,
        &principal,
        Route {
            method: "PATCH",
            path: uri.path(),
        },
        &options,
        rid,
        &hashed,
        |_| {
            let body = match (&req.body, &key) {
                (Some(b), Some(k)) => Some(crypto::seal(
                    k,
                    &crypto::field_aad(note_id, "note"),
                    b.as_bytes(),
                )),
                _ => None,
            };
            Ok(Command::Chat(ChatCommand::EditNote {
                room_id,
                note_id,
                body,
                priority: req.priority,
            }))
        },
    )
    .await
}

/// Unpin a note: its key is destroyed, so its text is gone for good (its author, or a moderator).
#[utoipa::path(delete, path = "/v1/rooms/{room_id}/notes/{note_id}", tag = "chat", security(("bearer" = [])),
    params(("room_id" = Uuid, Path), ("note_id" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header)),
    responses((status = 200, description = "unpinned"), (status = 401, body = Problem),
        (status = 403, body = Problem), (status = 404, body = Problem)))]
pub async fn unpin_note(
    State(state): State<AppState>,
    principal: Principal,
    options: WriteOptions,
    RequestId(rid): RequestId,
    uri: http::Uri,
    AppPath((room_id, note_id)): AppPath<(Uuid, Uuid)>,
) -> ApiResult<Response> {
    let cmd = ChatCommand::UnpinNote { room_id, note_id };
    crate::routes::rooms::room_command(&state, &principal, "DELETE", &uri, &options, rid, &(), cmd)
        .await
}
