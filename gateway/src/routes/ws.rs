//! `GET /v1/ws`: the WebSocket. JSON text frames both ways; the protocol is in
//! the README ("Realtime") and `deploy/asyncapi.yaml`.
//!
//! - Auth: `Authorization: Bearer` on the upgrade (native clients), or a first
//!   frame `{"type":"auth","token":…}` within 10 s (browsers cannot set headers).
//!   Never in the URL, which proxies log.
//! - `Origin` must be one of `MATHIA_WS_ORIGINS` when that is set (tokens never
//!   ride in cookies, so a foreign page cannot borrow a session anyway).
//! - The server pings every `heartbeat`; a connection silent for `idle` is closed
//!   (4000). Frames are limited in size (1009) and in rate (4008). A bad token
//!   closes with 4001. permessage-deflate is negotiated when the client offers it
//!   (no context takeover, pooled compressors: an idle connection holds none).
//! - Subscriptions (`room:<id>`, `user`) replay after their `since` cursor and
//!   then stream live (see [`crate::realtime`]). Typing, presence and assistant
//!   stream chunks are signals: pushed to the room's watchers, never replayed.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use uuid::Uuid;
use yawc::close::CloseCode;
use yawc::{Frame, IncomingUpgrade, OpCode, Options};

use crate::auth::{Principal, bearer, verify};
use crate::error::{ApiError, Problem};
use crate::realtime::{self, Cursor, Item, NotRecovered};
use crate::routes::rooms::require_member;
use crate::signals;
use crate::state::AppState;

/// A frame from the client.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ClientFrame {
    Auth {
        token: String,
    },
    Subscribe {
        id: String,
        channel: String,
        since: Option<String>,
    },
    Unsubscribe {
        id: String,
    },
    Typing {
        room_id: Uuid,
        #[serde(default = "yes")]
        typing: bool,
    },
    Presence {
        status: String,
    },
    Ping,
}

fn yes() -> bool {
    true
}

/// What a connection writes: frames, or a close.
enum Out {
    Frame(String),
    /// A subscription fell too far behind, or its room went away for this user.
    Ended {
        id: String,
        reason: &'static str,
    },
}

fn origin_allowed(state: &AppState, headers: &http::HeaderMap) -> bool {
    let allowed = &state.settings.ws_origins;
    match headers
        .get(http::header::ORIGIN)
        .and_then(|o| o.to_str().ok())
    {
        _ if allowed.is_empty() => true,
        None => true,
        Some(origin) => allowed.iter().any(|a| a == origin),
    }
}

/// Open the realtime WebSocket (JSON frames; see the README's "Realtime" for the protocol).
#[utoipa::path(get, path = "/v1/ws", tag = "realtime",
    params(("Authorization" = Option<String>, Header, description = "Bearer token; or send an `auth` frame first")),
    responses((status = 101, description = "switching to the WebSocket protocol"),
        (status = 400, description = "not a WebSocket upgrade", body = Problem),
        (status = 401, description = "invalid token", body = Problem),
        (status = 403, description = "Origin not allowed", body = Problem)))]
pub async fn ws(
    State(state): State<AppState>,
    headers: http::HeaderMap,
    upgrade: Result<IncomingUpgrade, http::StatusCode>,
) -> Response {
    if !origin_allowed(&state, &headers) {
        return ApiError::Coded {
            status: http::StatusCode::FORBIDDEN,
            code: "origin_forbidden".into(),
            message: "this Origin may not open the WebSocket".into(),
            extra: Default::default(),
        }
        .into_response();
    }
    let principal = match bearer(&headers) {
        None => None,
        Some(token) => match verify(&state.keys, token) {
            Some(c) => Some(Principal {
                user_id: c.sub,
                admin: c.role == "admin",
            }),
            None => {
                return ApiError::Unauthorized("the access token is invalid or expired".into())
                    .into_response();
            }
        },
    };
    let Ok(upgrade) = upgrade else {
        return ApiError::Malformed(
            "a WebSocket upgrade (Connection: upgrade, Upgrade: websocket, Sec-WebSocket-Version: 13) is required"
                .into(),
        )
        .into_response();
    };
    // Socket buffers start at 1 KiB and grow with the traffic (tokio-util's
    // default is 8 KiB each way): most connections sit idle, and the pair was
    // half of an idle connection's memory.
    let options = Options::default()
        .with_read_buffer_capacity(1024)
        .with_write_buffer_capacity(1024)
        .with_max_payload_read(state.settings.ws_max_frame)
        .with_utf8()
        .with_low_latency_compression()
        .server_no_context_takeover()
        .client_no_context_takeover()
        .with_deflate_pool(state.deflate.clone());
    match upgrade.upgrade(options) {
        Ok((response, fut)) => {
            tokio::spawn(async move {
                match fut.await {
                    Ok(socket) => Connection::new(state, principal).run(socket).await,
                    Err(e) => tracing::debug!(error = %e, "websocket upgrade failed"),
                }
            });
            response.into_response()
        }
        Err(_) => ApiError::Malformed("the WebSocket handshake is invalid".into()).into_response(),
    }
}

struct Connection {
    state: AppState,
    principal: Option<Principal>,
    id: Uuid,
    subs: HashMap<String, tokio::task::JoinHandle<()>>,
    /// Room subscriptions by room, for signals and departures.
    rooms: HashMap<Uuid, String>,
    tx: mpsc::Sender<Out>,
    rx: mpsc::Receiver<Out>,
    /// Token bucket of client frames.
    tokens: f64,
    refilled: Instant,
    last_typing: HashMap<Uuid, Instant>,
    /// With a `user` subscription: its id, and the counts last sent per (room, thread).
    unread: Option<(String, HashMap<(Uuid, Uuid), (i32, i32)>)>,
    /// The hub position when the counts were last looked at.
    unread_at: i64,
}

impl Connection {
    fn new(state: AppState, principal: Option<Principal>) -> Self {
        let (tx, rx) = mpsc::channel(realtime::QUEUE);
        let burst = f64::from(state.settings.ws_frames_per_sec.max(1)) * 2.0;
        Connection {
            state,
            principal,
            id: Uuid::now_v7(),
            subs: HashMap::new(),
            rooms: HashMap::new(),
            tx,
            rx,
            tokens: burst,
            refilled: Instant::now(),
            last_typing: HashMap::new(),
            unread: None,
            unread_at: -1,
        }
    }

    fn allow(&mut self) -> bool {
        let rate = f64::from(self.state.settings.ws_frames_per_sec.max(1));
        let now = Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.refilled).as_secs_f64() * rate).min(rate * 2.0);
        self.refilled = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    async fn run<S>(mut self, mut socket: yawc::WebSocket<S>)
    where
        yawc::WebSocket<S>: futures::Stream<Item = Frame> + futures::Sink<Frame> + Unpin,
    {
        metrics::gauge!("mathia_ws_connections").increment(1.0);
        let settings = self.state.settings.clone();
        let started = Instant::now();
        let mut last_heard = Instant::now();
        let mut heartbeat = tokio::time::interval(settings.ws_heartbeat);
        heartbeat.tick().await;
        let mut signals = self.state.signals.subscribe();
        // Unread counts for a `user` subscription: looked at once a second, only
        // when the feed moved, and sent only where they changed.
        let mut counts = tokio::time::interval(Duration::from_secs(1));
        if let Some(p) = &self.principal {
            let ready = self.ready(p.user_id).await;
            let _ = socket.send(Frame::text(ready)).await;
        }
        let close = loop {
            tokio::select! {
                frame = socket.next() => {
                    let Some(frame) = frame else { break None };
                    last_heard = Instant::now();
                    match frame.opcode() {
                        OpCode::Close => break None,
                        OpCode::Text => {
                            if !self.allow() {
                                break Some((4008, "rate limited: too many frames"));
                            }
                            let text = frame.as_str().to_owned();
                            match self.on_frame(&text).await {
                                Ok(replies) => {
                                    for r in replies {
                                        if socket.send(Frame::text(r)).await.is_err() {
                                            break;
                                        }
                                    }
                                }
                                Err(close) => break Some(close),
                            }
                        }
                        OpCode::Binary => break Some((1003, "text frames only")),
                        _ => {}
                    }
                }
                out = self.rx.recv() => {
                    let Some(out) = out else { break None };
                    let text = match out {
                        Out::Frame(t) => t,
                        Out::Ended { id, reason } => {
                            self.subs.remove(&id);
                            if self.unread.as_ref().is_some_and(|(s, _)| *s == id) {
                                self.unread = None;
                            }
                            self.rooms.retain(|_, s| *s != id);
                            json!({"type": "unsubscribed", "id": id, "reason": reason}).to_string()
                        }
                    };
                    if socket.send(Frame::text(text)).await.is_err() {
                        break None;
                    }
                }
                signal = signals.recv() => {
                    if let Ok(signal) = signal
                        && let Some(id) = self.rooms.get(&signal.room_id)
                    {
                        let mut frame = signal.frame.clone();
                        if let Some(o) = frame.as_object_mut() {
                            o.insert("sub".into(), json!(id));
                        }
                        let _ = socket.send(Frame::text(frame.to_string())).await;
                    }
                }
                _ = self.state.hub.closing.cancelled() => {
                    break Some((1001, "the server is restarting: reconnect and resume"));
                }
                _ = counts.tick(), if self.unread.is_some() => {
                    for frame in self.unread_changes().await {
                        if socket.send(Frame::text(frame)).await.is_err() {
                            break;
                        }
                    }
                }
                _ = heartbeat.tick() => {
                    if self.principal.is_none() && started.elapsed() > settings.ws_auth_timeout {
                        break Some((4001, "authenticate first: send an auth frame"));
                    }
                    if last_heard.elapsed() > settings.ws_idle_timeout {
                        break Some((4000, "idle timeout"));
                    }
                    if let Some(p) = &self.principal {
                        signals::presence_beat(&self.state, p.user_id, self.id, None).await;
                    }
                    if socket.send(Frame::ping(Vec::<u8>::new())).await.is_err() {
                        break None;
                    }
                }
            }
        };
        if let Some((code, reason)) = close {
            let _ = socket
                .send(Frame::close(CloseCode::from(code), reason))
                .await;
        }
        let _ = socket.close().await;
        for (_, task) in self.subs.drain() {
            task.abort();
        }
        if let Some(p) = &self.principal {
            self.state.hub.connection(p.user_id, self.id, false);
            signals::presence_gone(&self.state, p.user_id, self.id).await;
        }
        metrics::gauge!("mathia_ws_connections").decrement(1.0);
    }

    /// `unread` frames for the counts that changed since the last look.
    async fn unread_changes(&mut self) -> Vec<String> {
        let (Some(p), Some((sub, last))) = (&self.principal, &mut self.unread) else {
            return vec![];
        };
        let (now, _) = self.state.hub.now();
        if now == self.unread_at {
            return vec![];
        }
        let rows: Vec<(Uuid, Uuid, i32, i32)> = match sqlx::query_as(
            "SELECT room_id, thread_root, unread, mentions FROM proj_chat_unread WHERE user_id = $1",
        )
        .bind(p.user_id)
        .fetch_all(&self.state.pool)
        .await
        {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "unread counts unavailable");
                return vec![];
            }
        };
        self.unread_at = now;
        let mut frames = vec![];
        let mut seen = std::collections::HashSet::new();
        for (room, thread, unread, mentions) in rows {
            seen.insert((room, thread));
            if last.get(&(room, thread)) != Some(&(unread, mentions)) {
                last.insert((room, thread), (unread, mentions));
                frames.push(unread_frame(sub, room, thread, unread, mentions));
            }
        }
        // A row that disappeared (the user left the room) is zero now.
        let gone: Vec<(Uuid, Uuid)> = last.keys().filter(|k| !seen.contains(k)).copied().collect();
        for (room, thread) in gone {
            last.remove(&(room, thread));
            frames.push(unread_frame(sub, room, thread, 0, 0));
        }
        frames
    }

    async fn ready(&mut self, user: Uuid) -> String {
        self.state.hub.connection(user, self.id, true);
        signals::presence_beat(&self.state, user, self.id, None).await;
        json!({
            "type": "ready",
            "user_id": user,
            "connection_id": self.id,
            "heartbeat_secs": self.state.settings.ws_heartbeat.as_secs(),
        })
        .to_string()
    }

    /// Handle one client frame; `Err` closes the connection with a code.
    async fn on_frame(&mut self, text: &str) -> Result<Vec<String>, (u16, &'static str)> {
        let frame: ClientFrame = match serde_json::from_str(text) {
            Ok(f) => f,
            Err(e) => {
                return Ok(vec![error_frame(
                    None,
                    "malformed_frame",
                    &format!("not a frame of this protocol: {e}"),
                )]);
            }
        };
        let principal = match (&self.principal, frame) {
            (None, ClientFrame::Auth { token }) => {
                let Some(c) = verify(&self.state.keys, &token) else {
                    return Err((4001, "the access token is invalid or expired"));
                };
                self.principal = Some(Principal {
                    user_id: c.sub,
                    admin: c.role == "admin",
                });
                return Ok(vec![self.ready(c.sub).await]);
            }
            (None, _) => return Err((4001, "authenticate first: send an auth frame")),
            (Some(_), ClientFrame::Auth { .. }) => {
                return Ok(vec![error_frame(
                    None,
                    "already_authenticated",
                    "this connection is authenticated",
                )]);
            }
            (Some(p), f) => (p.clone(), f),
        };
        let (p, frame) = principal;
        Ok(match frame {
            ClientFrame::Ping => vec![json!({"type": "pong"}).to_string()],
            ClientFrame::Subscribe { id, channel, since } => {
                self.subscribe(&p, id, &channel, since.as_deref()).await
            }
            ClientFrame::Unsubscribe { id } => match self.subs.remove(&id) {
                Some(task) => {
                    task.abort();
                    self.rooms.retain(|_, s| *s != id);
                    if self.unread.as_ref().is_some_and(|(s, _)| *s == id) {
                        self.unread = None;
                    }
                    vec![json!({"type": "unsubscribed", "id": id, "reason": "asked"}).to_string()]
                }
                None => vec![error_frame(
                    Some(&id),
                    "no_such_subscription",
                    "no subscription has this id",
                )],
            },
            ClientFrame::Typing { room_id, typing } => {
                // Coalesced: a refresh within 3 s of the last one is not sent again.
                let now = Instant::now();
                let recent = self
                    .last_typing
                    .get(&room_id)
                    .is_some_and(|t| now.duration_since(*t) < Duration::from_secs(3));
                if typing && recent {
                    return Ok(vec![]);
                }
                if require_member(&self.state, room_id, p.user_id)
                    .await
                    .is_err()
                {
                    return Ok(vec![error_frame(None, "room_not_found", "no such room")]);
                }
                if typing {
                    self.last_typing.insert(room_id, now);
                } else {
                    self.last_typing.remove(&room_id);
                }
                signals::typing(&self.state, room_id, p.user_id, typing).await;
                vec![]
            }
            ClientFrame::Presence { status } => match status.as_str() {
                "online" | "away" => {
                    signals::presence_beat(&self.state, p.user_id, self.id, Some(status == "away"))
                        .await;
                    vec![]
                }
                _ => vec![error_frame(
                    None,
                    "malformed_frame",
                    "status is online or away",
                )],
            },
            ClientFrame::Auth { .. } => vec![],
        })
    }

    async fn subscribe(
        &mut self,
        p: &Principal,
        id: String,
        channel: &str,
        since: Option<&str>,
    ) -> Vec<String> {
        if id.is_empty() || id.len() > 64 {
            return vec![error_frame(
                None,
                "malformed_frame",
                "a subscription id is 1 to 64 characters",
            )];
        }
        if self.subs.contains_key(&id) {
            return vec![error_frame(
                Some(&id),
                "duplicate_subscription",
                "this id is in use",
            )];
        }
        if self.subs.len() >= self.state.settings.ws_max_subscriptions {
            return vec![error_frame(
                Some(&id),
                "too_many_subscriptions",
                "unsubscribe something first",
            )];
        }
        let (topic, room): (String, Option<Uuid>) = match channel {
            "user" => (projections::feed::user_topic(p.user_id), None),
            c => match c.strip_prefix("room:").and_then(|r| r.parse::<Uuid>().ok()) {
                Some(room) => {
                    // A non-member learns nothing, not even whether the room exists.
                    if require_member(&self.state, room, p.user_id).await.is_err() {
                        return vec![error_frame(Some(&id), "room_not_found", "no such room")];
                    }
                    (projections::feed::room_topic(room), Some(room))
                }
                None => {
                    return vec![error_frame(
                        Some(&id),
                        "malformed_frame",
                        "channel is `user` or `room:<uuid>`",
                    )];
                }
            },
        };
        let since = match since.map(Cursor::decode) {
            None => None,
            Some(Some(c)) => Some(c),
            Some(None) => {
                return vec![error_frame(
                    Some(&id),
                    "invalid_cursor",
                    "not a cursor of this server",
                )];
            }
        };
        // Join the live stream first: everything after `from` is queued for us
        // while we replay up to `from` ourselves.
        let mut sub = self.state.hub.subscribe(&topic);
        let (from, epoch) = (sub.from, sub.epoch);
        let replayed = match since {
            None => Ok(vec![]),
            Some(c) => match realtime::replay(
                &self.state,
                std::slice::from_ref(&topic),
                c,
                from,
                epoch,
                i64::MAX,
            )
            .await
            {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(error = format!("{e:#}"), "replay failed");
                    return vec![error_frame(Some(&id), "unavailable", "try again")];
                }
            },
        };
        let (recovered, reason, items) = match replayed {
            Ok(items) => (true, None, items),
            Err(why) => (false, Some(why), vec![]),
        };
        let me = p.user_id;
        let mut head = vec![
            json!({
                "type": "subscribed", "id": id, "channel": channel, "recovered": recovered,
                "reason": reason.map(|r: NotRecovered| r),
                "cursor": Cursor { epoch, position: from }.encode(),
                "replayed": items.len(),
            })
            .to_string(),
        ];
        if room.is_none() {
            // The user stream carries unread counts: all of them now, then changes.
            self.unread = Some((id.clone(), HashMap::new()));
            self.unread_at = -1;
            head.extend(self.unread_changes().await);
        }
        if let Some(room) = room {
            head.push(
                json!({"type": "typing", "sub": id, "room_id": room,
                       "user_ids": signals::typers(&self.state, room).await})
                .to_string(),
            );
            self.rooms.insert(room, id.clone());
        }
        let tx = self.tx.clone();
        let sub_id = id.clone();
        let task = tokio::spawn(async move {
            for item in items {
                let (frame, ended) = event_frame(&sub_id, epoch, &item, me);
                if tx.send(Out::Frame(frame)).await.is_err() {
                    return;
                }
                if let Some(reason) = ended {
                    let _ = tx.send(Out::Ended { id: sub_id, reason }).await;
                    return;
                }
            }
            while let Some(item) = sub.rx.recv().await {
                let (frame, ended) = event_frame(&sub_id, epoch, &item, me);
                if tx.send(Out::Frame(frame)).await.is_err() {
                    return;
                }
                if let Some(reason) = ended {
                    let _ = tx.send(Out::Ended { id: sub_id, reason }).await;
                    return;
                }
            }
            // The hub cut us off: too slow, or a rebuild. Resuming from the last cursor is safe.
            let (_, now) = sub.hub_now();
            let reason = if now != epoch {
                "epoch_changed"
            } else {
                "lagged"
            };
            let _ = tx.send(Out::Ended { id: sub_id, reason }).await;
        });
        self.subs.insert(id, task);
        head
    }
}

/// An `event` frame, and whether it ends the subscription for this user (they
/// left the room, were removed from it, or it was deleted).
fn event_frame(sub: &str, epoch: i64, item: &Item, me: Uuid) -> (String, Option<&'static str>) {
    let frame = json!({
        "type": "event",
        "sub": sub,
        "topic": item.topic,
        "cursor": Cursor { epoch, position: item.position }.encode(),
        "kind": item.kind,
        "data": item.data,
        "occurred_at": item.occurred_at,
    })
    .to_string();
    let about_me = item.data.get("user_id").and_then(Value::as_str) == Some(&me.to_string());
    let ended = match item.kind.as_str() {
        "RoomDeleted" if item.topic.starts_with("room:") => Some("room_deleted"),
        "MemberLeft" if about_me && item.topic.starts_with("room:") => Some("left"),
        "MemberKicked" if about_me && item.topic.starts_with("room:") => Some("kicked"),
        "MemberBanned" if about_me && item.topic.starts_with("room:") => Some("banned"),
        _ => None,
    };
    (frame, ended)
}

fn unread_frame(sub: &str, room: Uuid, thread: Uuid, unread: i32, mentions: i32) -> String {
    json!({
        "type": "unread", "sub": sub, "room_id": room,
        "thread_root": if thread.is_nil() { None } else { Some(thread) },
        "unread": unread, "mentions": mentions,
    })
    .to_string()
}

fn error_frame(id: Option<&str>, code: &str, message: &str) -> String {
    json!({"type": "error", "id": id, "code": code, "message": message}).to_string()
}
