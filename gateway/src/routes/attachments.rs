//! Attachments and voice notes: upload a file to a room, send it with a
//! message (see `messages::send`), download it back.
//!
//! # At rest
//!
//! An upload gets a fresh **file key**. The bytes are sealed with AES-256-GCM
//! in records of 64 KiB as they stream in (so memory stays flat and a 50 MB
//! file is never held whole), each record bound to the upload, its index and
//! whether it is the last (so records cannot be reordered, moved to another
//! file or cut off). The object store only ever sees records:
//!
//! ```text
//! "mthatt01" ‖ { last: u8 ‖ len: u32 BE ‖ nonce (12) ‖ ciphertext + tag }*
//! ```
//!
//! Until a message carries it, the file key rests in `chat_uploads`, wrapped
//! by the room's current data key (deleting the room erases it). Sending puts
//! the file key inside the message's sealed attachment (`{name, transcript,
//! upload_id, key}` under the message key), and the handler that appends the
//! message erases the upload's copy in the same transaction
//! (`KeyOp::BindUpload`). From then on the message key is the only way to the
//! file key: redacting the message destroys it, and the bytes with it (the
//! gateway also deletes the object, but erasure does not depend on that).
//!
//! Uploads nobody sent within [`UPLOAD_TTL_SECS`] cannot be sent any more and
//! are swept away at the uploader's next upload.

use std::io;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use commands::crypto::{self, Key};
use events::chat::{Attachment, Bytes64, Sealed};
use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqlx::Row;
use tokio::io::{AsyncRead, AsyncReadExt};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::auth::Principal;
use crate::consistency::{AfterPosition, ReadParams, find, wait_for};
use crate::error::{ApiError, ApiResult, Problem};
use crate::extract::AppPath;
use crate::objects::ObjectReader;
use crate::ratelimit;
use crate::routes::rooms::{MODEL, require_member, room_not_found};
use crate::state::AppState;

/// Plaintext bytes per sealed record.
pub const RECORD: usize = 64 * 1024;
/// How long an upload waits to be sent, in seconds.
pub const UPLOAD_TTL_SECS: i64 = 24 * 3600;
/// Longest file name, in characters.
pub const MAX_NAME: usize = 255;
/// Longest transcript, in bytes of UTF-8.
pub const MAX_TRANSCRIPT: usize = 16 * 1024;
/// Longest voice note, in milliseconds (one hour).
pub const MAX_DURATION_MS: i64 = 3_600_000;

const MAGIC: &[u8; 8] = b"mthatt01";
const NONCE: usize = 12;
const TAG: usize = 16;

/// An uploaded file, ready to be sent with a message.
#[derive(Debug, Serialize, ToSchema)]
pub struct UploadView {
    /// Give this as `attachment.upload_id` when sending.
    pub upload_id: Uuid,
    /// Where the (sealed) bytes rest in the object store.
    #[schema(
        example = "0193a1b2-0000-7000-8000-000000000001/0193a1b2-0000-7000-8000-0000000000aa"
    )]
    pub storage_key: String,
    /// The room it may be sent to.
    pub room_id: Uuid,
    /// The file's type, from the upload's `Content-Type`.
    #[schema(example = "audio/ogg")]
    pub content_type: String,
    /// Bytes.
    #[schema(example = 48213)]
    pub size: i64,
    /// Hex SHA-256 of the bytes.
    #[schema(example = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08")]
    pub sha256: String,
    /// After this it can no longer be sent.
    pub expires_at: DateTime<Utc>,
}

/// A file to send with a message: an upload of yours to this room. With
/// `duration_ms` it is a voice note (the upload must be `audio/*`).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AttachmentRequest {
    /// From `POST /v1/rooms/{room_id}/uploads`.
    pub upload_id: Uuid,
    /// The file name shown to members: 1 to 255 characters, no control characters. Sealed.
    #[schema(example = "ferry-timetable.pdf")]
    pub name: String,
    /// If given, must equal the upload's type.
    pub content_type: Option<String>,
    /// Voice notes: 1 ms to 1 hour.
    #[schema(example = 4200)]
    pub duration_ms: Option<i64>,
    /// Voice notes: the transcript, ≤ 16 KiB of UTF-8. Sealed.
    pub transcript: Option<String>,
}

/// A message's attachment as a member sees it.
#[derive(Debug, Serialize, ToSchema)]
pub struct AttachmentView {
    /// File name.
    pub name: String,
    /// MIME type.
    pub content_type: String,
    /// Bytes.
    pub size: i64,
    /// Hex SHA-256 of the bytes.
    pub sha256: String,
    /// Voice notes: milliseconds.
    pub duration_ms: Option<i64>,
    /// Voice notes: the transcript, if any.
    pub transcript: Option<String>,
    /// Where to GET the bytes.
    #[schema(example = "/v1/rooms/0193…/messages/0193…/attachment")]
    pub download: String,
}

/// What the attachment's sealed field holds, under the message key.
#[derive(Serialize, Deserialize)]
struct SealedMeta {
    name: String,
    #[serde(default)]
    transcript: Option<String>,
    upload_id: Uuid,
    /// The file key; empty only in a command that is answered from the ledger.
    key: Bytes64,
}

fn attachment_not_found() -> ApiError {
    ApiError::coded(
        http::StatusCode::NOT_FOUND,
        "attachment_not_found",
        "this message has no attachment, or it was redacted",
    )
}

fn upload_not_found() -> ApiError {
    ApiError::coded(
        http::StatusCode::NOT_FOUND,
        "upload_not_found",
        "no such upload of yours in this room",
    )
}

/// Associated data of a file key wrapped by a room data key.
fn upload_key_aad(upload: Uuid, version: i32) -> Vec<u8> {
    format!("upload:{upload}:key:v{version}").into_bytes()
}

/// Associated data of one sealed record of an upload.
fn record_aad(upload: Uuid, index: u64, last: bool) -> Vec<u8> {
    format!("upload:{upload}:record:{index}:{}", u8::from(last)).into_bytes()
}

fn tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A MIME type as `type/subtype[; params]`, the essence lower-cased; none if malformed.
pub fn media_type(raw: &str) -> Option<String> {
    let raw = raw.trim();
    if raw.is_empty() || raw.len() > 255 || !raw.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return None;
    }
    let (essence, params) = match raw.split_once(';') {
        Some((e, p)) => (e.trim(), Some(p.trim())),
        None => (raw, None),
    };
    let (t, s) = essence.split_once('/')?;
    if t.is_empty() || s.is_empty() || !t.bytes().all(tchar) || !s.bytes().all(tchar) {
        return None;
    }
    let essence = essence.to_ascii_lowercase();
    Some(match params {
        Some(p) if !p.is_empty() => format!("{essence}; {p}"),
        _ => essence,
    })
}

/// Seals a byte stream into records as it arrives.
struct Sealer {
    key: Key,
    upload: Uuid,
    max: u64,
    buf: Vec<u8>,
    index: u64,
    size: u64,
    hasher: Sha256,
    started: bool,
    too_large: bool,
    interrupted: bool,
}

impl Sealer {
    fn new(key: Key, upload: Uuid, max: u64) -> Self {
        Sealer {
            key,
            upload,
            max,
            buf: Vec::with_capacity(RECORD),
            index: 0,
            size: 0,
            hasher: Sha256::new(),
            started: false,
            too_large: false,
            interrupted: false,
        }
    }

    fn record(&mut self, out: &mut Vec<u8>, plain: &[u8], last: bool) {
        if !self.started {
            out.extend_from_slice(MAGIC);
            self.started = true;
        }
        let s = crypto::seal(&self.key, &record_aad(self.upload, self.index, last), plain);
        out.push(u8::from(last));
        out.extend_from_slice(&((s.nonce.0.len() + s.ct.0.len()) as u32).to_be_bytes());
        out.extend_from_slice(&s.nonce.0);
        out.extend_from_slice(&s.ct.0);
        self.index += 1;
    }

    /// Take in `data`; returns the records it completed (maybe none).
    fn push(&mut self, data: &[u8]) -> io::Result<Bytes> {
        self.size += data.len() as u64;
        if self.size > self.max {
            self.too_large = true;
            return Err(io::Error::other("upload larger than the limit"));
        }
        self.hasher.update(data);
        self.buf.extend_from_slice(data);
        let mut out = vec![];
        // Keep at least one byte back: the last record is sealed as last.
        while self.buf.len() > RECORD {
            let rest = self.buf.split_off(RECORD);
            let full = std::mem::replace(&mut self.buf, rest);
            self.record(&mut out, &full, false);
        }
        Ok(Bytes::from(out))
    }

    /// The last record.
    fn finish(&mut self) -> Bytes {
        let mut out = vec![];
        let rest = std::mem::take(&mut self.buf);
        self.record(&mut out, &rest, true);
        Bytes::from(out)
    }

    fn sha256(&self) -> String {
        hex(&self.hasher.clone().finalize())
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The records of `data`, sealed by `sealer`, ending with the last record.
fn sealed_records<'a, S>(
    data: &'a mut S,
    sealer: &'a mut Sealer,
) -> BoxStream<'a, io::Result<Bytes>>
where
    S: Stream<Item = Result<Bytes, axum::Error>> + Unpin + Send,
{
    futures::stream::unfold(Some((data, sealer)), |st| async move {
        let (data, sealer) = st?;
        loop {
            match data.next().await {
                Some(Ok(frame)) => match sealer.push(&frame) {
                    Err(e) => return Some((Err(e), None)),
                    Ok(out) if out.is_empty() => continue,
                    Ok(out) => return Some((Ok(out), Some((data, sealer)))),
                },
                Some(Err(_)) => {
                    sealer.interrupted = true;
                    return Some((Err(io::Error::other("upload interrupted")), None));
                }
                None => {
                    let last = sealer.finish();
                    return Some((Ok(last), None));
                }
            }
        }
    })
    .boxed()
}

fn corrupt() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        "stored attachment does not open",
    )
}

/// The plaintext of a stored object, record by record; fails on any tampering,
/// reordering or truncation.
fn opened_records(
    reader: ObjectReader,
    key: Key,
    upload: Uuid,
) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
    futures::stream::try_unfold(Some((reader, 0u64)), move |st| {
        let key = key.clone();
        async move {
            let Some((mut r, index)) = st else {
                return Ok(None);
            };
            let mut head = [0u8; 5];
            r.read_exact(&mut head).await.map_err(|_| corrupt())?;
            let last = match head[0] {
                0 => false,
                1 => true,
                _ => return Err(corrupt()),
            };
            let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
            if !(NONCE + TAG..=NONCE + RECORD + TAG).contains(&len) {
                return Err(corrupt());
            }
            let mut rec = vec![0u8; len];
            r.read_exact(&mut rec).await.map_err(|_| corrupt())?;
            let sealed = Sealed {
                nonce: Bytes64(rec[..NONCE].to_vec()),
                ct: Bytes64(rec[NONCE..].to_vec()),
            };
            let plain = crypto::open(&key, &record_aad(upload, index, last), &sealed)
                .map_err(|_| corrupt())?;
            if last {
                let mut extra = [0u8; 1];
                if r.read(&mut extra).await? != 0 {
                    return Err(corrupt());
                }
                return Ok(Some((Bytes::from(plain), None)));
            }
            Ok(Some((Bytes::from(plain), Some((r, index + 1)))))
        }
    })
}

async fn read_magic(r: &mut (dyn AsyncRead + Send + Unpin)) -> io::Result<()> {
    let mut m = [0u8; 8];
    r.read_exact(&mut m).await.map_err(|_| corrupt())?;
    if &m != MAGIC {
        return Err(corrupt());
    }
    Ok(())
}

/// Delete the caller's uploads that expired unsent (rows first: without its
/// key an orphaned object is ciphertext nobody can open).
async fn sweep(state: &AppState, user: Uuid) {
    let expired: Result<Vec<String>, _> = sqlx::query_scalar(
        "DELETE FROM chat_uploads WHERE uploader = $1 AND message_id IS NULL
           AND created_at < now() - make_interval(secs => $2) RETURNING storage_key",
    )
    .bind(user)
    .bind(UPLOAD_TTL_SECS as f64)
    .fetch_all(&state.pool)
    .await;
    match expired {
        Ok(keys) => {
            for k in keys {
                if let Err(e) = state.objects.delete(&k).await {
                    tracing::warn!(error = %e, "could not delete an expired upload");
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "could not sweep expired uploads"),
    }
}

/// Upload a file to a room (members only). The body is the file itself,
/// streamed, with its type as `Content-Type`; at most 50 MB (configurable) and
/// 20 uploads a day per user. The bytes are sealed as they arrive and never
/// rest in clear. Send it with `attachment.upload_id` within 24 hours. Membership
/// is read from the read model: right after creating or joining the room, pass
/// the position that answer gave as `after_position`.
#[utoipa::path(post, path = "/v1/rooms/{room_id}/uploads", tag = "chat", security(("bearer" = [])),
    request_body(description = "The file's bytes; `Content-Type` is the file's type (`audio/ogg`, `application/pdf`, …).",
        content(("application/octet-stream"), ("audio/ogg"), ("image/png"))),
    params(("room_id" = Uuid, Path), ReadParams),
    responses((status = 201, description = "stored, sealed", body = UploadView,
            example = json!({"upload_id": "0193a1b2-0000-7000-8000-0000000000aa",
                "storage_key": "0193a1b2-0000-7000-8000-000000000001/0193a1b2-0000-7000-8000-0000000000aa",
                "room_id": "0193a1b2-0000-7000-8000-000000000001", "content_type": "audio/ogg", "size": 48213,
                "sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
                "expires_at": "2026-12-02T19:00:00Z"})),
        (status = 400, description = "the upload was interrupted", body = Problem), (status = 401, body = Problem),
        (status = 404, description = "no such room, or not a member", body = Problem),
        (status = 409, description = "archived room", body = Problem),
        (status = 413, description = "larger than the limit; nothing is kept", body = Problem),
        (status = 415, description = "no or malformed Content-Type", body = Problem),
        (status = 429, description = "`uploads_per_day` spent", body = Problem)))]
pub async fn upload(
    State(state): State<AppState>,
    principal: Principal,
    AppPath(room_id): AppPath<Uuid>,
    after: AfterPosition,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    // Membership comes from the read model: a room or join made just now needs `after_position`.
    wait_for(&state, MODEL, after).await?;
    require_member(&state, room_id, principal.user_id).await?;
    let archived: Option<bool> =
        sqlx::query_scalar("SELECT archived FROM proj_chat_rooms WHERE room_id = $1")
            .bind(room_id)
            .fetch_optional(&state.pool)
            .await?;
    if archived == Some(true) {
        return Err(ApiError::coded(
            StatusCode::CONFLICT,
            "room_archived",
            "the room is archived: it is read-only",
        ));
    }
    let keys = state
        .keystore
        .room_keys(&state.pool, room_id)
        .await?
        .ok_or_else(room_not_found)?;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(media_type)
        .ok_or_else(|| {
            ApiError::UnsupportedMediaType(
                "Content-Type must be the file's type, e.g. audio/ogg".into(),
            )
        })?;
    let max = state.settings.upload_max_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max) {
        return Err(ApiError::TooLarge(max as usize));
    }
    ratelimit::charge(
        &state,
        "uploads_per_day",
        principal.user_id,
        state.settings.uploads_per_day,
        86_400,
    )
    .await?;
    sweep(&state, principal.user_id).await;

    let upload_id = Uuid::now_v7();
    let storage_key = format!("{room_id}/{upload_id}");
    let file_key = Key::random();
    let mut sealer = Sealer::new(file_key.clone(), upload_id, max);
    let mut data = body.into_data_stream();
    let stored = state
        .objects
        .put(&storage_key, sealed_records(&mut data, &mut sealer))
        .await;
    if let Err(e) = stored {
        return Err(if sealer.too_large {
            ApiError::TooLarge(max as usize)
        } else if sealer.interrupted {
            ApiError::Malformed("the upload was interrupted before its end".into())
        } else {
            ApiError::Internal(anyhow::Error::new(e).context("storing an upload"))
        });
    }
    let size = sealer.size as i64;
    let sha256 = sealer.sha256();
    let wrapped = crypto::wrap(
        &keys.current,
        &upload_key_aad(upload_id, keys.version),
        &file_key,
    );
    let created_at: Result<DateTime<Utc>, sqlx::Error> = sqlx::query_scalar(
        "INSERT INTO chat_uploads (upload_id, room_id, uploader, storage_key, content_type, size, sha256, key_version, wrapped_key)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING created_at",
    )
    .bind(upload_id)
    .bind(room_id)
    .bind(principal.user_id)
    .bind(&storage_key)
    .bind(&content_type)
    .bind(size)
    .bind(&sha256)
    .bind(keys.version)
    .bind(&wrapped)
    .fetch_one(&state.pool)
    .await;
    let created_at = match created_at {
        Ok(t) => t,
        Err(e) => {
            let _ = state.objects.delete(&storage_key).await;
            return Err(e.into());
        }
    };
    let view = UploadView {
        upload_id,
        storage_key,
        room_id,
        content_type,
        size,
        sha256,
        expires_at: created_at + chrono::Duration::seconds(UPLOAD_TTL_SECS),
    };
    Ok((StatusCode::CREATED, Json(view)).into_response())
}

/// An upload checked for a send: the caller's, in this room, in time.
pub struct Staged {
    upload_id: Uuid,
    storage_key: String,
    content_type: String,
    size: i64,
    sha256: String,
    /// None once a message carries it.
    file_key: Option<Key>,
    /// The message carrying it.
    message_id: Option<Uuid>,
}

/// Check an attachment request's own fields (nothing read yet).
pub fn validate(req: &AttachmentRequest) -> ApiResult<()> {
    let n = req.name.chars().count();
    if n == 0 || n > MAX_NAME || req.name.chars().any(char::is_control) {
        return Err(ApiError::field(
            "attachment.name",
            format!("1 to {MAX_NAME} characters, no control characters"),
        ));
    }
    if let Some(d) = req.duration_ms
        && !(1..=MAX_DURATION_MS).contains(&d)
    {
        return Err(ApiError::field(
            "attachment.duration_ms",
            "1 ms to 1 hour (3600000)",
        ));
    }
    if let Some(t) = &req.transcript {
        if req.duration_ms.is_none() {
            return Err(ApiError::field(
                "attachment.transcript",
                "only voice notes (with duration_ms) have a transcript",
            ));
        }
        if t.len() > MAX_TRANSCRIPT || t.contains('\0') {
            return Err(ApiError::field(
                "attachment.transcript",
                format!("at most {MAX_TRANSCRIPT} bytes of UTF-8, no NUL"),
            ));
        }
    }
    if let Some(ct) = &req.content_type
        && media_type(ct).is_none()
    {
        return Err(ApiError::field(
            "attachment.content_type",
            "a MIME type such as audio/ogg",
        ));
    }
    Ok(())
}

/// The upload `req` names, if it is the sender's, of this room, and still
/// sendable, with its file key opened.
pub async fn staged(
    state: &AppState,
    room_id: Uuid,
    sender: Uuid,
    req: &AttachmentRequest,
) -> ApiResult<Staged> {
    let row = sqlx::query(
        "SELECT u.storage_key, u.content_type, u.size, u.sha256, u.key_version, u.wrapped_key, u.message_id,
                u.created_at < now() - make_interval(secs => $4) AS expired, k.wrapped AS room_key
         FROM chat_uploads u
         LEFT JOIN chat_room_keys k ON k.room_id = u.room_id AND k.version = u.key_version
         WHERE u.upload_id = $1 AND u.room_id = $2 AND u.uploader = $3",
    )
    .bind(req.upload_id)
    .bind(room_id)
    .bind(sender)
    .bind(UPLOAD_TTL_SECS as f64)
    .fetch_optional(&state.pool)
    .await?
    .ok_or_else(upload_not_found)?;
    let message_id: Option<Uuid> = row.get("message_id");
    let content_type: String = row.get("content_type");
    if message_id.is_none() && row.get::<bool, _>("expired") {
        return Err(ApiError::coded(
            StatusCode::UNPROCESSABLE_ENTITY,
            "upload_expired",
            "this upload waited too long to be sent; upload it again",
        ));
    }
    if let Some(ct) = req.content_type.as_deref().and_then(media_type)
        && ct != content_type
    {
        return Err(ApiError::field(
            "attachment.content_type",
            format!("the upload is {content_type}"),
        ));
    }
    if req.duration_ms.is_some() && !content_type.starts_with("audio/") {
        return Err(ApiError::field(
            "attachment.duration_ms",
            format!("a voice note must be audio/*; the upload is {content_type}"),
        ));
    }
    let file_key = match (
        row.get::<Option<i32>, _>("key_version"),
        row.get::<Option<Vec<u8>>, _>("wrapped_key"),
        row.get::<Option<Vec<u8>>, _>("room_key"),
    ) {
        (Some(v), Some(w), Some(rk)) => {
            let rk = state
                .keystore
                .open_room_key(room_id, v, &rk)
                .ok_or_else(room_not_found)?;
            Some(
                crypto::unwrap(&rk, &upload_key_aad(req.upload_id, v), &w)
                    .map_err(|_| upload_not_found())?,
            )
        }
        _ if message_id.is_some() => None,
        _ => return Err(upload_not_found()),
    };
    Ok(Staged {
        upload_id: req.upload_id,
        storage_key: row.get("storage_key"),
        content_type,
        size: row.get("size"),
        sha256: row.get("sha256"),
        file_key,
        message_id,
    })
}

/// The attachment of message `message_id`, its names and file key sealed
/// under the message key.
pub fn seal(
    staged: &Staged,
    req: &AttachmentRequest,
    message_key: &Key,
    message_id: Uuid,
) -> ApiResult<Attachment> {
    let key = match (&staged.file_key, staged.message_id) {
        (Some(k), _) => Bytes64(k.as_bytes().to_vec()),
        // A retry of the send that carried it: the handler answers it from the
        // ledger (or refuses it as a duplicate); this command is never appended.
        (None, Some(m)) if m == message_id => Bytes64::default(),
        (None, _) => {
            return Err(ApiError::coded(
                StatusCode::CONFLICT,
                "upload_already_sent",
                "this upload was sent with another message; upload it again",
            ));
        }
    };
    let meta = SealedMeta {
        name: req.name.clone(),
        transcript: req.transcript.clone(),
        upload_id: staged.upload_id,
        key,
    };
    let plain = serde_json::to_vec(&meta).map_err(anyhow::Error::from)?;
    Ok(Attachment {
        sealed: crypto::seal(
            message_key,
            &crypto::field_aad(message_id, "attachment"),
            &plain,
        ),
        content_type: staged.content_type.clone(),
        size: staged.size,
        sha256: staged.sha256.clone(),
        storage_key: staged.storage_key.clone(),
        duration_ms: req.duration_ms,
    })
}

fn open_meta(key: &Key, message_id: Uuid, sealed: &Sealed) -> Option<SealedMeta> {
    let plain = crypto::open(key, &crypto::field_aad(message_id, "attachment"), sealed).ok()?;
    serde_json::from_slice(&plain).ok()
}

/// The attachment of a projected message, opened with its key (none once redacted).
pub fn view(
    attachment: Option<serde_json::Value>,
    key: Option<&Key>,
    room_id: Uuid,
    message_id: Uuid,
) -> Option<AttachmentView> {
    let a: Attachment = serde_json::from_value(attachment?).ok()?;
    let meta = open_meta(key?, message_id, &a.sealed)?;
    Some(AttachmentView {
        name: meta.name,
        content_type: a.content_type,
        size: a.size,
        sha256: a.sha256,
        duration_ms: a.duration_ms,
        transcript: meta.transcript,
        download: format!("/v1/rooms/{room_id}/messages/{message_id}/attachment"),
    })
}

/// The storage key of the upload message `message_id` carries, if any.
pub async fn storage_key_of(state: &AppState, message_id: Uuid) -> ApiResult<Option<String>> {
    Ok(
        sqlx::query_scalar("SELECT storage_key FROM chat_uploads WHERE message_id = $1")
            .bind(message_id)
            .fetch_optional(&state.pool)
            .await?,
    )
}

/// After a redaction: the key is gone already; drop the ciphertext and its row too.
pub async fn discard(state: &AppState, storage_key: &str) {
    if let Err(e) = state.objects.delete(storage_key).await {
        tracing::warn!(error = %e, "could not delete a redacted attachment");
        return;
    }
    if let Err(e) = sqlx::query("DELETE FROM chat_uploads WHERE storage_key = $1")
        .bind(storage_key)
        .execute(&state.pool)
        .await
    {
        tracing::warn!(error = %e, "could not forget a redacted attachment");
    }
}

/// `attachment; filename*=UTF-8''…`, every byte but unreserved ones escaped.
fn disposition(name: &str) -> HeaderValue {
    let mut v = String::from("attachment; filename*=UTF-8''");
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            v.push(b as char);
        } else {
            v.push_str(&format!("%{b:02X}"));
        }
    }
    HeaderValue::from_str(&v).unwrap_or_else(|_| HeaderValue::from_static("attachment"))
}

/// Download a message's attachment (members only), opened as it streams.
/// 404 once the message is redacted: its key, and with it the file's, is gone.
#[utoipa::path(get, path = "/v1/rooms/{room_id}/messages/{message_id}/attachment", tag = "chat", security(("bearer" = [])),
    params(("room_id" = Uuid, Path), ("message_id" = Uuid, Path),
        ("after_position" = Option<i64>, Query, description = "wait until the read model has applied this position")),
    responses((status = 200, description = "the file, with its Content-Type, Content-Length, a `Content-Disposition: attachment` naming it, and its SHA-256 as ETag",
            content_type = "application/octet-stream", body = Vec<u8>),
        (status = 401, body = Problem),
        (status = 404, description = "no such room (or not a member), message, or attachment; or redacted", body = Problem,
            example = json!({"type": "https://docs.mathia.dev/problems/attachment_not_found", "title": "Not Found", "status": 404,
                "detail": "this message has no attachment, or it was redacted", "code": "attachment_not_found"}))))]
pub async fn download(
    State(state): State<AppState>,
    principal: Principal,
    AppPath((room_id, message_id)): AppPath<(Uuid, Uuid)>,
    after: AfterPosition,
) -> ApiResult<Response> {
    wait_for(&state, MODEL, after).await?;
    require_member(&state, room_id, principal.user_id).await?;
    let attachment: Option<Option<serde_json::Value>> = find(&state, MODEL, || {
        sqlx::query_scalar(
            "SELECT attachment FROM proj_chat_messages WHERE message_id = $1 AND room_id = $2 AND redacted_at IS NULL",
        )
        .bind(message_id)
        .bind(room_id)
        .fetch_optional(&state.pool)
    })
    .await?;
    let a: Attachment = attachment
        .flatten()
        .and_then(|v| serde_json::from_value(v).ok())
        .ok_or_else(attachment_not_found)?;
    let mut conn = state.pool.acquire().await?;
    let key = state
        .keystore
        .message_keys(&mut conn, &[message_id])
        .await?
        .remove(&message_id)
        .ok_or_else(attachment_not_found)?;
    drop(conn);
    let meta = open_meta(&key, message_id, &a.sealed).ok_or_else(attachment_not_found)?;
    let file_key = Key::from_slice(&meta.key.0).ok_or_else(attachment_not_found)?;
    let Some(mut reader) =
        state.objects.get(&a.storage_key).await.map_err(|e| {
            ApiError::Internal(anyhow::Error::new(e).context("reading an attachment"))
        })?
    else {
        tracing::warn!(%message_id, "attachment bytes missing from the object store");
        return Err(attachment_not_found());
    };
    read_magic(&mut reader)
        .await
        .map_err(|e| ApiError::Internal(anyhow::Error::new(e).context("opening an attachment")))?;
    let stream = opened_records(reader, file_key, meta.upload_id).inspect(move |r| {
        if let Err(e) = r {
            tracing::warn!(%message_id, error = %e, "attachment failed to open mid-stream");
        }
    });
    let mut res = Response::new(Body::from_stream(stream));
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_str(&a.content_type)
            .unwrap_or_else(|_| HeaderValue::from_static("application/octet-stream")),
    );
    h.insert(
        header::CONTENT_LENGTH,
        HeaderValue::from(a.size.max(0) as u64),
    );
    h.insert(header::CONTENT_DISPOSITION, disposition(&meta.name));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; sandbox"),
    );
    // Redaction must end access: nothing on the way may keep a copy.
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, no-store"),
    );
    if let Ok(v) = HeaderValue::from_str(&format!("\"{}\"", a.sha256)) {
        h.insert(header::ETAG, v);
    }
    Ok(res)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn roundtrip(data: &[u8], frame: usize) -> (Vec<u8>, Sealer) {
        let key = Key::random();
        let upload = Uuid::now_v7();
        let mut sealer = Sealer::new(key.clone(), upload, 1 << 30);
        let frames: Vec<Result<Bytes, axum::Error>> = data
            .chunks(frame.max(1))
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        let mut src = futures::stream::iter(frames);
        let stored: Vec<u8> = sealed_records(&mut src, &mut sealer)
            .map(|r| r.unwrap())
            .collect::<Vec<_>>()
            .await
            .concat();
        (stored, sealer)
    }

    async fn open_all(stored: Vec<u8>, key: Key, upload: Uuid) -> io::Result<Vec<u8>> {
        let mut reader: ObjectReader = Box::pin(std::io::Cursor::new(stored));
        read_magic(&mut reader).await?;
        let parts: Vec<Bytes> = opened_records(reader, key, upload)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<io::Result<_>>()?;
        Ok(parts.concat())
    }

    #[tokio::test]
    async fn records_round_trip_at_every_boundary_and_hide_the_bytes() {
        for len in [0, 1, RECORD - 1, RECORD, RECORD + 1, 3 * RECORD + 17] {
            let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let (stored, sealer) = roundtrip(&data, 10_000).await;
            assert_eq!(sealer.size, len as u64);
            assert_eq!(sealer.sha256(), hex(&Sha256::digest(&data)));
            let opened = open_all(stored, sealer.key.clone(), sealer.upload)
                .await
                .unwrap();
            assert_eq!(opened, data, "len {len}");
        }
        let secret = b"the quick brown fox jumps over the lazy dog".repeat(100);
        let (stored, _) = roundtrip(&secret, 7).await;
        assert!(!stored.windows(19).any(|w| w == b"the quick brown fox"));
    }

    #[tokio::test]
    async fn truncation_reordering_tampering_and_a_wrong_key_fail() {
        let data: Vec<u8> = (0..(2 * RECORD + 5)).map(|i| (i % 7) as u8).collect();
        let (stored, sealer) = roundtrip(&data, RECORD).await;
        let (key, upload) = (sealer.key.clone(), sealer.upload);
        let rec = 5 + NONCE + RECORD + TAG;
        // Cut after the first record.
        let cut = stored[..8 + rec].to_vec();
        assert!(open_all(cut, key.clone(), upload).await.is_err());
        // Swap the first two records.
        let mut swapped = stored[..8].to_vec();
        swapped.extend_from_slice(&stored[8 + rec..8 + 2 * rec]);
        swapped.extend_from_slice(&stored[8..8 + rec]);
        swapped.extend_from_slice(&stored[8 + 2 * rec..]);
        assert!(open_all(swapped, key.clone(), upload).await.is_err());
        // Flip one bit.
        let mut flipped = stored.clone();
        flipped[8 + 5 + NONCE + 3] ^= 1;
        assert!(open_all(flipped, key.clone(), upload).await.is_err());
        // Another upload id or key.
        assert!(
            open_all(stored.clone(), key.clone(), Uuid::now_v7())
                .await
                .is_err()
        );
        assert!(
            open_all(stored.clone(), Key::random(), upload)
                .await
                .is_err()
        );
        assert_eq!(open_all(stored, key, upload).await.unwrap(), data);
    }

    #[tokio::test]
    async fn the_limit_stops_the_stream() {
        let mut sealer = Sealer::new(Key::random(), Uuid::now_v7(), 10);
        let mut src = futures::stream::iter(vec![Ok::<_, axum::Error>(Bytes::from_static(
            b"0123456789abc",
        ))]);
        let out: Vec<io::Result<Bytes>> = sealed_records(&mut src, &mut sealer).collect().await;
        assert!(out.iter().any(|r| r.is_err()));
        assert!(sealer.too_large);
    }

    #[test]
    fn media_types_are_checked_and_normalised() {
        assert_eq!(media_type("Audio/OGG").as_deref(), Some("audio/ogg"));
        assert_eq!(
            media_type("audio/ogg;codecs=opus").as_deref(),
            Some("audio/ogg; codecs=opus")
        );
        for bad in [
            "",
            "audio",
            "/ogg",
            "audio/",
            "a b/c",
            "text/plain\r\nX: y",
            "é/x",
        ] {
            assert!(media_type(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn a_file_name_cannot_break_out_of_its_header() {
        let v = disposition("a\"b;\r\nc é.pdf");
        assert_eq!(
            v.to_str().unwrap(),
            "attachment; filename*=UTF-8''a%22b%3B%0D%0Ac%20%C3%A9.pdf"
        );
    }
}
