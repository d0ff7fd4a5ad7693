//! Reminders (set, list, edit, snooze, cancel) and the notification inbox.
//! Only the owner sees or touches a reminder: anyone else gets 404.

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, NaiveDateTime, Utc};
use commands::Command;
use commands::reminder::ReminderCommand;
use events::reminder::{Priority, Recurrence};
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
use crate::ratelimit;
use crate::routes::rooms::require_member;
use crate::state::AppState;

/// The read model behind these endpoints.
pub const MODEL: &str = "reminders";

/// Set a reminder: give exactly one of `due_at`, `in` or `local`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetReminderRequest {
    /// What to remind of (1 to 500 characters).
    #[schema(example = "Call John")]
    pub content: String,
    /// An instant (RFC 3339).
    pub due_at: Option<DateTime<Utc>>,
    /// From now: `90s`, `10m`, `2h`, `3d`.
    #[serde(rename = "in")]
    #[schema(example = "10m")]
    pub after: Option<String>,
    /// A wall-clock time in `zone`, e.g. `2026-12-02T17:00:00`.
    #[schema(value_type = Option<String>, example = "2026-12-02T17:00:00")]
    pub local: Option<NaiveDateTime>,
    /// IANA zone (default `UTC`); daily and weekly reminders keep their local time in it.
    #[schema(example = "Africa/Nairobi")]
    pub zone: Option<String>,
    /// `none` (default), `daily` or `weekly`.
    #[schema(value_type = Option<String>)]
    pub recurrence: Option<Recurrence>,
    /// `low`, `normal` (default) or `high`.
    #[schema(value_type = Option<String>)]
    pub priority: Option<Priority>,
    /// Post it into this room (you must be a member) as well as notifying you.
    pub room_id: Option<Uuid>,
}

/// Change a reminder.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EditReminderRequest {
    /// New text.
    pub content: Option<String>,
    /// New wall-clock time of the next occurrence, in the reminder's zone.
    #[schema(value_type = Option<String>)]
    pub local: Option<NaiveDateTime>,
    /// New priority.
    #[schema(value_type = Option<String>)]
    pub priority: Option<Priority>,
}

/// Snooze the next occurrence.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SnoozeRequest {
    /// Minutes from now, 1 to 10,080 (a week).
    #[schema(example = 10)]
    pub minutes: i64,
}

/// A reminder.
#[derive(Debug, Serialize, ToSchema)]
pub struct ReminderView {
    /// Id.
    pub reminder_id: Uuid,
    /// Text.
    pub content: String,
    /// The next occurrence; null once done or cancelled.
    pub next_due_at: Option<DateTime<Utc>>,
    /// Its wall-clock time in `zone`.
    #[schema(value_type = String)]
    pub local: NaiveDateTime,
    /// IANA zone.
    pub zone: String,
    /// `none`, `daily` or `weekly`.
    pub recurrence: String,
    /// `low`, `normal` or `high`.
    pub priority: String,
    /// The room it posts into.
    pub room_id: Option<Uuid>,
    /// `active`, `done` or `cancelled`.
    pub status: String,
    /// Times it fired.
    pub fired: i32,
    /// Version (for `If-Match`).
    pub version: i64,
}

/// A page of reminders, oldest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct ReminderPage {
    /// Reminders.
    pub items: Vec<ReminderView>,
    /// Next page; null at the end.
    pub next: Option<String>,
}

/// Paging.
#[derive(Debug, Deserialize, IntoParams)]
pub struct ListParams {
    /// `active`, `done` or `cancelled`.
    pub status: Option<String>,
    /// 1 to 100 (default 50).
    pub limit: Option<i64>,
    /// `next` of the previous page.
    pub cursor: Option<String>,
    /// Wait until the read model has this position.
    pub after_position: Option<i64>,
}

/// A notification.
#[derive(Debug, Serialize, ToSchema)]
pub struct NotificationView {
    /// Id.
    pub notification_id: Uuid,
    /// `info`, `success`, `warning`, `error`, `task` or `chat`.
    pub category: String,
    /// One line.
    pub title: String,
    /// More.
    pub body: Option<String>,
    /// What it is about (`reminder:<id>`, `room:<id>`).
    pub link: Option<String>,
    /// When.
    pub created_at: DateTime<Utc>,
    /// When read; null while unread.
    pub read_at: Option<DateTime<Utc>>,
}

/// Notifications, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct NotificationPage {
    /// Notifications.
    pub items: Vec<NotificationView>,
    /// Next (older) page; null at the end.
    pub next: Option<String>,
    /// Unread in the whole inbox.
    pub unread: i64,
}

/// Notification paging.
#[derive(Debug, Deserialize, IntoParams)]
pub struct NotificationParams {
    /// Only unread ones.
    pub unread: Option<bool>,
    /// 1 to 100 (default 50).
    pub limit: Option<i64>,
    /// `next` of the previous page.
    pub cursor: Option<String>,
    /// Wait until the read model has this position.
    pub after_position: Option<i64>,
}

/// Mark notifications read.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MarkReadRequest {
    /// These (at most 500).
    #[serde(default)]
    pub ids: Vec<Uuid>,
    /// Or every one so far.
    #[serde(default)]
    pub all: bool,
}

fn zone(z: Option<&str>) -> ApiResult<(String, chrono_tz::Tz)> {
    let name = z.unwrap_or("UTC");
    let tz: chrono_tz::Tz = name
        .parse()
        .map_err(|_| ApiError::field("zone", "an IANA time zone such as Africa/Nairobi"))?;
    Ok((name.to_owned(), tz))
}

/// `90s`, `10m`, `2h`, `3d` as seconds.
pub fn parse_in(s: &str) -> Option<i64> {
    let s = s.trim();
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit())?);
    let n: i64 = n.parse().ok()?;
    let secs = match unit.trim() {
        "s" | "sec" | "secs" => n,
        "m" | "min" | "mins" => n * 60,
        "h" | "hr" | "hrs" => n * 3600,
        "d" | "day" | "days" => n * 86_400,
        _ => return None,
    };
    (1..=366 * 86_400).contains(&secs).then_some(secs)
}

/// Set a reminder (10 per 12 hours). It rings within a second of its time, once.
#[utoipa::path(post, path = "/v1/reminders", tag = "reminders", security(("bearer" = [])), request_body = SetReminderRequest,
    params(("Idempotency-Key" = Option<String>, Header)),
    responses((status = 201, description = "set", example = json!({"reminder_id": "0193…", "due_at": "2026-12-02T14:00:00Z",
        "local": "2026-12-02T17:00:00", "zone": "Africa/Nairobi", "recurrence": "none", "priority": "normal", "position": 88, "version": 1})),
        (status = 400, body = Problem), (status = 401, body = Problem), (status = 404, description = "no such room", body = Problem),
        (status = 422, body = Problem), (status = 429, body = Problem)))]
pub async fn set_reminder(
    State(state): State<AppState>,
    principal: Principal,
    options: WriteOptions,
    RequestId(rid): RequestId,
    uri: http::Uri,
    AppJson(req): AppJson<SetReminderRequest>,
) -> ApiResult<Response> {
    let (zone_name, tz) = zone(req.zone.as_deref())?;
    let now = Utc::now();
    let local = match (&req.due_at, &req.after, &req.local) {
        (Some(at), None, None) => at.with_timezone(&tz).naive_local(),
        (None, Some(after), None) => {
            let secs = parse_in(after)
                .ok_or_else(|| ApiError::field("in", "like 90s, 10m, 2h or 3d (at most a year)"))?;
            (now + chrono::Duration::seconds(secs))
                .with_timezone(&tz)
                .naive_local()
        }
        (None, None, Some(l)) => *l,
        _ => {
            return Err(ApiError::field(
                "due_at",
                "give exactly one of due_at, in, local",
            ));
        }
    };
    // Refuse what the aggregate would refuse before it costs a quota unit.
    let c = req.content.trim();
    if c.is_empty()
        || req.content.chars().count() > commands::reminder::MAX_CONTENT
        || req.content.contains('\0')
    {
        return Err(ApiError::field(
            "content",
            "1 to 500 characters, without NUL",
        ));
    }
    match commands::reminder::instant(&zone_name, local) {
        Some(at) if at > now => {}
        Some(_) => return Err(ApiError::field("due_at", "the reminder's time has passed")),
        None => return Err(ApiError::field("local", "no such time in this zone")),
    }
    if let Some(room) = req.room_id {
        require_member(&state, room, principal.user_id).await?;
    }
    ratelimit::charge(
        &state,
        "reminders_per_12h",
        principal.user_id,
        state.settings.reminders_per_12h,
        12 * 3600,
    )
    .await?;
    dispatch(
        &state,
        &principal,
        Route::post(&uri),
        &options,
        rid,
        &req,
        |reminder_id| {
            Ok(Command::Reminder(ReminderCommand::SetReminder {
                reminder_id,
                content: req.content.clone(),
                local,
                zone: zone_name.clone(),
                recurrence: req.recurrence.unwrap_or(Recurrence::None),
                priority: req.priority.unwrap_or(Priority::Normal),
                room_id: req.room_id,
                now,
            }))
        },
    )
    .await
}

fn view(r: &sqlx::postgres::PgRow) -> ReminderView {
    ReminderView {
        reminder_id: r.get("reminder_id"),
        content: r.get("content"),
        next_due_at: r.get("next_due_at"),
        local: r.get("local"),
        zone: r.get("zone"),
        recurrence: r.get("recurrence"),
        priority: r.get("priority"),
        room_id: r.get("room_id"),
        status: r.get("status"),
        fired: r.get("fired"),
        version: r.get("version"),
    }
}

const COLUMNS: &str = "reminder_id, content, next_due_at, local, zone, recurrence, priority, room_id, status, fired, version, created_at";

/// Your reminders, oldest first.
#[utoipa::path(get, path = "/v1/reminders", tag = "reminders", security(("bearer" = [])), params(ListParams),
    responses((status = 200, body = ReminderPage), (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 422, body = Problem)))]
pub async fn list_reminders(
    State(state): State<AppState>,
    principal: Principal,
    AppQuery(params): AppQuery<ListParams>,
    after: AfterPosition,
) -> ApiResult<Response> {
    let position = wait_for(
        &state,
        MODEL,
        AfterPosition(params.after_position.or(after.0)),
    )
    .await?;
    let limit = limit(params.limit)?;
    if let Some(s) = &params.status
        && !["active", "done", "cancelled"].contains(&s.as_str())
    {
        return Err(ApiError::field("status", "active, done or cancelled"));
    }
    let (after_us, after_id) = match &params.cursor {
        Some(c) => parse_cursor("r1", c)?,
        None => (i64::MIN, Uuid::nil()),
    };
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS}, (extract(epoch FROM created_at) * 1000000)::bigint AS us FROM proj_reminders
         WHERE owner = $1 AND ($2::text IS NULL OR status = $2)
           AND ((extract(epoch FROM created_at) * 1000000)::bigint, reminder_id) > ($3, $4)
         ORDER BY created_at, reminder_id LIMIT $5"
    )))
    .bind(principal.user_id)
    .bind(&params.status)
    .bind(after_us)
    .bind(after_id)
    .bind(limit + 1)
    .fetch_all(&state.pool)
    .await?;
    let more = rows.len() as i64 > limit;
    let items: Vec<ReminderView> = rows.iter().take(limit as usize).map(view).collect();
    let next = rows
        .get(limit as usize - 1)
        .filter(|_| more)
        .map(|r| cursor("r1", r.get("us"), r.get("reminder_id")));
    Ok((
        position_header(position),
        Json(ReminderPage { items, next }),
    )
        .into_response())
}

fn reminder_not_found() -> ApiError {
    ApiError::coded(
        http::StatusCode::NOT_FOUND,
        "reminder_not_found",
        "no such reminder",
    )
}

/// One of your reminders.
#[utoipa::path(get, path = "/v1/reminders/{reminder_id}", tag = "reminders", security(("bearer" = [])),
    params(("reminder_id" = Uuid, Path), ReadParams),
    responses((status = 200, body = ReminderView), (status = 401, body = Problem), (status = 404, body = Problem)))]
pub async fn get_reminder(
    State(state): State<AppState>,
    principal: Principal,
    AppPath(id): AppPath<Uuid>,
    after: AfterPosition,
) -> ApiResult<Response> {
    let position = wait_for(&state, MODEL, after).await?;
    let row = find(&state, MODEL, || {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM proj_reminders WHERE reminder_id = $1 AND owner = $2"
        )))
        .bind(id)
        .bind(principal.user_id)
        .fetch_optional(&state.pool)
    })
    .await?
    .ok_or_else(reminder_not_found)?;
    Ok((position_header(position), Json(view(&row))).into_response())
}

/// Change the text, the time of the next occurrence or the priority.
#[utoipa::path(patch, path = "/v1/reminders/{reminder_id}", tag = "reminders", security(("bearer" = [])),
    request_body = EditReminderRequest, params(("reminder_id" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header),
        ("If-Match" = Option<String>, Header)),
    responses((status = 200, description = "changed"), (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 404, body = Problem), (status = 409, body = Problem), (status = 412, body = Problem), (status = 422, body = Problem)))]
pub async fn edit_reminder(
    State(state): State<AppState>,
    principal: Principal,
    options: WriteOptions,
    RequestId(rid): RequestId,
    uri: http::Uri,
    AppPath(reminder_id): AppPath<Uuid>,
    AppJson(req): AppJson<EditReminderRequest>,
) -> ApiResult<Response> {
    let cmd = ReminderCommand::EditReminder {
        reminder_id,
        content: req.content.clone(),
        local: req.local,
        priority: req.priority,
        now: Utc::now(),
    };
    command(&state, &principal, "PATCH", &uri, &options, rid, &req, cmd).await
}

/// Ring again later.
#[utoipa::path(post, path = "/v1/reminders/{reminder_id}/snooze", tag = "reminders", security(("bearer" = [])),
    request_body = SnoozeRequest, params(("reminder_id" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header)),
    responses((status = 200, description = "snoozed", example = json!({"reminder_id": "0193…", "due_at": "2026-12-02T14:10:00Z"})),
        (status = 400, body = Problem), (status = 401, body = Problem), (status = 404, body = Problem),
        (status = 409, body = Problem), (status = 422, body = Problem)))]
pub async fn snooze_reminder(
    State(state): State<AppState>,
    principal: Principal,
    options: WriteOptions,
    RequestId(rid): RequestId,
    uri: http::Uri,
    AppPath(reminder_id): AppPath<Uuid>,
    AppJson(req): AppJson<SnoozeRequest>,
) -> ApiResult<Response> {
    if !(1..=10_080).contains(&req.minutes) {
        return Err(ApiError::field("minutes", "1 to 10080"));
    }
    let cmd = ReminderCommand::SnoozeReminder {
        reminder_id,
        for_secs: req.minutes * 60,
        now: Utc::now(),
    };
    command(&state, &principal, "POST", &uri, &options, rid, &req, cmd).await
}

/// Cancel: no more occurrences.
#[utoipa::path(delete, path = "/v1/reminders/{reminder_id}", tag = "reminders", security(("bearer" = [])),
    params(("reminder_id" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header)),
    responses((status = 200, description = "cancelled"), (status = 401, body = Problem), (status = 404, body = Problem),
        (status = 409, body = Problem)))]
pub async fn cancel_reminder(
    State(state): State<AppState>,
    principal: Principal,
    options: WriteOptions,
    RequestId(rid): RequestId,
    uri: http::Uri,
    AppPath(reminder_id): AppPath<Uuid>,
) -> ApiResult<Response> {
    let cmd = ReminderCommand::CancelReminder { reminder_id };
    command(&state, &principal, "DELETE", &uri, &options, rid, &(), cmd).await
}

/// Your notifications, newest first, with the unread count.
#[utoipa::path(get, path = "/v1/notifications", tag = "reminders", security(("bearer" = [])), params(NotificationParams),
    responses((status = 200, body = NotificationPage), (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 422, body = Problem)))]
pub async fn list_notifications(
    State(state): State<AppState>,
    principal: Principal,
    AppQuery(params): AppQuery<NotificationParams>,
    after: AfterPosition,
) -> ApiResult<Response> {
    let position = wait_for(
        &state,
        MODEL,
        AfterPosition(params.after_position.or(after.0)),
    )
    .await?;
    let limit = limit(params.limit)?;
    let before = match &params.cursor {
        Some(c) => parse_cursor("n1", c)?.0,
        None => i64::MAX,
    };
    // One statement, so one snapshot: the unread count always agrees with the
    // page (two statements could count a notification the page did not show).
    let mut rows = sqlx::query(
        "WITH c AS (SELECT count(*) AS unread FROM proj_notifications WHERE user_id = $1 AND read_at IS NULL)
         SELECT c.unread, p.* FROM c LEFT JOIN LATERAL (
             SELECT notification_id, category, title, body, link, created_at, read_at, position
             FROM proj_notifications
             WHERE user_id = $1 AND position < $2 AND (NOT $3 OR read_at IS NULL)
             ORDER BY position DESC LIMIT $4) p ON true",
    )
    .bind(principal.user_id)
    .bind(before)
    .bind(params.unread.unwrap_or(false))
    .bind(limit + 1)
    .fetch_all(&state.pool)
    .await?;
    let unread: i64 = rows.first().map_or(0, |r| r.get("unread"));
    rows.retain(|r| r.get::<Option<Uuid>, _>("notification_id").is_some());
    let more = rows.len() as i64 > limit;
    let items = rows
        .iter()
        .take(limit as usize)
        .map(|r| NotificationView {
            notification_id: r.get("notification_id"),
            category: r.get("category"),
            title: r.get("title"),
            body: r.get("body"),
            link: r.get("link"),
            created_at: r.get("created_at"),
            read_at: r.get("read_at"),
        })
        .collect();
    let next = rows
        .get(limit as usize - 1)
        .filter(|_| more)
        .map(|r| cursor("n1", r.get("position"), r.get("notification_id")));
    Ok((
        position_header(position),
        Json(NotificationPage {
            items,
            next,
            unread,
        }),
    )
        .into_response())
}

/// Mark notifications read: some by id, or all so far.
#[utoipa::path(post, path = "/v1/notifications/read", tag = "reminders", security(("bearer" = [])), request_body = MarkReadRequest,
    params(("Idempotency-Key" = Option<String>, Header)),
    responses((status = 200, description = "marked"), (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 422, body = Problem)))]
pub async fn mark_read(
    State(state): State<AppState>,
    principal: Principal,
    options: WriteOptions,
    RequestId(rid): RequestId,
    uri: http::Uri,
    AppJson(req): AppJson<MarkReadRequest>,
) -> ApiResult<Response> {
    if req.ids.len() > 500 {
        return Err(ApiError::field("ids", "at most 500"));
    }
    if req.ids.is_empty() == !req.all {
        return Err(ApiError::field(
            "ids",
            "name notifications, or say all: true",
        ));
    }
    let cmd = ReminderCommand::MarkNotificationsRead {
        user: principal.user_id,
        ids: req.ids.clone(),
        all: req.all,
    };
    command(&state, &principal, "POST", &uri, &options, rid, &req, cmd).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_times_read_like_people_write_them() {
        assert_eq!(parse_in("10m"), Some(600));
        assert_eq!(parse_in("90s"), Some(90));
        assert_eq!(parse_in("2 h"), Some(7200));
        assert_eq!(parse_in("3days"), Some(3 * 86_400));
        assert_eq!(parse_in("0m"), None);
        assert_eq!(parse_in("10 parsecs"), None);
        assert_eq!(parse_in("m"), None);
        assert_eq!(parse_in("999d"), None);
    }
}
