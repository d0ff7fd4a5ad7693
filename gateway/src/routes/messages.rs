//! Messages: send (sealed here, before the command leaves the gateway), the
//! timeline in both directions, threads, edits and their history, redaction,
//! reactions, read receipts, and search over the blind index.
//!
//! Bodies are opened here for members only, with the message key from the
//! keystore; a redacted message has no key and shows `body: null`.

use std::collections::{BTreeMap, HashMap};

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use commands::Command;
use commands::chat::{ChatCommand, client_message_id};
use commands::crypto::{self, Key};
use events::chat::{Bytes64, MessageKind, Sealed};
use serde::{Deserialize, Serialize};
use sqlx::Row;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::auth::Principal;
use crate::consistency::{
    AfterPosition, ReadParams, find, look_again_when_missing, position_header, wait_for,
};
use crate::dispatch::{Route, dispatch};
use crate::error::{ApiError, ApiResult, Problem};
use crate::extract::{AppJson, AppPath, AppQuery, RequestId, WriteOptions};
use crate::ratelimit::{self, Quota};
use crate::routes::attachments::{self, AttachmentRequest, AttachmentView};
use crate::routes::rooms::{MODEL, joined_member, require_member, room_not_found};
use crate::state::AppState;

/// Largest message body, in bytes (SPEC §2: 16 KiB).
pub const MAX_BODY: usize = 16 * 1024;

/// Send a message.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SendRequest {
    /// The text, ≤ 16 KiB of UTF-8 (may be empty or left out with an attachment).
    #[schema(example = "Shall we take the 7 am ferry?")]
    #[serde(default)]
    pub body: String,
    /// A file uploaded to this room (`POST /v1/rooms/{room_id}/uploads`); with
    /// `duration_ms` a voice note.
    pub attachment: Option<AttachmentRequest>,
    /// Reply in this thread (its root message).
    pub thread_root: Option<Uuid>,
    /// Quote this message of the same room.
    pub quote: Option<Uuid>,
    /// Users mentioned (members of the room; others are dropped).
    #[serde(default)]
    pub mentions: Vec<Uuid>,
    /// Your transaction id (≤ 64 visible characters): sending again with it
    /// never makes a second message.
    pub client_message_id: Option<String>,
}

/// Replace a message's text (its sender only; the old text stays in the history).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EditRequest {
    /// The new text.
    pub body: String,
}

/// Move the caller's read receipt: everything up to and including `message_id` is read.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReceiptRequest {
    /// The last message read.
    pub message_id: Uuid,
    /// The thread, for a receipt inside one; omit for the main timeline.
    pub thread_root: Option<Uuid>,
}

/// A message as a member sees it.
#[derive(Debug, Serialize, ToSchema)]
pub struct MessageView {
    /// Message id.
    pub message_id: Uuid,
    /// Room.
    pub room_id: Uuid,
    /// Sender.
    pub sender: Uuid,
    /// `text`, `attachment` or `voice`.
    pub kind: String,
    /// The text; null once redacted.
    pub body: Option<String>,
    /// The file or voice note; null for a text, and once redacted.
    pub attachment: Option<AttachmentView>,
    /// Thread root, for a reply.
    pub thread_root: Option<Uuid>,
    /// Quoted message.
    pub quote: Option<Uuid>,
    /// Mentioned users.
    pub mentions: Vec<Uuid>,
    /// Client transaction id.
    pub client_message_id: Option<String>,
    /// When sent.
    pub sent_at: DateTime<Utc>,
    /// When last edited.
    pub edited_at: Option<DateTime<Utc>>,
    /// How many times edited.
    pub edits: i32,
    /// When redacted.
    pub redacted_at: Option<DateTime<Utc>>,
    /// Emoji → users.
    pub reactions: BTreeMap<String, Vec<Uuid>>,
    /// For a thread root: replies still there.
    pub reply_count: i32,
    /// For a thread root: the latest reply.
    pub latest_reply: Option<Uuid>,
    /// Global position: the timeline's order and cursor.
    pub position: i64,
}

/// A page of a timeline, oldest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct MessagePage {
    /// Messages in timeline order.
    pub items: Vec<MessageView>,
    /// Cursor of the older page; null when `start_reached`.
    pub prev: Option<String>,
    /// Cursor of the newer page; null when `end_reached`.
    pub next: Option<String>,
    /// Nothing older exists.
    pub start_reached: bool,
    /// Nothing newer exists (yet).
    pub end_reached: bool,
}

/// A thread in a room's list of threads.
#[derive(Debug, Serialize, ToSchema)]
pub struct ThreadView {
    /// The root message (with `reply_count` and `latest_reply`).
    pub root: MessageView,
    /// The latest reply.
    pub latest: Option<MessageView>,
}

/// Threads, most recently active first.
#[derive(Debug, Serialize, ToSchema)]
pub struct ThreadList {
    /// Threads.
    pub items: Vec<ThreadView>,
    /// Cursor of the next page; null when there is no more.
    pub next: Option<String>,
}

/// One earlier version of an edited message.
#[derive(Debug, Serialize, ToSchema)]
pub struct EditView {
    /// 1 for the original text, then each replaced edit.
    pub edit_no: i32,
    /// The text it had.
    pub body: Option<String>,
    /// When it was replaced.
    pub replaced_at: DateTime<Utc>,
}

/// The history of a message, oldest first; the current text is the message's.
#[derive(Debug, Serialize, ToSchema)]
pub struct HistoryView {
    /// The message now.
    pub message: MessageView,
    /// Earlier texts.
    pub versions: Vec<EditView>,
}

/// Timeline paging. Give at most one of `cursor`, `from_message`, `at`.
#[derive(Debug, Deserialize, IntoParams)]
pub struct TimelineParams {
    /// 1 to 200 (default 50).
    pub limit: Option<i64>,
    /// `prev` or `next` of an earlier page.
    pub cursor: Option<String>,
    /// Start at this message (included).
    pub from_message: Option<Uuid>,
    /// Jump to a date: start at the first message sent at or after it (RFC 3339).
    pub at: Option<DateTime<Utc>>,
    /// With `from_message` or `at`: `backward` (older, the default without them) or `forward`.
    pub dir: Option<String>,
    /// Wait until the read model has applied this position.
    pub after_position: Option<i64>,
}

/// Search parameters.
#[derive(Debug, Deserialize, IntoParams)]
pub struct SearchParams {
    /// Words; each must begin a word of the message (2 or more characters).
    pub q: String,
    /// Only this room.
    pub room_id: Option<Uuid>,
    /// Only this sender.
    pub sender: Option<Uuid>,
    /// Sent at or after.
    pub from: Option<DateTime<Utc>>,
    /// Sent before.
    pub to: Option<DateTime<Utc>>,
    /// 1 to 100 (default 20).
    pub limit: Option<i64>,
    /// `next` of the previous page.
    pub cursor: Option<String>,
}

/// A search hit.
#[derive(Debug, Serialize, ToSchema)]
pub struct SearchHit {
    /// The message.
    pub message: MessageView,
    /// Character ranges `[start, end)` of the body that matched.
    pub highlights: Vec<[usize; 2]>,
}

/// Search results, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct SearchPage {
    /// Hits.
    pub items: Vec<SearchHit>,
    /// Cursor of the next page; null when there is no more.
    pub next: Option<String>,
}

fn message_not_found() -> ApiError {
    ApiError::coded(
        http::StatusCode::NOT_FOUND,
        "message_not_found",
        "no such message in this room",
    )
}

fn body_text(field: &str, body: &str) -> ApiResult<()> {
    if body.len() > MAX_BODY {
        return Err(ApiError::field(
            field,
            format!("at most {MAX_BODY} bytes of UTF-8"),
        ));
    }
    if body.contains('\0') {
        return Err(ApiError::field(field, "must not contain NUL characters"));
    }
    Ok(())
}

/// What the idempotency hash sees of a send: a keyed fingerprint of the text,
/// never the text (ARCHITECTURE: the idempotency store holds bodies sealed or not at all).
#[derive(Serialize)]
struct Fingerprinted<'a, T: Serialize> {
    fingerprint: String,
    rest: &'a T,
}

#[derive(Serialize)]
struct SendShape<'a> {
    thread_root: Option<Uuid>,
    quote: Option<Uuid>,
    mentions: &'a [Uuid],
    client_message_id: Option<&'a str>,
    // Absent for a text, so a text's hash is what it always was.
    #[serde(skip_serializing_if = "Option::is_none")]
    attachment: Option<AttachmentShape<'a>>,
}

/// What the idempotency hash sees of an attachment: its names only as a keyed fingerprint.
#[derive(Serialize)]
struct AttachmentShape<'a> {
    upload_id: Uuid,
    content_type: Option<&'a str>,
    duration_ms: Option<i64>,
    names: String,
}

/// Send a message. The text is sealed under a fresh message key before it
/// leaves the gateway; 30 messages a minute and 1,000 a day per user. With an
/// `attachment` (an upload of yours to this room) it is a file, or with
/// `duration_ms` a voice note (the upload must be `audio/*`); the body may then be empty.
#[utoipa::path(post, path = "/v1/rooms/{room_id}/messages", tag = "chat", security(("bearer" = [])), request_body = SendRequest,
    params(("room_id" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header, description = "or use client_message_id")),
    responses((status = 201, description = "sent", example = json!({"message_id": "0193…", "room_id": "0193…", "sender": "0193…", "kind": "text", "position": 42, "version": 1, "sent_at": "2026-11-22T10:00:00Z"})),
        (status = 202, description = "poll Location"), (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 404, description = "no such room (or not a member), thread root, quote or upload (`upload_not_found`)", body = Problem),
        (status = 409, description = "archived room, duplicate client_message_id, upload already sent with another message", body = Problem),
        (status = 413, body = Problem), (status = 422, body = Problem), (status = 429, body = Problem)))]
pub async fn send(
    State(state): State<AppState>,
    principal: Principal,
    mut options: WriteOptions,
    RequestId(rid): RequestId,
    uri: http::Uri,
    AppPath(room_id): AppPath<Uuid>,
    AppJson(req): AppJson<SendRequest>,
) -> ApiResult<Response> {
    body_text("body", &req.body)?;
    if req.body.trim().is_empty() && req.attachment.is_none() {
        return Err(ApiError::field("body", "must not be empty"));
    }
    if let Some(a) = &req.attachment {
        attachments::validate(a)?;
    }
    if let Some(c) = &req.client_message_id
        && (c.is_empty() || c.len() > 64 || !c.bytes().all(|b| (0x21..=0x7e).contains(&b)))
    {
        return Err(ApiError::field(
            "client_message_id",
            "1 to 64 visible ASCII characters",
        ));
    }
    if req.mentions.len() > 100 {
        return Err(ApiError::field("mentions", "at most 100"));
    }
    ratelimit::charge_all(
        &state,
        principal.user_id,
        &[
            Quota {
                limit: "chat_messages_per_minute",
                max: state.settings.chat_messages_per_min,
                window_secs: 60,
            },
            Quota {
                limit: "chat_messages_per_day",
                max: state.settings.chat_messages_per_day,
                window_secs: 86_400,
            },
        ],
    )
    .await?;
    // Membership is decided by the handler, atomically with the append: the read
    // model may not show a join the caller just made. The keys are the keystore's
    // as of at most `RoomKeyCache::FRESH` ago; the handler checks their version.
    let Some(keys) = state
        .room_keys
        .get(&state.keystore, &state.pool, room_id)
        .await?
    else {
        return Err(room_not_found());
    };
    let staged = match &req.attachment {
        Some(a) => Some(attachments::staged(&state, room_id, principal.user_id, a).await?),
        None => None,
    };
    // A client transaction id is an idempotency key scoped to the room.
    if options.idempotency_key.is_none() {
        options.idempotency_key = req.client_message_id.clone().map(|c| format!("txn:{c}"));
    }
    let hashed = Fingerprinted {
        fingerprint: crypto::fingerprint(&keys.search, req.body.as_bytes()),
        rest: &SendShape {
            thread_root: req.thread_root,
            quote: req.quote,
            mentions: &req.mentions,
            client_message_id: req.client_message_id.as_deref(),
            attachment: req.attachment.as_ref().map(|a| AttachmentShape {
                upload_id: a.upload_id,
                content_type: a.content_type.as_deref(),
                duration_ms: a.duration_ms,
                names: crypto::fingerprint(
                    &keys.search,
                    serde_json::json!([a.name, a.transcript])
                        .to_string()
                        .as_bytes(),
                ),
            }),
        },
    };
    let sender = principal.user_id;
    let mentions_assistant = req.body.to_lowercase().contains("@mathia");
    let res = dispatch(
        &state,
        &principal,
        Route::post(&uri),
        &options,
        rid,
        &hashed,
        |command_id| {
            let message_id = match &req.client_message_id {
                Some(c) => client_message_id(room_id, sender, c),
                None => command_id,
            };
            let (message_key, wrapped) =
                handlers::keystore::new_message_key(&keys.current, message_id);
            let body = crypto::seal(
                &message_key,
                &crypto::field_aad(message_id, "body"),
                req.body.as_bytes(),
            );
            let (kind, attachment) = match (&req.attachment, &staged) {
                (Some(a), Some(s)) => (
                    if a.duration_ms.is_some() {
                        MessageKind::Voice
                    } else {
                        MessageKind::Attachment
                    },
                    Some(attachments::seal(s, a, &message_key, message_id)?),
                ),
                _ => (MessageKind::Text, None),
            };
            Ok(Command::Chat(ChatCommand::SendMessage {
                message_id,
                room_id,
                kind,
                body,
                attachment,
                thread_root: req.thread_root,
                quote: req.quote,
                mentions: req.mentions.clone(),
                mentions_assistant,
                client_message_id: req.client_message_id.clone(),
                key_version: keys.version,
                message_key: Bytes64(wrapped),
                sent_at: Utc::now(),
            }))
        },
    )
    .await;
    // The room's keys may have changed meanwhile (rotated: 409, or the room is
    // gone: 404): whatever comes next reads them again.
    if matches!(&res, Ok(r) if matches!(r.status(), http::StatusCode::CONFLICT | http::StatusCode::NOT_FOUND))
    {
        state.room_keys.forget(room_id);
    }
    res
}

const MESSAGE_COLUMNS: &str = "message_id, room_id, position, thread_root, sender, kind, body, attachment, quote, mentions,
    client_message_id, sent_at, edited_at, edits, redacted_at, reactions, reply_count, latest_reply";

/// Open the rows' bodies with their message keys.
async fn views(state: &AppState, rows: &[sqlx::postgres::PgRow]) -> ApiResult<Vec<MessageView>> {
    let ids: Vec<Uuid> = rows.iter().map(|r| r.get("message_id")).collect();
    let mut conn = state.pool.acquire().await?;
    let keys = state.keystore.message_keys(&mut conn, &ids).await?;
    Ok(rows.iter().map(|r| view(r, &keys)).collect())
}

/// Open the bodies of rows that carry their keys (`key_version`, `mk`, `rk`:
/// see [`KEYED`]), with no further statement.
fn views_keyed(state: &AppState, rows: &[sqlx::postgres::PgRow]) -> Vec<MessageView> {
    let keys = state
        .keystore
        .open_message_keys(rows.iter().filter_map(|r| {
            Some(handlers::keystore::WrappedMessageKey {
                message: r.get("message_id"),
                room: r.get("room_id"),
                version: r.get::<Option<i32>, _>("key_version")?,
                message_key: r.get::<Option<&[u8]>, _>("mk")?,
                room_key: r.get::<Option<&[u8]>, _>("rk")?,
            })
        }));
    rows.iter().map(|r| view(r, &keys)).collect()
}

/// `SELECT … FROM (<messages> ) m` then this: each message's key and the
/// room key that wraps it, in the same statement (a redacted message has none).
/// The room keys come from `rk`, which [`room_keys_of`] makes: read once per
/// statement and hashed, not looked up again for each of a page's 50 rows (102
/// of a page's 356 buffers). The message keys are joined by (room, message), the
/// order of `chat_message_keys_page`, which holds the wrapped key: a page's keys
/// lie in the room's own part of that index, read without the table.
const KEYED: &str =
    "LEFT JOIN chat_message_keys k ON k.room_id = m.room_id AND k.message_id = m.message_id
    LEFT JOIN rk r ON r.room_id = k.room_id AND r.version = k.key_version";

/// The `WITH` that a statement using [`KEYED`] begins with: the keys of the
/// rooms `rooms` (an SQL condition on `room_id`) names.
fn room_keys_of(rooms: &str) -> String {
    format!(
        "WITH rk AS MATERIALIZED (SELECT room_id, version, wrapped FROM chat_room_keys WHERE {rooms})"
    )
}

fn view(r: &sqlx::postgres::PgRow, keys: &HashMap<Uuid, Key>) -> MessageView {
    let id: Uuid = r.get("message_id");
    // Straight from the JSONB bytes into `Sealed` (no `serde_json::Value` between);
    // a body that is not one reads as absent, as before.
    let sealed = r
        .try_get::<Option<sqlx::types::Json<Sealed>>, _>("body")
        .ok()
        .flatten();
    let body = sealed
        .map(|s| s.0)
        .and_then(|s| {
            let key = keys.get(&id)?;
            crypto::open(key, &crypto::field_aad(id, "body"), &s).ok()
        })
        .map(|b| String::from_utf8_lossy(&b).into_owned());
    let room_id: Uuid = r.get("room_id");
    let attachment = attachments::view(r.get("attachment"), keys.get(&id), room_id, id);
    MessageView {
        message_id: id,
        room_id,
        sender: r.get("sender"),
        kind: r.get("kind"),
        body,
        attachment,
        thread_root: r.get("thread_root"),
        quote: r.get("quote"),
        mentions: r.get("mentions"),
        client_message_id: r.get("client_message_id"),
        sent_at: r.get("sent_at"),
        edited_at: r.get("edited_at"),
        edits: r.get("edits"),
        redacted_at: r.get("redacted_at"),
        reactions: r
            .try_get::<sqlx::types::Json<_>, _>("reactions")
            .map(|j| j.0)
            .unwrap_or_default(),
        reply_count: r.get("reply_count"),
        latest_reply: r.get("latest_reply"),
        position: r.get("position"),
    }
}

fn cursor(dir: char, position: i64) -> String {
    URL_SAFE_NO_PAD.encode(format!("t1:{dir}:{position}"))
}

fn parse_cursor(c: &str) -> ApiResult<(char, i64)> {
    URL_SAFE_NO_PAD
        .decode(c)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| {
            let rest = s.strip_prefix("t1:")?;
            let (d, p) = rest.split_once(':')?;
            let d = match d {
                "b" => 'b',
                "f" => 'f',
                _ => return None,
            };
            Some((d, p.parse::<i64>().ok()?))
        })
        .ok_or_else(|| ApiError::Malformed("cursor is not one this API gave out".into()))
}

/// Which timeline a page reads.
pub enum Timeline {
    /// A room's main timeline (thread replies are in their threads).
    Main(Uuid),
    /// The replies of the thread with this root.
    Thread(Uuid),
}

impl Timeline {
    fn filter(&self) -> &'static str {
        match self {
            Timeline::Main(_) => "room_id = $1 AND thread_root IS NULL",
            Timeline::Thread(_) => "thread_root = $1",
        }
    }
    fn id(&self) -> Uuid {
        match self {
            Timeline::Main(r) | Timeline::Thread(r) => *r,
        }
    }
    /// Its room, as a condition on `room_id`.
    fn room(&self) -> &'static str {
        match self {
            Timeline::Main(_) => "room_id = $1",
            Timeline::Thread(_) => {
                "room_id = (SELECT room_id FROM proj_chat_messages WHERE message_id = $1)"
            }
        }
    }
}

/// The statement of one timeline page (`$1` the room, or the thread's root;
/// `$2` the bound): `limit + 1` messages from the bound, with their keys and
/// whether anything lies on the other side of the bound (`beyond`).
///
/// `beyond`: nothing lies between the bound and the page's near end, so whether
/// anything lies beyond that end is whether anything lies there: the same
/// statement answers it.
///
/// The limit is written into the statement, not bound: with `LIMIT $3` the
/// generic plan is costed for an unknown limit, never wins, and every page was
/// planned again (1.0 ms of planning for 0.9 ms of execution on a slow day).
/// `limit` is 1..=200 (checked by the caller), so a connection caches a few of
/// these. A generic plan is kept while the tables grow (and, without autovacuum,
/// until the connection is replaced), so every part of this one must stay right
/// at any size: each scan is ordered by position, which only the timeline's own
/// index gives. (`EXISTS` drops its ordering; one prepared on an empty table
/// walked the whole room through the date index.) Public for the test of that.
pub fn page_statement(
    timeline: &Timeline,
    forward: bool,
    inclusive: bool,
    limit: i64,
    guarded: bool,
) -> String {
    let filter = timeline.filter();
    let (op, beyond, order) = match (forward, inclusive) {
        (true, true) => (">=", "<", "ASC"),
        (true, false) => (">", "<=", "ASC"),
        (false, true) => ("<=", ">", "DESC"),
        (false, false) => ("<", ">=", "DESC"),
    };
    let keys = room_keys_of(timeline.room());
    let fetch = limit + 1;
    let page = format!(
        "SELECT m.*, k.key_version, k.wrapped AS mk, r.wrapped AS rk,
                (SELECT position FROM proj_chat_messages WHERE {filter} AND position {beyond} $2
                 ORDER BY position LIMIT 1) IS NOT NULL AS beyond
         FROM (SELECT {MESSAGE_COLUMNS} FROM proj_chat_messages WHERE {filter} AND position {op} $2
               ORDER BY position {order} LIMIT {fetch}) m
         {KEYED}
         ORDER BY m.position {order}"
    );
    if guarded {
        // The check of `require_member`, in the statement (one round trip less):
        // no row at all unless `$3` is a joined member of the room `$1`; a
        // member's empty page is one row of nulls. Nothing of the room is read
        // for anyone else.
        let member = joined_member("$3");
        format!(
            "{keys}, me AS MATERIALIZED ({member})
             SELECT p.* FROM me LEFT JOIN LATERAL ({page}) p ON true
             ORDER BY p.position {order}"
        )
    } else {
        format!("{keys}\n{page}")
    }
}

/// The position a page is anchored at (`sql` selects it, `$2` = `value`), in
/// one statement with the membership check when there is a `caller`: 404
/// `room_not_found` for anyone else, before anything of the room is looked up.
/// `must_exist`: the anchor names a row (a message the caller may have sent a
/// moment ago), so a miss looks again once the model has caught up.
async fn anchor<T>(
    state: &AppState,
    timeline: &Timeline,
    caller: Option<Uuid>,
    sql: String,
    value: T,
    must_exist: bool,
) -> ApiResult<Option<i64>>
where
    T: for<'q> sqlx::Encode<'q, sqlx::Postgres>
        + sqlx::Type<sqlx::Postgres>
        + Send
        + Clone
        + 'static,
{
    let Some(user) = caller else {
        let sql: std::sync::Arc<str> = sql.into();
        return look_again_when_missing(
            state,
            MODEL,
            || async {
                Ok(sqlx::query_scalar(sqlx::AssertSqlSafe(sql.clone()))
                    .bind(timeline.id())
                    .bind(value.clone())
                    .fetch_optional(&state.pool)
                    .await?)
            },
            |position: &Option<i64>| position.is_some() || !must_exist,
        )
        .await;
    };
    let member = joined_member("$3");
    let statement: std::sync::Arc<str> = format!(
        "WITH me AS MATERIALIZED (SELECT EXISTS ({member}) AS member)
         SELECT member, CASE WHEN member THEN ({sql}) END FROM me"
    )
    .into();
    let (member, position): (bool, Option<i64>) = look_again_when_missing(
        state,
        MODEL,
        || async {
            Ok(sqlx::query_as(sqlx::AssertSqlSafe(statement.clone()))
                .bind(timeline.id())
                .bind(value.clone())
                .bind(user)
                .fetch_one(&state.pool)
                .await?)
        },
        |(member, position): &(bool, Option<i64>)| *member && (position.is_some() || !must_exist),
    )
    .await?;
    if !member {
        return Err(room_not_found());
    }
    Ok(position)
}

/// `caller`: on a main timeline, the reader whose membership the first
/// statement checks (404 `room_not_found` when they are not a joined member);
/// `None` when the handler has checked it already, as a thread's must (the
/// check reads the room from `$1`, which is a thread's root).
async fn page(
    state: &AppState,
    timeline: Timeline,
    params: &TimelineParams,
    caller: Option<Uuid>,
) -> ApiResult<MessagePage> {
    let limit = params.limit.unwrap_or(50);
    if !(1..=200).contains(&limit) {
        return Err(ApiError::field("limit", "between 1 and 200"));
    }
    let anchors = [
        params.cursor.is_some(),
        params.from_message.is_some(),
        params.at.is_some(),
    ];
    if anchors.iter().filter(|a| **a).count() > 1 {
        return Err(ApiError::field(
            "cursor",
            "give at most one of cursor, from_message and at",
        ));
    }
    let forward = match params.dir.as_deref() {
        None | Some("backward") => false,
        Some("forward") => true,
        Some(_) => return Err(ApiError::field("dir", "backward or forward")),
    };
    let filter = timeline.filter();
    // (forward?, bound, inclusive?)
    let (forward, bound, inclusive) = if let Some(c) = &params.cursor {
        let (d, p) = parse_cursor(c)?;
        (d == 'f', p, false)
    } else if let Some(m) = params.from_message {
        let p: Option<i64> = anchor(
            state,
            &timeline,
            caller,
            format!("SELECT position FROM proj_chat_messages WHERE {filter} AND message_id = $2"),
            m,
            true,
        )
        .await?;
        let p = p.ok_or_else(message_not_found)?;
        (forward, p, true)
    } else if let Some(at) = params.at {
        // The first message sent at or after `at` (the earliest `sent_at`, as Matrix's
        // timestamp_to_event); forward includes it, backward stops before it. One
        // entry of the main timeline's index on (room_id, sent_at): the lowest
        // position among every later message was an index-only scan of all of them
        // (2–3 ms a month into a room of 10,000).
        let p: Option<i64> = anchor(
            state,
            &timeline,
            caller,
            format!(
                "SELECT position FROM proj_chat_messages
                 WHERE {filter} AND sent_at >= $2 ORDER BY sent_at, position LIMIT 1"
            ),
            at,
            false,
        )
        .await?;
        match p {
            Some(p) => (forward, p, forward),
            None => (forward, i64::MAX, false),
        }
    } else if forward {
        (true, 0, false)
    } else {
        (false, i64::MAX, false)
    };
    // An anchor's statement has checked the membership already.
    let guard = caller.filter(|_| params.from_message.is_none() && params.at.is_none());
    let statement: std::sync::Arc<str> =
        page_statement(&timeline, forward, inclusive, limit, guard.is_some()).into();
    let run = || async {
        let mut q = sqlx::query(sqlx::AssertSqlSafe(statement.clone()))
            .bind(timeline.id())
            .bind(bound);
        if let Some(user) = guard {
            q = q.bind(user);
        }
        Ok(q.fetch_all(&state.pool).await?)
    };
    // A guarded page has a row (null for an empty page) exactly for a member.
    let mut rows = if guard.is_some() {
        look_again_when_missing(state, MODEL, run, |rows: &Vec<_>| !rows.is_empty()).await?
    } else {
        run().await?
    };
    if guard.is_some() {
        if rows.is_empty() {
            return Err(room_not_found());
        }
        rows.retain(|r| matches!(r.try_get::<Option<Uuid>, _>("message_id"), Ok(Some(_))));
    }
    let more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    if !forward {
        rows.reverse();
    }
    let beyond_bound = rows.first().is_some_and(|r| r.get::<bool, _>("beyond"));
    let items = views_keyed(state, &rows);
    // Each end is reached when nothing lies beyond it.
    let exists = |op: &'static str, p: i64| {
        let pool = state.pool.clone();
        let id = timeline.id();
        async move {
            sqlx::query_scalar::<_, bool>(sqlx::AssertSqlSafe(format!(
                "SELECT (SELECT position FROM proj_chat_messages WHERE {filter} AND position {op} $2
                         ORDER BY position LIMIT 1) IS NOT NULL"
            )))
            .bind(id)
            .bind(p)
            .fetch_one(&pool)
            .await
        }
    };
    let (start_reached, end_reached) = match (items.first(), items.last()) {
        (Some(_), Some(_)) => {
            // The far end: whether the statement found more than a page. The near
            // end: `beyond` (the latest page has nothing newer and the first page
            // nothing older, as of the page's own read).
            let older = if forward {
                bound > 0 && beyond_bound
            } else {
                more
            };
            let newer = if forward {
                more
            } else {
                bound < i64::MAX && beyond_bound
            };
            (!older, !newer)
        }
        _ => {
            let older = exists(if forward { "<=" } else { "<" }, bound).await?;
            let newer = exists(if forward { ">" } else { ">=" }, bound).await?;
            (!older || forward && bound == 0, !newer)
        }
    };
    let prev = match items.first() {
        Some(f) if !start_reached => Some(cursor('b', f.position)),
        None if !start_reached => Some(cursor('b', bound)),
        _ => None,
    };
    let next = match items.last() {
        Some(l) if !end_reached => Some(cursor('f', l.position)),
        None if !end_reached => Some(cursor('f', bound)),
        _ => None,
    };
    Ok(MessagePage {
        items,
        prev,
        next,
        start_reached,
        end_reached,
    })
}

/// A room's main timeline (thread replies are in their threads), oldest first
/// within the page. Without an anchor: the latest page.
#[utoipa::path(get, path = "/v1/rooms/{room_id}/messages", tag = "chat", security(("bearer" = [])),
    params(("room_id" = Uuid, Path), TimelineParams),
    responses((status = 200, body = MessagePage), (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 404, body = Problem), (status = 422, body = Problem), (status = 503, body = Problem)))]
pub async fn timeline(
    State(state): State<AppState>,
    principal: Principal,
    AppPath(room_id): AppPath<Uuid>,
    AppQuery(params): AppQuery<TimelineParams>,
    after: AfterPosition,
) -> ApiResult<Response> {
    let position = wait_for(
        &state,
        MODEL,
        AfterPosition(params.after_position.or(after.0)),
    )
    .await?;
    let page = page(
        &state,
        Timeline::Main(room_id),
        &params,
        Some(principal.user_id),
    )
    .await?;
    Ok((position_header(position), Json(page)).into_response())
}

pub(crate) async fn one(
    state: &AppState,
    room_id: Uuid,
    message_id: Uuid,
) -> ApiResult<MessageView> {
    let row = find(state, MODEL, || {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {MESSAGE_COLUMNS} FROM proj_chat_messages WHERE message_id = $1 AND room_id = $2"
        )))
        .bind(message_id)
        .bind(room_id)
        .fetch_optional(&state.pool)
    })
    .await?
    .ok_or_else(message_not_found)?;
    Ok(views(state, &[row]).await?.remove(0))
}

/// One message.
#[utoipa::path(get, path = "/v1/rooms/{room_id}/messages/{message_id}", tag = "chat", security(("bearer" = [])),
    params(("room_id" = Uuid, Path), ("message_id" = Uuid, Path), ReadParams),
    responses((status = 200, body = MessageView), (status = 401, body = Problem), (status = 404, body = Problem)))]
pub async fn get_message(
    State(state): State<AppState>,
    principal: Principal,
    AppPath((room_id, message_id)): AppPath<(Uuid, Uuid)>,
    after: AfterPosition,
) -> ApiResult<Response> {
    let position = wait_for(&state, MODEL, after).await?;
    require_member(&state, room_id, principal.user_id).await?;
    let m = one(&state, room_id, message_id).await?;
    Ok((position_header(position), Json(m)).into_response())
}

/// A message with its earlier texts (members only; empty once redacted).
#[utoipa::path(get, path = "/v1/rooms/{room_id}/messages/{message_id}/history", tag = "chat", security(("bearer" = [])),
    params(("room_id" = Uuid, Path), ("message_id" = Uuid, Path), ReadParams),
    responses((status = 200, body = HistoryView), (status = 401, body = Problem), (status = 404, body = Problem)))]
pub async fn history(
    State(state): State<AppState>,
    principal: Principal,
    AppPath((room_id, message_id)): AppPath<(Uuid, Uuid)>,
    after: AfterPosition,
) -> ApiResult<Response> {
    let position = wait_for(&state, MODEL, after).await?;
    require_member(&state, room_id, principal.user_id).await?;
    let message = one(&state, room_id, message_id).await?;
    let rows = sqlx::query(
        "SELECT edit_no, body, replaced_at FROM proj_chat_edits WHERE message_id = $1 ORDER BY edit_no",
    )
    .bind(message_id)
    .fetch_all(&state.pool)
    .await?;
    let mut conn = state.pool.acquire().await?;
    let keys = state
        .keystore
        .message_keys(&mut conn, &[message_id])
        .await?;
    let versions = rows
        .iter()
        .map(|r| {
            let sealed: serde_json::Value = r.get("body");
            let body = serde_json::from_value::<Sealed>(sealed)
                .ok()
                .and_then(|s| {
                    let k = keys.get(&message_id)?;
                    crypto::open(k, &crypto::field_aad(message_id, "body"), &s).ok()
                })
                .map(|b| String::from_utf8_lossy(&b).into_owned());
            EditView {
                edit_no: r.get("edit_no"),
                body,
                replaced_at: r.get("replaced_at"),
            }
        })
        .collect();
    Ok((
        position_header(position),
        Json(HistoryView { message, versions }),
    )
        .into_response())
}

/// Edit a message's text (its sender only).
#[utoipa::path(patch, path = "/v1/rooms/{room_id}/messages/{message_id}", tag = "chat", security(("bearer" = [])),
    request_body = EditRequest,
    params(("room_id" = Uuid, Path), ("message_id" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header),
        ("If-Match" = Option<String>, Header, description = "the message's version")),
    responses((status = 200, description = "edited"), (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 403, description = "not the sender", body = Problem), (status = 404, body = Problem),
        (status = 409, body = Problem), (status = 412, body = Problem), (status = 422, body = Problem)))]
pub async fn edit(
    State(state): State<AppState>,
    principal: Principal,
    options: WriteOptions,
    RequestId(rid): RequestId,
    uri: http::Uri,
    AppPath((room_id, message_id)): AppPath<(Uuid, Uuid)>,
    AppJson(req): AppJson<EditRequest>,
) -> ApiResult<Response> {
    body_text("body", &req.body)?;
    if req.body.trim().is_empty() {
        return Err(ApiError::field("body", "must not be empty"));
    }
    // The edit is sealed under the message's own key, so redaction erases every version.
    let mut conn = state.pool.acquire().await?;
    let key = state
        .keystore
        .message_keys(&mut conn, &[message_id])
        .await?
        .remove(&message_id)
        .ok_or_else(message_not_found)?;
    drop(conn);
    let search = state
        .keystore
        .room_keys(&state.pool, room_id)
        .await?
        .ok_or_else(room_not_found)?
        .search;
    let fingerprint = crypto::fingerprint(&search, req.body.as_bytes());
    let body = crypto::seal(
        &key,
        &crypto::field_aad(message_id, "body"),
        req.body.as_bytes(),
    );
    dispatch(
        &state,
        &principal,
        Route {
            method: "PATCH",
            path: uri.path(),
        },
        &options,
        rid,
        &fingerprint,
        |_| {
            Ok(Command::Chat(ChatCommand::EditMessage {
                room_id,
                message_id,
                body,
            }))
        },
    )
    .await
}

/// Redact a message: its key is destroyed, so its text, edits, attachment
/// names and attachment bytes are unrecoverable anywhere (sender, moderators, owners).
#[utoipa::path(delete, path = "/v1/rooms/{room_id}/messages/{message_id}", tag = "chat", security(("bearer" = [])),
    params(("room_id" = Uuid, Path), ("message_id" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header)),
    responses((status = 200, description = "redacted"), (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 404, body = Problem)))]
pub async fn redact(
    State(state): State<AppState>,
    principal: Principal,
    options: WriteOptions,
    RequestId(rid): RequestId,
    uri: http::Uri,
    AppPath((room_id, message_id)): AppPath<(Uuid, Uuid)>,
) -> ApiResult<Response> {
    let stored = attachments::storage_key_of(&state, message_id).await?;
    let res = dispatch(
        &state,
        &principal,
        Route {
            method: "DELETE",
            path: uri.path(),
        },
        &options,
        rid,
        &(),
        |_| {
            Ok(Command::Chat(ChatCommand::RedactMessage {
                room_id,
                message_id,
            }))
        },
    )
    .await?;
    // The file key died with the message key; the ciphertext may go too.
    if res.status() == http::StatusCode::OK
        && let Some(k) = stored
    {
        attachments::discard(&state, &k).await;
    }
    Ok(res)
}

fn emoji(e: &str) -> ApiResult<String> {
    if e.is_empty()
        || e.chars().count() > 32
        || e.chars().any(|c| c.is_control() || c.is_whitespace())
    {
        return Err(ApiError::field("emoji", "1 to 32 characters, no spaces"));
    }
    Ok(e.to_owned())
}

/// React to a message.
#[utoipa::path(put, path = "/v1/rooms/{room_id}/messages/{message_id}/reactions/{emoji}", tag = "chat", security(("bearer" = [])),
    params(("room_id" = Uuid, Path), ("message_id" = Uuid, Path), ("emoji" = String, Path, example = "👍"), ("Idempotency-Key" = Option<String>, Header)),
    responses((status = 200, description = "added"), (status = 401, body = Problem), (status = 404, body = Problem),
        (status = 409, description = "already reacted", body = Problem), (status = 422, body = Problem)))]
pub async fn add_reaction(
    State(state): State<AppState>,
    principal: Principal,
    options: WriteOptions,
    RequestId(rid): RequestId,
    uri: http::Uri,
    AppPath((room_id, message_id, e)): AppPath<(Uuid, Uuid, String)>,
) -> ApiResult<Response> {
    react(
        state,
        principal,
        options,
        rid,
        uri,
        room_id,
        message_id,
        emoji(&e)?,
        true,
    )
    .await
}

/// Take a reaction back.
#[utoipa::path(delete, path = "/v1/rooms/{room_id}/messages/{message_id}/reactions/{emoji}", tag = "chat", security(("bearer" = [])),
    params(("room_id" = Uuid, Path), ("message_id" = Uuid, Path), ("emoji" = String, Path), ("Idempotency-Key" = Option<String>, Header)),
    responses((status = 200, description = "removed"), (status = 401, body = Problem), (status = 404, body = Problem),
        (status = 422, body = Problem)))]
pub async fn remove_reaction(
    State(state): State<AppState>,
    principal: Principal,
    options: WriteOptions,
    RequestId(rid): RequestId,
    uri: http::Uri,
    AppPath((room_id, message_id, e)): AppPath<(Uuid, Uuid, String)>,
) -> ApiResult<Response> {
    react(
        state,
        principal,
        options,
        rid,
        uri,
        room_id,
        message_id,
        emoji(&e)?,
        false,
    )
    .await
}

#[allow(clippy::too_many_arguments)]
async fn react(
    state: AppState,
    principal: Principal,
    options: WriteOptions,
    rid: Uuid,
    uri: http::Uri,
    room_id: Uuid,
    message_id: Uuid,
    emoji: String,
    add: bool,
) -> ApiResult<Response> {
    dispatch(
        &state,
        &principal,
        Route {
            method: if add { "PUT" } else { "DELETE" },
            path: uri.path(),
        },
        &options,
        rid,
        &(),
        |_| {
            Ok(Command::Chat(ChatCommand::React {
                room_id,
                message_id,
                emoji,
                add,
            }))
        },
    )
    .await
}

/// Mark the main timeline (or one thread) read up to and including a message.
#[utoipa::path(post, path = "/v1/rooms/{room_id}/receipts", tag = "chat", security(("bearer" = [])), request_body = ReceiptRequest,
    params(("room_id" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header)),
    responses((status = 200, description = "moved"), (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 404, body = Problem), (status = 422, description = "the message is not in that timeline", body = Problem)))]
pub async fn receipt(
    State(state): State<AppState>,
    principal: Principal,
    options: WriteOptions,
    RequestId(rid): RequestId,
    uri: http::Uri,
    AppPath(room_id): AppPath<Uuid>,
    AppJson(req): AppJson<ReceiptRequest>,
) -> ApiResult<Response> {
    let reader = principal.user_id;
    dispatch(
        &state,
        &principal,
        Route::post(&uri),
        &options,
        rid,
        &req,
        |_| {
            Ok(Command::Chat(ChatCommand::MarkRead {
                reader,
                room_id,
                thread_root: req.thread_root,
                message_id: req.message_id,
            }))
        },
    )
    .await
}

/// A room's threads, most recently active first, each with its latest reply.
#[utoipa::path(get, path = "/v1/rooms/{room_id}/threads", tag = "chat", security(("bearer" = [])),
    params(("room_id" = Uuid, Path), ("limit" = Option<i64>, Query, description = "1 to 100 (default 20)"),
        ("cursor" = Option<String>, Query, description = "`next` of the previous page"), ReadParams),
    responses((status = 200, body = ThreadList), (status = 400, body = Problem), (status = 401, body = Problem), (status = 404, body = Problem)))]
pub async fn threads(
    State(state): State<AppState>,
    principal: Principal,
    AppPath(room_id): AppPath<Uuid>,
    AppQuery(params): AppQuery<ThreadParams>,
    after: AfterPosition,
) -> ApiResult<Response> {
    let position = wait_for(
        &state,
        MODEL,
        AfterPosition(params.after_position.or(after.0)),
    )
    .await?;
    require_member(&state, room_id, principal.user_id).await?;
    let limit = params.limit.unwrap_or(20);
    if !(1..=100).contains(&limit) {
        return Err(ApiError::field("limit", "between 1 and 100"));
    }
    let before = match &params.cursor {
        None => i64::MAX,
        Some(c) => parse_cursor(c)?.1,
    };
    let mut roots = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {MESSAGE_COLUMNS}, latest_reply_position FROM proj_chat_messages
         WHERE room_id = $1 AND reply_count > 0 AND latest_reply_position < $2
         ORDER BY latest_reply_position DESC LIMIT $3"
    )))
    .bind(room_id)
    .bind(before)
    .bind(limit + 1)
    .fetch_all(&state.pool)
    .await?;
    let more = roots.len() as i64 > limit;
    roots.truncate(limit as usize);
    let last_pos: Option<i64> = roots.last().map(|r| r.get("latest_reply_position"));
    let latest_ids: Vec<Uuid> = roots
        .iter()
        .filter_map(|r| r.get::<Option<Uuid>, _>("latest_reply"))
        .collect();
    let latest_rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {MESSAGE_COLUMNS} FROM proj_chat_messages WHERE message_id = ANY($1)"
    )))
    .bind(&latest_ids)
    .fetch_all(&state.pool)
    .await?;
    let mut latest: HashMap<Uuid, MessageView> = views(&state, &latest_rows)
        .await?
        .into_iter()
        .map(|m| (m.message_id, m))
        .collect();
    let items = views(&state, &roots)
        .await?
        .into_iter()
        .map(|root| ThreadView {
            latest: root.latest_reply.and_then(|id| latest.remove(&id)),
            root,
        })
        .collect();
    let next = match (more, last_pos) {
        (true, Some(p)) => Some(cursor('b', p)),
        _ => None,
    };
    Ok((position_header(position), Json(ThreadList { items, next })).into_response())
}

/// Thread list paging.
#[derive(Debug, Deserialize, IntoParams)]
pub struct ThreadParams {
    /// 1 to 100 (default 20).
    pub limit: Option<i64>,
    /// `next` of the previous page.
    pub cursor: Option<String>,
    /// Wait until the read model has applied this position.
    pub after_position: Option<i64>,
}

/// One thread's replies, paged like the timeline (the root is `GET …/messages/{root}`).
#[utoipa::path(get, path = "/v1/rooms/{room_id}/threads/{root_id}", tag = "chat", security(("bearer" = [])),
    params(("room_id" = Uuid, Path), ("root_id" = Uuid, Path), TimelineParams),
    responses((status = 200, body = MessagePage), (status = 400, body = Problem), (status = 401, body = Problem), (status = 404, body = Problem)))]
pub async fn thread(
    State(state): State<AppState>,
    principal: Principal,
    AppPath((room_id, root_id)): AppPath<(Uuid, Uuid)>,
    AppQuery(params): AppQuery<TimelineParams>,
    after: AfterPosition,
) -> ApiResult<Response> {
    let position = wait_for(
        &state,
        MODEL,
        AfterPosition(params.after_position.or(after.0)),
    )
    .await?;
    require_member(&state, room_id, principal.user_id).await?;
    one(&state, room_id, root_id).await?;
    let page = page(&state, Timeline::Thread(root_id), &params, None).await?;
    Ok((position_header(position), Json(page)).into_response())
}

/// Search the caller's rooms by words and prefixes. Bodies are encrypted at
/// rest; each message row holds keyed tokens of its word prefixes, one key per room.
#[utoipa::path(get, path = "/v1/search/messages", tag = "chat", security(("bearer" = [])), params(SearchParams),
    responses((status = 200, body = SearchPage), (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 404, description = "room_id names a room you are not in", body = Problem),
        (status = 422, body = Problem), (status = 429, body = Problem)))]
pub async fn search(
    State(state): State<AppState>,
    principal: Principal,
    AppQuery(params): AppQuery<SearchParams>,
) -> ApiResult<Response> {
    let terms: Vec<String> = crypto::words(&params.q);
    if terms.is_empty()
        || terms.len() > 8
        || terms.iter().any(|t| t.chars().count() < crypto::MIN_TERM)
    {
        return Err(ApiError::field(
            "q",
            "1 to 8 words of at least 2 letters or digits each",
        ));
    }
    let limit = params.limit.unwrap_or(20);
    if !(1..=100).contains(&limit) {
        return Err(ApiError::field("limit", "between 1 and 100"));
    }
    let before = match &params.cursor {
        None => i64::MAX,
        Some(c) => parse_cursor(c)?.1,
    };
    ratelimit::charge(
        &state,
        "searches_per_day",
        principal.user_id,
        state.settings.searches_per_day,
        86_400,
    )
    .await?;
    let rooms: Vec<Uuid> = match params.room_id {
        Some(r) => {
            require_member(&state, r, principal.user_id).await?;
            vec![r]
        }
        None => {
            sqlx::query_scalar(
                "SELECT room_id FROM proj_chat_members WHERE user_id = $1 AND state = 'joined'",
            )
            .bind(principal.user_id)
            .fetch_all(&state.pool)
            .await?
        }
    };
    let keys = state.keystore.search_keys(&state.pool, &rooms).await?;
    let filter = SearchFilter {
        sender: params.sender,
        from: params.from,
        to: params.to,
        limit: limit + 1,
    };
    let mut rows = search_rows(&state, &keys, &terms, before, &filter).await?;
    let more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    let items: Vec<SearchHit> = views_keyed(&state, &rows)
        .into_iter()
        .map(|message| SearchHit {
            highlights: highlights(message.body.as_deref().unwrap_or(""), &terms),
            message,
        })
        .collect();
    let next = match (more, items.last()) {
        (true, Some(l)) => Some(cursor('b', l.message.position)),
        _ => None,
    };
    Ok(Json(SearchPage { items, next }).into_response())
}

/// Messages of a room read newest first before its blind index is asked (see
/// [`search_rows`]): a term in one message of twenty fills a page of 20 from them.
const SEARCH_WALK: i64 = 400;

/// What a search keeps besides its terms; `limit` is the page's plus one.
struct SearchFilter {
    sender: Option<Uuid>,
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
    limit: i64,
}

type PgQuery<'q> = sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>;

impl SearchFilter {
    /// `$3` to `$9` of both search statements, after their rooms and tokens.
    /// The limits stay bound: the statements are planned for each search (see
    /// [`page`] for why that costs, and `deeper` in [`search_rows`] for why a
    /// generic plan is not safe here).
    fn bind<'q>(&self, q: PgQuery<'q>, terms: &[String], before: i64) -> PgQuery<'q> {
        q.bind(terms.len() as i64)
            .bind(before)
            .bind(self.sender)
            .bind(self.from)
            .bind(self.to)
            .bind(self.limit)
            .bind(SEARCH_WALK)
    }
}

/// `KEYED` rows of the newest `filter.limit` hits before `before` across `keys`'
/// rooms, newest first. A room's hits are the messages whose `search_tokens`
/// hold the token of every one of `terms` under the room's key.
///
/// Two ways to find them, each bad where the other is good:
/// - the GIN index over `search_tokens` yields every hit of the room, unordered:
///   a rare term costs a few rows, a common one thousands, fetched and sorted;
/// - the room's messages newest first (`proj_chat_messages_room`) stop as soon
///   as the page is full: a common term costs a few rows, a rare one the room.
///
/// So first the walk reads each room's newest messages, up to [`SEARCH_WALK`]
/// of them, stopping at a full page. A room whose walk found less may hold
/// more hits below it (its `floor`, the position of the walk's last message);
/// the index is asked for those, in the rooms whose floor is above the page's
/// last hit so far (below it, nothing could reach the page). The answer is the
/// same either way; only the cost moves (a common term is one short walk, a
/// rare one a walk of the room's newest 400 and a few index hits).
async fn search_rows(
    state: &AppState,
    keys: &HashMap<Uuid, Key>,
    terms: &[String],
    before: i64,
    filter: &SearchFilter,
) -> ApiResult<Vec<sqlx::postgres::PgRow>> {
    // Room i's tokens are the i-th run of `terms` in one flat array.
    let flat = |rooms: &[Uuid]| -> Vec<i64> {
        rooms
            .iter()
            .flat_map(|r| crypto::query_tokens(&keys[r], terms))
            .collect()
    };
    const HIT: &str = "m.search_tokens @> ($2::bigint[])[(q.i - 1) * $3 + 1 : q.i * $3]
        AND m.redacted_at IS NULL
        AND ($5::uuid IS NULL OR m.sender = $5)
        AND ($6::timestamptz IS NULL OR m.sent_at >= $6)
        AND ($7::timestamptz IS NULL OR m.sent_at < $7)";
    let rooms: Vec<Uuid> = keys.keys().copied().collect();
    let room_keys = room_keys_of("room_id = ANY($1)");
    let walk = sqlx::query(sqlx::AssertSqlSafe(format!(
        "{room_keys}
         SELECT m.*, k.key_version, k.wrapped AS mk, r.wrapped AS rk FROM (
             SELECT h.* FROM UNNEST($1::uuid[]) WITH ORDINALITY AS q(q_room, i)
             CROSS JOIN LATERAL (
                 SELECT {MESSAGE_COLUMNS}
                 FROM (SELECT * FROM proj_chat_messages
                       WHERE room_id = q.q_room AND position < $4
                       ORDER BY position DESC LIMIT $9) m
                 WHERE {HIT}
                 ORDER BY m.position DESC LIMIT $8) h) m
         {KEYED}"
    )))
    .bind(&rooms)
    .bind(flat(&rooms));
    let mut hits = filter
        .bind(walk, terms, before)
        .fetch_all(&state.pool)
        .await?;
    let mut found: HashMap<Uuid, i64> = HashMap::new();
    for row in &hits {
        *found.entry(row.get("room_id")).or_default() += 1;
    }
    // The two statements read two snapshots: a message sent in between moves the
    // floor up, so the index step may find again what the walk found.
    let newest_first = |rows: &mut Vec<sqlx::postgres::PgRow>| {
        rows.sort_by_key(|r| std::cmp::Reverse(r.get::<i64, _>("position")));
        rows.dedup_by_key(|r| r.get::<i64, _>("position"));
        rows.truncate(filter.limit as usize);
    };
    newest_first(&mut hits);
    // A room whose walk filled the page read no further and needs nothing more.
    let deep: Vec<Uuid> = rooms
        .into_iter()
        .filter(|r| found.get(r).copied().unwrap_or(0) < filter.limit)
        .collect();
    if deep.is_empty() {
        return Ok(hits);
    }
    let last = match hits.get(filter.limit as usize - 1) {
        Some(r) => r.get::<i64, _>("position"),
        None => i64::MIN,
    };
    // Only the GIN index below the floor: tokens are keyed per room, so the
    // room's own index (which Postgres would AND in, reading every entry of the
    // room) adds nothing; `IS TRUE` keeps the room check off it. A room of
    // fewer messages than a walk has no floor: the walk read all of it. Its only
    // alternative to the GIN index is reading the table, so it must not get a
    // generic plan (one made while the table was small would keep reading it as
    // it grows). With bound limits a generic plan is costed for an unknown limit
    // and loses to the custom ones, so Postgres plans it for each search.
    let deeper = sqlx::query(sqlx::AssertSqlSafe(format!(
        "{room_keys}
         SELECT m.*, k.key_version, k.wrapped AS mk, r.wrapped AS rk FROM (
             SELECT h.* FROM UNNEST($1::uuid[]) WITH ORDINALITY AS q(q_room, i)
             CROSS JOIN LATERAL (
                 SELECT position AS floor FROM proj_chat_messages
                 WHERE room_id = q.q_room AND position < $4
                 ORDER BY position DESC OFFSET $9 - 1 LIMIT 1) w
             CROSS JOIN LATERAL (
                 SELECT {MESSAGE_COLUMNS} FROM proj_chat_messages m
                 WHERE w.floor > $10 AND (m.room_id = q.q_room) IS TRUE
                   AND m.position < w.floor AND {HIT}
                 ORDER BY m.position DESC LIMIT $8) h) m
         {KEYED}"
    )))
    .bind(&deep)
    .bind(flat(&deep));
    let deeper = filter
        .bind(deeper, terms, before)
        .bind(last)
        .fetch_all(&state.pool)
        .await?;
    hits.extend(deeper);
    newest_first(&mut hits);
    Ok(hits)
}

/// Character ranges of the words of `text` that a term begins.
fn highlights(text: &str, terms: &[String]) -> Vec<[usize; 2]> {
    let mut out = vec![];
    let mut start: Option<usize> = None;
    let chars: Vec<char> = text.chars().collect();
    for i in 0..=chars.len() {
        let alnum = chars.get(i).is_some_and(|c| c.is_alphanumeric());
        match (alnum, start) {
            (true, None) => start = Some(i),
            (false, Some(s)) => {
                let word: String = chars[s..i].iter().collect::<String>().to_lowercase();
                if let Some(t) = terms
                    .iter()
                    .filter(|t| word.starts_with(t.as_str()))
                    .max_by_key(|t| t.len())
                {
                    out.push([s, s + t.chars().count()]);
                }
                start = None;
            }
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn highlights_mark_the_matched_prefix_of_each_word() {
        let h = highlights("Kilimanjaro or kili?", &["kili".into()]);
        assert_eq!(h, vec![[0, 4], [15, 19]]);
    }

    #[test]
    fn cursors_round_trip_and_foreign_ones_are_refused() {
        assert_eq!(parse_cursor(&cursor('b', 42)).unwrap(), ('b', 42));
        assert!(parse_cursor("bm90IG91cnM").is_err());
    }
}
