//! Realtime delivery: the feed tailer, subscriptions and resume cursors,
//! shared by the WebSocket (`/v1/ws`) and long-poll (`/v1/sync`) endpoints.
//!
//! The projector `feed` writes one row per (topic, event) at the event's global
//! position, in the same transaction as its checkpoint; positions are gapless
//! and commit-ordered. So:
//! - **replay** after cursor `P` is `rows of my topics with position > P`, read
//!   in one snapshot together with the retention floor (a cursor at or below the
//!   floor, or of another epoch, is refused as a whole: `recovered: false`);
//! - **live** is the [`Hub`]'s tailer: woken by `NOTIFY mathia_feed` (or a tick),
//!   it reads the rows between the position it had delivered and the feed's
//!   checkpoint, opens their bodies once, and hands each to the subscribers of
//!   its topic on this instance;
//! - **no gap, no duplicate**: a subscription registers under the hub's lock and
//!   learns the position `T` the tailer has delivered up to; it replays
//!   `(P, T]` itself while the tailer queues everything after `T` for it.
//!
//! Every gateway instance tails the same table, so a client gets everything on
//! any instance and may resume on another one: a cursor is a global position.
//!
//! A cursor is opaque: `base64url("c1:<epoch>:<position>")`. The epoch is the sum
//! of the epochs of the read models a subscriber's view rests on (`feed`,
//! `chat`, `wallet`); each one grows when its checkpoint moves backwards (a
//! rebuild), so a cursor from before a rebuild is refused and the client reloads.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use commands::crypto;
use events::chat::Sealed;
use serde::Serialize;
use serde_json::Value;
use sqlx::Row;
use tokio::sync::{mpsc, watch};
use uuid::Uuid;

use crate::state::AppState;

/// How many rows a subscriber may have queued before it is cut off as too slow
/// (it then resumes from its last cursor, losing nothing).
pub const QUEUE: usize = 8192;

/// A feed row as a subscriber receives it: bodies opened, rendered once for
/// every subscriber of its topic.
#[derive(Debug, Clone, Serialize)]
pub struct Item {
    /// `room:<id>` or `user:<id>`.
    pub topic: String,
    /// Global position of the event.
    pub position: i64,
    /// The event type (`MessagePosted`, `Credited`, …).
    pub kind: String,
    /// The event's fields, bodies in clear (null once erased).
    pub data: Value,
    /// When it happened.
    pub occurred_at: DateTime<Utc>,
}

/// A resume cursor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    /// The read models' epoch it was issued under.
    pub epoch: i64,
    /// The last position delivered.
    pub position: i64,
}

impl Cursor {
    /// The opaque form.
    pub fn encode(&self) -> String {
        URL_SAFE_NO_PAD.encode(format!("c1:{}:{}", self.epoch, self.position))
    }

    /// Parse the opaque form.
    pub fn decode(s: &str) -> Option<Cursor> {
        let text = String::from_utf8(URL_SAFE_NO_PAD.decode(s).ok()?).ok()?;
        let mut parts = text.strip_prefix("c1:")?.splitn(2, ':');
        let epoch = parts.next()?.parse().ok()?;
        let position: i64 = parts.next()?.parse().ok()?;
        (position >= 0).then_some(Cursor { epoch, position })
    }
}

/// Why a cursor cannot be resumed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NotRecovered {
    /// A read model was rebuilt since the cursor was issued.
    EpochChanged,
    /// The rows after the cursor are no longer kept.
    Retention,
}

struct Subscriber {
    id: u64,
    tx: mpsc::Sender<Arc<Item>>,
}

struct HubState {
    /// Everything up to here has been handed to the subscribers.
    position: i64,
    epoch: i64,
    next_id: u64,
    topics: HashMap<String, Vec<Subscriber>>,
}

/// This instance's subscriptions and the tailer that feeds them.
pub struct Hub {
    state: Mutex<HubState>,
    /// Authenticated connections of this instance (user, connection): their
    /// presence is withdrawn when the gateway stops, so a restart leaves no ghosts.
    connections: Mutex<std::collections::HashSet<(Uuid, Uuid)>>,
    /// Cancelled when the gateway stops: every connection closes with 1001.
    pub closing: tokio_util::sync::CancellationToken,
    /// The delivered position, for long-polls waiting for news.
    moved: watch::Sender<(i64, i64)>,
}

impl Default for Hub {
    fn default() -> Self {
        Hub {
            state: Mutex::new(HubState {
                position: 0,
                epoch: 0,
                next_id: 0,
                topics: HashMap::new(),
            }),
            moved: watch::channel((0, 0)).0,
            connections: Mutex::default(),
            closing: tokio_util::sync::CancellationToken::new(),
        }
    }
}

/// A live subscription: rows after `from` arrive on `rx`; dropping it unregisters.
pub struct Subscription {
    hub: Arc<Hub>,
    topic: String,
    id: u64,
    /// Rows after `from`, in order.
    pub rx: mpsc::Receiver<Arc<Item>>,
    /// The position the tailer had delivered when this subscription joined.
    pub from: i64,
    /// The epoch then.
    pub epoch: i64,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut s = self.hub.state.lock().expect("hub lock");
        if let Some(list) = s.topics.get_mut(&self.topic) {
            list.retain(|sub| sub.id != self.id);
            if list.is_empty() {
                s.topics.remove(&self.topic);
            }
        }
    }
}

impl Subscription {
    /// The hub's delivered position and epoch now.
    pub fn hub_now(&self) -> (i64, i64) {
        self.hub.now()
    }
}

impl Hub {
    /// Join `topic`: live rows after the returned `from` are queued for it.
    pub fn subscribe(self: &Arc<Self>, topic: &str) -> Subscription {
        let (tx, rx) = mpsc::channel(QUEUE);
        let mut s = self.state.lock().expect("hub lock");
        s.next_id += 1;
        let id = s.next_id;
        s.topics
            .entry(topic.to_owned())
            .or_default()
            .push(Subscriber { id, tx });
        Subscription {
            hub: self.clone(),
            topic: topic.to_owned(),
            id,
            rx,
            from: s.position,
            epoch: s.epoch,
        }
    }

    /// The delivered position and the epoch.
    pub fn now(&self) -> (i64, i64) {
        *self.moved.borrow()
    }

    /// Wait until the delivered position passes `after` (or `timeout`).
    pub async fn wait_past(&self, after: i64, timeout: Duration) {
        let mut rx = self.moved.subscribe();
        let _ = tokio::time::timeout(timeout, rx.wait_for(|(p, _)| *p > after)).await;
    }

    /// A connection of `user` is open (true) or closed (false).
    pub fn connection(&self, user: Uuid, conn: Uuid, open: bool) {
        let mut c = self.connections.lock().expect("hub lock");
        if open {
            c.insert((user, conn));
        } else {
            c.remove(&(user, conn));
        }
    }

    /// The authenticated connections still open, emptied.
    pub fn take_connections(&self) -> Vec<(Uuid, Uuid)> {
        self.connections.lock().expect("hub lock").drain().collect()
    }

    /// Subscribers on this instance.
    pub fn subscribers(&self) -> usize {
        let s = self.state.lock().expect("hub lock");
        s.topics.values().map(Vec::len).sum()
    }

    fn deliver(&self, items: Vec<Arc<Item>>, up_to: i64, epoch: i64) {
        let mut s = self.state.lock().expect("hub lock");
        let mut cut = HashMap::new();
        if epoch != s.epoch {
            // A rebuild: every cursor handed out is stale. Cut every subscriber
            // off (after the new epoch is published below, so each sees why);
            // they resubscribe and are told `recovered: false`.
            cut = std::mem::take(&mut s.topics);
            s.epoch = epoch;
        } else {
            for item in items {
                if let Some(list) = s.topics.get_mut(&item.topic) {
                    // A subscriber too slow to keep up is dropped (its channel closes):
                    // it resumes from its last cursor and loses nothing.
                    list.retain(|sub| sub.tx.try_send(item.clone()).is_ok());
                }
            }
            s.topics.retain(|_, list| !list.is_empty());
        }
        s.position = up_to;
        drop(s);
        self.moved.send_replace((up_to, epoch));
        drop(cut);
    }
}

/// The feed's checkpoint, and the epoch cursors are issued under (the sum of
/// the feed's and the read models' behind it), in one round trip.
async fn feed_head(pool: &sqlx::PgPool) -> Result<(i64, i64), sqlx::Error> {
    sqlx::query_as(
        "SELECT COALESCE(max(position) FILTER (WHERE model = 'feed'), 0),
                COALESCE(sum(epoch), 0)::bigint
         FROM proj_checkpoints WHERE model IN ('feed', 'chat', 'wallet')",
    )
    .fetch_one(pool)
    .await
}

/// Read feed rows of `topics` in `(after, up_to]` (all topics when `None`), in
/// position order, at most `limit`, and render them.
pub async fn read(
    state: &AppState,
    conn: &mut sqlx::PgConnection,
    topics: Option<&[String]>,
    after: i64,
    up_to: i64,
    limit: i64,
) -> anyhow::Result<Vec<Item>> {
    let rows = sqlx::query(
        "SELECT topic, position, kind, payload, occurred_at FROM proj_feed
         WHERE position > $1 AND position <= $2 AND ($3::text[] IS NULL OR topic = ANY($3))
         ORDER BY position, topic LIMIT $4",
    )
    .bind(after)
    .bind(up_to)
    .bind(topics)
    .bind(limit)
    .fetch_all(&mut *conn)
    .await?;
    render(state, conn, rows).await
}

/// Open the bodies of `rows` (one keystore read for all of them).
async fn render(
    state: &AppState,
    conn: &mut sqlx::PgConnection,
    rows: Vec<sqlx::postgres::PgRow>,
) -> anyhow::Result<Vec<Item>> {
    let mut items: Vec<Item> = rows
        .into_iter()
        .map(|r| Item {
            topic: r.get("topic"),
            position: r.get("position"),
            kind: r.get("kind"),
            data: r.get("payload"),
            occurred_at: r.get("occurred_at"),
        })
        .collect();
    let sealed_id = |i: &Item| -> Option<Uuid> {
        let field = match i.kind.as_str() {
            "MessagePosted" | "MessageEdited" => "message_id",
            "NotePinned" | "NoteEdited" => "note_id",
            _ => return None,
        };
        i.data.get(field)?.as_str()?.parse().ok()
    };
    let ids: Vec<Uuid> = items.iter().filter_map(sealed_id).collect();
    let keys = state.keystore.message_keys(conn, &ids).await?;
    for item in &mut items {
        let Some(id) = sealed_id(item) else {
            continue;
        };
        let key = keys.get(&id);
        let field = if item.kind.starts_with("Note") {
            "note"
        } else {
            "body"
        };
        let open = |v: Option<&Value>| -> Value {
            v.and_then(|v| serde_json::from_value::<Sealed>(v.clone()).ok())
                .and_then(|s| crypto::open(key?, &crypto::field_aad(id, field), &s).ok())
                .map(|b| Value::String(String::from_utf8_lossy(&b).into_owned()))
                .unwrap_or(Value::Null)
        };
        let body = open(item.data.get("body"));
        let room = item
            .data
            .get("room_id")
            .and_then(|v| v.as_str())
            .and_then(|s| s.parse::<Uuid>().ok());
        if let Some(o) = item.data.as_object_mut() {
            o.insert("body".into(), body);
            if let Some(a) = o.remove("attachment").filter(|a| !a.is_null()) {
                let view =
                    room.and_then(|room| crate::routes::attachments::view(Some(a), key, room, id));
                o.insert("attachment".into(), serde_json::to_value(view)?);
            }
            o.remove("key_version");
        }
    }
    Ok(items)
}

/// A replay of `topics` after `since`, read in one snapshot with the retention
/// floor: all of it, or (with the reason) nothing.
pub async fn replay(
    state: &AppState,
    topics: &[String],
    since: Cursor,
    up_to: i64,
    epoch: i64,
    limit: i64,
) -> anyhow::Result<Result<Vec<Item>, NotRecovered>> {
    if since.epoch != epoch {
        return Ok(Err(NotRecovered::EpochChanged));
    }
    let mut tx = state.pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .execute(&mut *tx)
        .await?;
    let floor: i64 = sqlx::query_scalar("SELECT position FROM proj_feed_floor")
        .fetch_one(&mut *tx)
        .await?;
    if since.position < floor {
        return Ok(Err(NotRecovered::Retention));
    }
    let items = read(state, &mut tx, Some(topics), since.position, up_to, limit).await?;
    tx.commit().await?;
    Ok(Ok(items))
}

/// Tail the feed until `shutdown`: deliver each committed row once to this
/// instance's subscribers.
pub async fn tail(
    state: AppState,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    let hub = state.hub.clone();
    let (start, ep) = feed_head(&state.pool).await?;
    hub.deliver(vec![], start, ep);
    let mut listener = sqlx::postgres::PgListener::connect_with(&state.pool).await?;
    listener.listen("mathia_feed").await?;
    let mut position = start;
    let mut current_epoch = ep;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = listener.recv() => {
                // The feed commits many times a second under load: one look at
                // the head answers every notification already here.
                while listener.next_buffered().is_some() {}
            }
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
        let result: anyhow::Result<()> = async {
            let (head, ep) = feed_head(&state.pool).await?;
            if ep != current_epoch || head < position {
                current_epoch = ep;
                position = head;
                hub.deliver(vec![], head, ep);
                return Ok(());
            }
            while position < head {
                let mut conn = state.pool.acquire().await?;
                let items = read(&state, &mut conn, None, position, head, 2000).await?;
                // A full chunk may end inside one position's rows: deliver up to the
                // last complete position and read the rest next.
                let up_to = if items.len() == 2000 {
                    items
                        .last()
                        .map(|i| i.position - 1)
                        .unwrap_or(head)
                        .max(position)
                } else {
                    head
                };
                let chunk: Vec<Arc<Item>> = items
                    .into_iter()
                    .filter(|i| i.position <= up_to)
                    .map(Arc::new)
                    .collect();
                metrics::counter!("mathia_realtime_items_total").increment(chunk.len() as u64);
                hub.deliver(chunk, up_to, ep);
                if up_to == position {
                    // One position with more than a chunk of rows cannot happen (one
                    // event makes a handful); guard against a stall all the same.
                    break;
                }
                position = up_to;
            }
            Ok(())
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(error = format!("{e:#}"), "feed tail failed; retrying");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        metrics::gauge!("mathia_realtime_subscribers").set(hub.subscribers() as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_foreign_strings_are_not_cursors() {
        let c = Cursor {
            epoch: 3,
            position: 1234,
        };
        assert_eq!(Cursor::decode(&c.encode()), Some(c));
        assert_eq!(Cursor::decode("not-a-cursor"), None);
        assert_eq!(Cursor::decode(&URL_SAFE_NO_PAD.encode("c1:1:-5")), None);
        assert_eq!(Cursor::decode(&URL_SAFE_NO_PAD.encode("t1:b:5")), None);
    }

    #[tokio::test]
    async fn a_subscriber_gets_rows_after_its_start_in_order_and_a_slow_one_is_cut_off() {
        let hub = Arc::new(Hub::default());
        hub.deliver(vec![], 10, 1);
        let mut fast = hub.subscribe("room:a");
        assert_eq!((fast.from, fast.epoch), (10, 1));
        let item = |p: i64, topic: &str| {
            Arc::new(Item {
                topic: topic.into(),
                position: p,
                kind: "MessagePosted".into(),
                data: Value::Null,
                occurred_at: Utc::now(),
            })
        };
        hub.deliver(
            vec![item(11, "room:a"), item(12, "room:b"), item(13, "room:a")],
            13,
            1,
        );
        assert_eq!(fast.rx.recv().await.unwrap().position, 11);
        assert_eq!(fast.rx.recv().await.unwrap().position, 13);
        assert_eq!(hub.now(), (13, 1));
        // A rebuild (new epoch) cuts everyone off.
        hub.deliver(vec![], 2, 2);
        assert!(fast.rx.recv().await.is_none());
        drop(fast);
        assert_eq!(hub.subscribers(), 0);
    }
}
