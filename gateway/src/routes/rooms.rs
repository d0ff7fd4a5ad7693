//! Rooms and membership: create, update, archive, delete, rotate keys; invite,
//! join (public or invited), decline, leave, kick, ban, unban, roles; the
//! caller's rooms with unread counts, invitations, the public directory.
//!
//! Existence is private: every room endpoint answers 404 `room_not_found` to
//! whoever is not a member, exactly as for a room that does not exist.
//!
//! Membership is read from the chat model, which applies a create or a join a
//! moment after its command was answered. A check that finds no membership
//! looks once more after the model has caught up with the log
//! (`consistency::look_again_when_missing`), so the owner of a room just
//! created, or a user who just joined, is never told it does not exist. The wait
//! does not depend on the room, so a stranger learns nothing from it.

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use commands::Command;
use commands::chat::ChatCommand;
use events::chat::{Bytes64, MemberRole, Visibility};
use serde::{Deserialize, Serialize};
use sqlx::Row;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::auth::Principal;
use crate::consistency::{AfterPosition, ReadParams, find, position_header, wait_for};
use crate::dispatch::{Route, dispatch};
use crate::error::{ApiError, ApiResult, FieldError, Problem};
use crate::extract::{AppJson, AppPath, RequestId, WriteOptions};
use crate::state::AppState;

/// The chat read model's name (for `after_position`).
pub const MODEL: &str = "chat";

/// Create a room.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateRoomRequest {
    /// 1 to 100 characters.
    #[schema(example = "Trip to Lamu")]
    pub name: String,
    /// Up to 500 characters.
    pub topic: Option<String>,
    /// `private` (default: invitation only) or `public` (anyone may join).
    #[schema(value_type = Option<String>, example = "private")]
    pub visibility: Option<Visibility>,
}

/// Rename, or change the topic (moderators and owners).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateRoomRequest {
    /// New name.
    pub name: Option<String>,
    /// New topic; "" clears it.
    pub topic: Option<String>,
}

/// Invite a user by id, or anyone by email address.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InviteRequest {
    /// The user.
    pub user_id: Option<Uuid>,
    /// Or their address; an address without an account is invited as is, and
    /// whoever registers it can join.
    pub email: Option<String>,
}

/// Change a member's role (owners).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RoleRequest {
    /// `member`, `moderator` or `owner`.
    #[schema(value_type = String, example = "moderator")]
    pub role: MemberRole,
}

/// Unread counts of one thread.
#[derive(Debug, Serialize, ToSchema)]
pub struct ThreadUnread {
    /// The thread's root message.
    pub thread_root: Uuid,
    /// Replies not read.
    pub unread: i32,
    /// Of which mention the caller.
    pub mentions: i32,
}

/// A room as the caller sees it.
#[derive(Debug, Serialize, ToSchema)]
pub struct RoomView {
    /// Room id.
    pub room_id: Uuid,
    /// Name.
    pub name: String,
    /// Topic.
    pub topic: Option<String>,
    /// `private` or `public`.
    pub visibility: String,
    /// Read-only.
    pub archived: bool,
    /// The caller's role.
    pub role: Option<String>,
    /// Joined members.
    pub member_count: i64,
    /// Root-level messages the caller has not read.
    pub unread: i32,
    /// Of which mention the caller.
    pub mentions: i32,
    /// Threads with unread replies.
    pub threads: Vec<ThreadUnread>,
    /// Current key version.
    pub key_version: i32,
    /// Stream version (use with `If-Match`).
    pub version: i64,
    /// Position of the latest message.
    pub last_position: i64,
    /// Creator.
    pub created_by: Uuid,
    /// Created at.
    pub created_at: DateTime<Utc>,
}

/// Rooms.
#[derive(Debug, Serialize, ToSchema)]
pub struct RoomList {
    /// Most recently active first.
    pub items: Vec<RoomView>,
}

/// A member.
#[derive(Debug, Serialize, ToSchema)]
pub struct MemberView {
    /// The user.
    pub user_id: Uuid,
    /// `owner`, `moderator`, `member`.
    pub role: Option<String>,
    /// `joined` or `invited` (moderators also see `banned`).
    pub state: String,
    /// Since when.
    pub since: DateTime<Utc>,
}

/// Members.
#[derive(Debug, Serialize, ToSchema)]
pub struct MemberList {
    /// Members, by role then time.
    pub items: Vec<MemberView>,
}

/// A pending invitation of the caller.
#[derive(Debug, Serialize, ToSchema)]
pub struct InviteView {
    /// The room.
    pub room_id: Uuid,
    /// Its name.
    pub name: String,
    /// Its topic.
    pub topic: Option<String>,
    /// When.
    pub since: DateTime<Utc>,
}

/// Pending invitations.
#[derive(Debug, Serialize, ToSchema)]
pub struct InviteList {
    /// Invitations, newest first.
    pub items: Vec<InviteView>,
}

fn text(
    errors: &mut Vec<FieldError>,
    field: &str,
    v: Option<&str>,
    min: usize,
    max: usize,
) -> Option<String> {
    let v = v?.trim();
    let n = v.chars().count();
    if n < min || n > max || v.chars().any(char::is_control) {
        errors.push(FieldError {
            field: field.into(),
            message: format!("{min} to {max} printable characters"),
        });
        return None;
    }
    Some(v.to_owned())
}

/// The membership row of the user `user` (an SQL parameter, e.g. `$2`) in the
/// room `$1`, when they are a joined member: what [`require_member`] reads, and
/// what a timeline page's first statement checks in its place.
pub(crate) fn joined_member(user: &str) -> String {
    format!(
        "SELECT role FROM proj_chat_members WHERE room_id = $1 AND user_id = {user} AND state = 'joined'"
    )
}

/// The caller's role in `room`, or 404 when not a joined member.
pub async fn require_member(state: &AppState, room: Uuid, user: Uuid) -> ApiResult<String> {
    let role: Option<Option<String>> = find(state, MODEL, || {
        sqlx::query_scalar(sqlx::AssertSqlSafe(joined_member("$2")))
            .bind(room)
            .bind(user)
            .fetch_optional(&state.pool)
    })
    .await?;
    role.map(|r| r.unwrap_or_default())
        .ok_or_else(room_not_found)
}

/// The 404 of every room endpoint.
pub fn room_not_found() -> ApiError {
    ApiError::coded(
        http::StatusCode::NOT_FOUND,
        "room_not_found",
        "no such room",
    )
}

/// Send a room command (the usual write).
pub(crate) use crate::dispatch::send as room_command;

/// Create a room; the caller becomes its owner.
#[utoipa::path(post, path = "/v1/rooms", tag = "chat", security(("bearer" = [])), request_body = CreateRoomRequest,
    params(("Idempotency-Key" = Option<String>, Header, description = "≤ 255 visible ASCII characters")),
    responses((status = 201, description = "created", example = json!({"room_id": "0193…", "name": "Trip to Lamu", "visibility": "private", "role": "owner", "position": 12, "version": 1})),
        (status = 202, description = "poll Location"), (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 422, body = Problem), (status = 429, body = Problem)))]
pub async fn create_room(
    State(state): State<AppState>,
    principal: Principal,
    options: WriteOptions,
    RequestId(rid): RequestId,
    uri: http::Uri,
    AppJson(req): AppJson<CreateRoomRequest>,
) -> ApiResult<Response> {
    let mut errors = vec![];
    let name = text(&mut errors, "name", Some(&req.name), 1, 100);
    let topic = text(&mut errors, "topic", req.topic.as_deref(), 0, 500);
    let Some(name) = name else {
        return Err(ApiError::Invalid(errors));
    };
    if !errors.is_empty() {
        return Err(ApiError::Invalid(errors));
    }
    let visibility = req.visibility.unwrap_or(Visibility::Private);
    let keystore = state.keystore.clone();
    dispatch(
        &state,
        &principal,
        Route::post(&uri),
        &options,
        rid,
        &req,
        |command_id| {
            // The room id is the command id: a retry names the same room.
            let (_, wrapped) = keystore.new_room_key(command_id, 1);
            Ok(Command::Chat(ChatCommand::CreateRoom {
                room_id: command_id,
                name,
                topic,
                visibility,
                room_key: Bytes64(wrapped),
            }))
        },
    )
    .await
}

const ROOM_COLUMNS: &str = "r.room_id, r.name, r.topic, r.visibility, r.archived, r.key_version, r.version,
    r.last_position, r.created_by, r.created_at,
    (SELECT count(*) FROM proj_chat_members x WHERE x.room_id = r.room_id AND x.state = 'joined') AS member_count";

fn room_view(r: &sqlx::postgres::PgRow, role: Option<String>) -> RoomView {
    RoomView {
        room_id: r.get("room_id"),
        name: r.get("name"),
        topic: r.get("topic"),
        visibility: r.get("visibility"),
        archived: r.get("archived"),
        role,
        member_count: r.get("member_count"),
        unread: 0,
        mentions: 0,
        threads: vec![],
        key_version: r.get("key_version"),
        version: r.get("version"),
        last_position: r.get("last_position"),
        created_by: r.get("created_by"),
        created_at: r.get("created_at"),
    }
}

/// Fill in the caller's unread and mention counts.
async fn with_unread(state: &AppState, user: Uuid, rooms: &mut [RoomView]) -> ApiResult<()> {
    let ids: Vec<Uuid> = rooms.iter().map(|r| r.room_id).collect();
    let rows = sqlx::query(
        "SELECT room_id, thread_root, unread, mentions FROM proj_chat_unread
         WHERE user_id = $1 AND room_id = ANY($2) AND (thread_root = $3 OR unread > 0)",
    )
    .bind(user)
    .bind(&ids)
    .bind(projections::chat::MAIN)
    .fetch_all(&state.pool)
    .await?;
    for row in rows {
        let room: Uuid = row.get("room_id");
        let thread: Uuid = row.get("thread_root");
        let Some(view) = rooms.iter_mut().find(|r| r.room_id == room) else {
            continue;
        };
        if thread == projections::chat::MAIN {
            view.unread = row.get("unread");
            view.mentions = row.get("mentions");
        } else {
            view.threads.push(ThreadUnread {
                thread_root: thread,
                unread: row.get("unread"),
                mentions: row.get("mentions"),
            });
        }
    }
    Ok(())
}

/// The rooms the caller is a member of, most recently active first, with unread counts.
#[utoipa::path(get, path = "/v1/rooms", tag = "chat", security(("bearer" = [])), params(ReadParams),
    responses((status = 200, body = RoomList), (status = 401, body = Problem), (status = 503, body = Problem)))]
pub async fn list_rooms(
    State(state): State<AppState>,
    principal: Principal,
    after: AfterPosition,
) -> ApiResult<Response> {
    let position = wait_for(&state, MODEL, after).await?;
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {ROOM_COLUMNS}, m.role FROM proj_chat_rooms r
         JOIN proj_chat_members m ON m.room_id = r.room_id AND m.user_id = $1 AND m.state = 'joined'
         ORDER BY r.last_position DESC LIMIT 1000"
    )))
    .bind(principal.user_id)
    .fetch_all(&state.pool)
    .await?;
    let mut items: Vec<RoomView> = rows.iter().map(|r| room_view(r, r.get("role"))).collect();
    with_unread(&state, principal.user_id, &mut items).await?;
    Ok((position_header(position), Json(RoomList { items })).into_response())
}

/// Public rooms anyone signed in may join, newest first.
#[utoipa::path(get, path = "/v1/public-rooms", tag = "chat", security(("bearer" = [])),
    responses((status = 200, body = RoomList), (status = 401, body = Problem)))]
pub async fn public_rooms(
    State(state): State<AppState>,
    _principal: Principal,
) -> ApiResult<Response> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {ROOM_COLUMNS} FROM proj_chat_rooms r
         WHERE r.visibility = 'public' AND NOT r.archived ORDER BY r.created_at DESC LIMIT 200"
    )))
    .fetch_all(&state.pool)
    .await?;
    let items = rows.iter().map(|r| room_view(r, None)).collect();
    Ok(Json(RoomList { items }).into_response())
}

/// One room (members only).
#[utoipa::path(get, path = "/v1/rooms/{room_id}", tag = "chat", security(("bearer" = [])),
    params(("room_id" = Uuid, Path), ReadParams),
    responses((status = 200, body = RoomView), (status = 401, body = Problem),
        (status = 404, description = "no such room, or not a member", body = Problem), (status = 503, body = Problem)))]
pub async fn get_room(
    State(state): State<AppState>,
    principal: Principal,
    AppPath(room_id): AppPath<Uuid>,
    after: AfterPosition,
) -> ApiResult<Response> {
    let position = wait_for(&state, MODEL, after).await?;
    let role = require_member(&state, room_id, principal.user_id).await?;
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {ROOM_COLUMNS} FROM proj_chat_rooms r WHERE r.room_id = $1"
    )))
    .bind(room_id)
    .fetch_optional(&state.pool)
    .await?
    .ok_or_else(room_not_found)?;
    let mut views = [room_view(&row, Some(role))];
    with_unread(&state, principal.user_id, &mut views).await?;
    let [view] = views;
    let mut headers = position_header(position);
    if let Ok(v) = http::HeaderValue::from_str(&format!("\"{}\"", view.version)) {
        headers.insert(http::header::ETAG, v);
    }
    Ok((headers, Json(view)).into_response())
}

/// Rename the room or change its topic (moderators and owners).
#[utoipa::path(patch, path = "/v1/rooms/{room_id}", tag = "chat", security(("bearer" = [])), request_body = UpdateRoomRequest,
    params(("room_id" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header), ("If-Match" = Option<String>, Header, description = "the room's ETag")),
    responses((status = 200, description = "updated"), (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 403, body = Problem), (status = 404, body = Problem), (status = 409, description = "archived", body = Problem),
        (status = 412, body = Problem), (status = 422, body = Problem)))]
pub async fn update_room(
    State(state): State<AppState>,
    principal: Principal,
    options: WriteOptions,
    RequestId(rid): RequestId,
    uri: http::Uri,
    AppPath(room_id): AppPath<Uuid>,
    AppJson(req): AppJson<UpdateRoomRequest>,
) -> ApiResult<Response> {
    let mut errors = vec![];
    let name = text(&mut errors, "name", req.name.as_deref(), 1, 100);
    let topic = text(&mut errors, "topic", req.topic.as_deref(), 0, 500);
    if !errors.is_empty() {
        return Err(ApiError::Invalid(errors));
    }
    if name.is_none() && topic.is_none() {
        return Err(ApiError::field("name", "give a name or a topic"));
    }
    let cmd = ChatCommand::UpdateRoom {
        room_id,
        name,
        topic,
    };
    room_command(&state, &principal, "PATCH", &uri, &options, rid, &req, cmd).await
}

/// Make the room read-only (owners).
#[utoipa::path(post, path = "/v1/rooms/{room_id}/archive", tag = "chat", security(("bearer" = [])),
    params(("room_id" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header)),
    responses((status = 200, description = "archived"), (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 404, body = Problem), (status = 409, body = Problem)))]
pub async fn archive_room(
    State(state): State<AppState>,
    principal: Principal,
    options: WriteOptions,
    RequestId(rid): RequestId,
    uri: http::Uri,
    AppPath(room_id): AppPath<Uuid>,
) -> ApiResult<Response> {
    let cmd = ChatCommand::ArchiveRoom { room_id };
    room_command(&state, &principal, "POST", &uri, &options, rid, &(), cmd).await
}

/// Delete the room: every key that sealed its messages is destroyed (owners).
#[utoipa::path(delete, path = "/v1/rooms/{room_id}", tag = "chat", security(("bearer" = [])),
    params(("room_id" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header)),
    responses((status = 200, description = "deleted; its content is unrecoverable"), (status = 401, body = Problem),
        (status = 403, body = Problem), (status = 404, body = Problem)))]
pub async fn delete_room(
    State(state): State<AppState>,
    principal: Principal,
    options: WriteOptions,
    RequestId(rid): RequestId,
    uri: http::Uri,
    AppPath(room_id): AppPath<Uuid>,
) -> ApiResult<Response> {
    let cmd = ChatCommand::DeleteRoom { room_id };
    let res = room_command(&state, &principal, "DELETE", &uri, &options, rid, &(), cmd).await?;
    state.room_keys.forget(room_id);
    // Crypto-shredding: every key that sealed the room is gone.
    let subject = room_id.to_string();
    let detail = serde_json::json!({"keys_destroyed": true});
    Ok(crate::audit::if_ok(
        &state.pool,
        res,
        principal.user_id,
        "room.deleted",
        &subject,
        detail,
    )
    .await)
}

/// Seal new messages under a new key version; older messages keep theirs (owners).
#[utoipa::path(post, path = "/v1/rooms/{room_id}/keys/rotate", tag = "chat", security(("bearer" = [])),
    params(("room_id" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header)),
    responses((status = 200, description = "rotated", example = json!({"room_id": "0193…", "key_version": 2})),
        (status = 401, body = Problem), (status = 403, body = Problem), (status = 404, body = Problem),
        (status = 409, description = "rotated concurrently", body = Problem)))]
pub async fn rotate_key(
    State(state): State<AppState>,
    principal: Principal,
    options: WriteOptions,
    RequestId(rid): RequestId,
    uri: http::Uri,
    AppPath(room_id): AppPath<Uuid>,
) -> ApiResult<Response> {
    let Some(keys) = state.keystore.room_keys(&state.pool, room_id).await? else {
        return Err(room_not_found());
    };
    let version = keys.version + 1;
    let (_, wrapped) = state.keystore.new_room_key(room_id, version);
    let cmd = ChatCommand::RotateRoomKey {
        room_id,
        version,
        room_key: Bytes64(wrapped),
    };
    let res = room_command(
        &state, &principal, "POST", &uri, &options, rid, &version, cmd,
    )
    .await?;
    state.room_keys.forget(room_id);
    let subject = room_id.to_string();
    let detail = serde_json::json!({"key_version": version});
    Ok(crate::audit::if_ok(
        &state.pool,
        res,
        principal.user_id,
        "room.key_rotated",
        &subject,
        detail,
    )
    .await)
}

/// Members of the room (members only); moderators also see bans.
#[utoipa::path(get, path = "/v1/rooms/{room_id}/members", tag = "chat", security(("bearer" = [])),
    params(("room_id" = Uuid, Path), ReadParams),
    responses((status = 200, body = MemberList), (status = 401, body = Problem), (status = 404, body = Problem)))]
pub async fn list_members(
    State(state): State<AppState>,
    principal: Principal,
    AppPath(room_id): AppPath<Uuid>,
    after: AfterPosition,
) -> ApiResult<Response> {
    let position = wait_for(&state, MODEL, after).await?;
    let role = require_member(&state, room_id, principal.user_id).await?;
    let states: &[&str] = if role == "member" {
        &["joined", "invited"]
    } else {
        &["joined", "invited", "banned"]
    };
    let rows = sqlx::query(
        "SELECT user_id, role, state, since FROM proj_chat_members WHERE room_id = $1 AND state = ANY($2)
         ORDER BY CASE role WHEN 'owner' THEN 0 WHEN 'moderator' THEN 1 ELSE 2 END, since",
    )
    .bind(room_id)
    .bind(states)
    .fetch_all(&state.pool)
    .await?;
    let items = rows
        .iter()
        .map(|r| MemberView {
            user_id: r.get("user_id"),
            role: r.get("role"),
            state: r.get("state"),
            since: r.get("since"),
        })
        .collect();
    Ok((position_header(position), Json(MemberList { items })).into_response())
}

/// Invite a user, or an email address (moderators in private rooms; anyone in public ones).
#[utoipa::path(post, path = "/v1/rooms/{room_id}/invites", tag = "chat", security(("bearer" = [])), request_body = InviteRequest,
    params(("room_id" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header)),
    responses((status = 201, description = "invited"), (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 403, body = Problem), (status = 404, body = Problem),
        (status = 409, description = "already a member, invited or banned", body = Problem), (status = 422, body = Problem)))]
pub async fn invite(
    State(state): State<AppState>,
    principal: Principal,
    options: WriteOptions,
    RequestId(rid): RequestId,
    uri: http::Uri,
    AppPath(room_id): AppPath<Uuid>,
    AppJson(req): AppJson<InviteRequest>,
) -> ApiResult<Response> {
    let (user_id, email) = match (&req.user_id, &req.email) {
        (Some(u), None) => (Some(*u), None),
        (None, Some(e)) => {
            let e = e.trim().to_lowercase();
            if e.len() > 254
                || !e.contains('@')
                || e.chars().any(|c| c.is_control() || c.is_whitespace())
            {
                return Err(ApiError::field("email", "an email address"));
            }
            // An address with an account invites that account.
            let user: Option<Uuid> =
                sqlx::query_scalar("SELECT user_id FROM users WHERE email = $1")
                    .bind(&e)
                    .fetch_optional(&state.pool)
                    .await?;
            match user {
                Some(u) => (Some(u), None),
                None => (None, Some(e)),
            }
        }
        _ => {
            return Err(ApiError::field(
                "user_id",
                "give exactly one of user_id and email",
            ));
        }
    };
    let cmd = ChatCommand::Invite {
        room_id,
        user_id,
        email,
    };
    room_command(&state, &principal, "POST", &uri, &options, rid, &req, cmd).await
}

/// The caller's pending invitations (to their account or their address).
#[utoipa::path(get, path = "/v1/invites", tag = "chat", security(("bearer" = [])), params(ReadParams),
    responses((status = 200, body = InviteList), (status = 401, body = Problem)))]
pub async fn list_invites(
    State(state): State<AppState>,
    principal: Principal,
    after: AfterPosition,
) -> ApiResult<Response> {
    let position = wait_for(&state, MODEL, after).await?;
    let rows = sqlx::query(
        "SELECT r.room_id, r.name, r.topic, i.since FROM (
            SELECT room_id, since FROM proj_chat_members WHERE user_id = $1 AND state = 'invited'
            UNION
            SELECT e.room_id, e.at FROM proj_chat_email_invites e JOIN users u ON u.email = e.email
            WHERE u.user_id = $1 AND NOT EXISTS (SELECT 1 FROM proj_chat_members m
                WHERE m.room_id = e.room_id AND m.user_id = $1 AND m.state IN ('joined', 'banned'))
         ) i JOIN proj_chat_rooms r ON r.room_id = i.room_id ORDER BY i.since DESC",
    )
    .bind(principal.user_id)
    .fetch_all(&state.pool)
    .await?;
    let items = rows
        .iter()
        .map(|r| InviteView {
            room_id: r.get("room_id"),
            name: r.get("name"),
            topic: r.get("topic"),
            since: r.get("since"),
        })
        .collect();
    Ok((position_header(position), Json(InviteList { items })).into_response())
}

async fn email_of(state: &AppState, user: Uuid) -> ApiResult<Option<String>> {
    Ok(
        sqlx::query_scalar("SELECT email FROM users WHERE user_id = $1")
            .bind(user)
            .fetch_optional(&state.pool)
            .await?,
    )
}

/// Join a public room, or accept an invitation.
#[utoipa::path(post, path = "/v1/rooms/{room_id}/join", tag = "chat", security(("bearer" = [])),
    params(("room_id" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header)),
    responses((status = 200, description = "joined"), (status = 401, body = Problem),
        (status = 404, description = "no such room, not public and not invited, or banned", body = Problem),
        (status = 409, description = "already a member, or archived", body = Problem)))]
pub async fn join(
    State(state): State<AppState>,
    principal: Principal,
    options: WriteOptions,
    RequestId(rid): RequestId,
    uri: http::Uri,
    AppPath(room_id): AppPath<Uuid>,
) -> ApiResult<Response> {
    let email = email_of(&state, principal.user_id).await?;
    let cmd = ChatCommand::Join { room_id, email };
    room_command(&state, &principal, "POST", &uri, &options, rid, &(), cmd).await
}

/// Decline an invitation.
#[utoipa::path(post, path = "/v1/rooms/{room_id}/decline", tag = "chat", security(("bearer" = [])),
    params(("room_id" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header)),
    responses((status = 200, description = "declined"), (status = 401, body = Problem), (status = 404, body = Problem)))]
pub async fn decline(
    State(state): State<AppState>,
    principal: Principal,
    options: WriteOptions,
    RequestId(rid): RequestId,
    uri: http::Uri,
    AppPath(room_id): AppPath<Uuid>,
) -> ApiResult<Response> {
    let cmd = ChatCommand::DeclineInvite { room_id };
    room_command(&state, &principal, "POST", &uri, &options, rid, &(), cmd).await
}

/// Leave the room (the last owner must hand over first).
#[utoipa::path(post, path = "/v1/rooms/{room_id}/leave", tag = "chat", security(("bearer" = [])),
    params(("room_id" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header)),
    responses((status = 200, description = "left"), (status = 401, body = Problem), (status = 404, body = Problem),
        (status = 422, description = "last owner", body = Problem)))]
pub async fn leave(
    State(state): State<AppState>,
    principal: Principal,
    options: WriteOptions,
    RequestId(rid): RequestId,
    uri: http::Uri,
    AppPath(room_id): AppPath<Uuid>,
) -> ApiResult<Response> {
    let cmd = ChatCommand::Leave { room_id };
    room_command(&state, &principal, "POST", &uri, &options, rid, &(), cmd).await
}

/// What a moderator does to a member.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MemberAction {
    /// Remove from the room.
    Kick,
    /// Remove and keep out.
    Ban,
    /// Lift a ban.
    Unban,
}

/// Kick, ban or unban a user (moderators and owners, over lower roles).
#[utoipa::path(post, path = "/v1/rooms/{room_id}/members/{user_id}/{action}", tag = "chat", security(("bearer" = [])),
    params(("room_id" = Uuid, Path), ("user_id" = Uuid, Path), ("action" = MemberAction, Path, description = "kick, ban or unban"),
        ("Idempotency-Key" = Option<String>, Header)),
    responses((status = 200, description = "done"), (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 403, body = Problem), (status = 404, body = Problem), (status = 409, body = Problem)))]
pub async fn moderate_member(
    State(state): State<AppState>,
    principal: Principal,
    options: WriteOptions,
    RequestId(rid): RequestId,
    uri: http::Uri,
    AppPath((room_id, user_id, action)): AppPath<(Uuid, Uuid, MemberAction)>,
) -> ApiResult<Response> {
    let cmd = match action {
        MemberAction::Kick => ChatCommand::Kick { room_id, user_id },
        MemberAction::Ban => ChatCommand::Ban { room_id, user_id },
        MemberAction::Unban => ChatCommand::Unban { room_id, user_id },
    };
    room_command(&state, &principal, "POST", &uri, &options, rid, &(), cmd).await
}

/// Change a member's role (owners).
#[utoipa::path(put, path = "/v1/rooms/{room_id}/members/{user_id}/role", tag = "chat", security(("bearer" = [])),
    request_body = RoleRequest,
    params(("room_id" = Uuid, Path), ("user_id" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header)),
    responses((status = 200, description = "changed"), (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 403, body = Problem), (status = 404, body = Problem), (status = 409, body = Problem),
        (status = 422, description = "the last owner", body = Problem)))]
pub async fn set_role(
    State(state): State<AppState>,
    principal: Principal,
    options: WriteOptions,
    RequestId(rid): RequestId,
    uri: http::Uri,
    AppPath((room_id, user_id)): AppPath<(Uuid, Uuid)>,
    AppJson(req): AppJson<RoleRequest>,
) -> ApiResult<Response> {
    let cmd = ChatCommand::SetRole {
        room_id,
        user_id,
        role: req.role,
    };
    room_command(&state, &principal, "PUT", &uri, &options, rid, &req, cmd).await
}
