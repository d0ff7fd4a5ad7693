//! Projector `feed`: what realtime subscribers replay and stream.
//!
//! Each event that a person watching a room, or a user watching their own
//! stream, should see becomes a row of `proj_feed` under a topic
//! (`room:<id>`, `user:<id>`) at the event's global position. Positions are
//! gapless and commit-ordered, so "every row of my topics after cursor P, in
//! position order" is a replay with no gap and no duplicate, and the gateway's
//! tailer streams the rows that commit later in the same order. Bodies stay
//! sealed as in the events; the gateway opens them for the subscriber.
//!
//! What goes where:
//! - `room:<id>`: the room's life (created, renamed, archived, deleted, key
//!   rotated), membership (invited, joined, left, kicked, banned, unbanned,
//!   roles, mutes), messages (posted, edited, redacted, reactions) and notes.
//!   Address invitations and moderation flags are not there: they are for the
//!   inviter and the moderators only.
//! - `user:<id>`: invitations to them, their removal from a room, mentions of
//!   them, their own read receipts (for their other devices), and the movements
//!   of their wallets.

use events::chat::ChatEvent;
use events::wallet::WalletEvent;
use events::{Event, EventEnvelope};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::Projector;

/// Projector `feed`.
#[derive(Debug, Clone, Copy, Default)]
pub struct FeedProjector;

/// The topic of a room.
pub fn room_topic(room: Uuid) -> String {
    format!("room:{room}")
}

/// The topic of a user's own stream.
pub fn user_topic(user: Uuid) -> String {
    format!("user:{user}")
}

impl Projector for FeedProjector {
    fn name(&self) -> &'static str {
        "feed"
    }

    fn domains(&self) -> &'static [&'static str] {
        &[
            events::chat::DOMAIN,
            events::wallet::DOMAIN,
            events::notify::DOMAIN,
        ]
    }

    fn tables(&self) -> &'static [&'static str] {
        &[
            "proj_feed",
            "proj_feed_floor",
            "feed_message_rooms",
            "feed_account_owners",
        ]
    }

    fn shadow_seed(&self) -> Option<&'static str> {
        // A rebuild from position N holds no row at or below N.
        Some("INSERT INTO proj_feed_floor (position) VALUES ($1)")
    }

    async fn apply(&self, tx: &mut PgConnection, batch: &[EventEnvelope]) -> anyhow::Result<()> {
        let mut rows = Rows::default();
        let mut owners = Owners::load(tx, batch).await?;
        for env in batch {
            match env.event()? {
                Event::Chat(e) => self.chat(tx, env, e, &mut rows).await?,
                Event::Wallet(e) => self.wallet(tx, env, e, &mut rows, &mut owners).await?,
                // Not in `domains()`; itinerary changes reach rooms as system messages.
                Event::Notify(e) => {
                    // Persisted first (the event), pushed on the user's stream.
                    let user = stream_uuid(env)?;
                    let mut payload = serde_json::to_value(&e)?;
                    if let Some(o) = payload.as_object_mut() {
                        o.remove("type");
                    }
                    rows.push(user_topic(user), env, payload);
                }
                Event::Itinerary(_)
                | Event::Reminder(_)
                | Event::Webhook(_)
                | Event::Invoice(_) => {}
            }
        }
        rows.write(tx).await
    }
}

/// Rows of one batch, written with one statement per table.
#[derive(Default)]
struct Rows {
    topic: Vec<String>,
    position: Vec<i64>,
    kind: Vec<String>,
    payload: Vec<serde_json::Value>,
    at: Vec<chrono::DateTime<chrono::Utc>>,
    /// The rooms of the batch's posts (`feed_message_rooms`), which later events
    /// of the same batch read from here: one statement, not one per post.
    message_rooms: std::collections::BTreeMap<Uuid, Uuid>,
}

impl Rows {
    fn push(&mut self, topic: String, env: &EventEnvelope, payload: serde_json::Value) {
        self.topic.push(topic);
        self.position.push(env.position);
        self.kind.push(env.event_type.clone());
        self.payload.push(payload);
        self.at.push(env.occurred_at);
    }

    async fn write(self, tx: &mut PgConnection) -> anyhow::Result<()> {
        if !self.message_rooms.is_empty() {
            let (ids, rooms): (Vec<Uuid>, Vec<Uuid>) = self.message_rooms.into_iter().unzip();
            sqlx::query(
                "INSERT INTO feed_message_rooms (message_id, room_id)
                 SELECT * FROM UNNEST($1::uuid[], $2::uuid[]) ON CONFLICT DO NOTHING",
            )
            .bind(&ids)
            .bind(&rooms)
            .execute(&mut *tx)
            .await?;
        }
        if self.topic.is_empty() {
            return Ok(());
        }
        sqlx::query(
            "INSERT INTO proj_feed (topic, position, kind, payload, occurred_at)
             SELECT * FROM UNNEST($1::text[], $2::bigint[], $3::text[], $4::jsonb[], $5::timestamptz[])
             ON CONFLICT DO NOTHING",
        )
        .bind(&self.topic)
        .bind(&self.position)
        .bind(&self.kind)
        .bind(&self.payload)
        .bind(&self.at)
        .execute(tx)
        .await?;
        Ok(())
    }
}

/// The owners of the wallet accounts a batch moves, read in one statement
/// before the batch (an owner never changes; accounts opened within the batch
/// are added as their `AccountOpened` is applied). One query per wallet event
/// was the feed's largest cost under fee transfers (four legs each).
struct Owners(std::collections::HashMap<Uuid, Uuid>);

impl Owners {
    async fn load(tx: &mut PgConnection, batch: &[EventEnvelope]) -> anyhow::Result<Self> {
        let accounts: Vec<Uuid> = batch
            .iter()
            .filter(|e| e.stream_id.domain() == events::wallet::DOMAIN)
            .filter_map(|e| e.stream_id.id().parse().ok())
            .collect::<std::collections::BTreeSet<Uuid>>()
            .into_iter()
            .collect();
        if accounts.is_empty() {
            return Ok(Owners(Default::default()));
        }
        let found: Vec<(Uuid, Uuid)> = sqlx::query_as(
            "SELECT account_id, owner_id FROM feed_account_owners WHERE account_id = ANY($1)",
        )
        .bind(&accounts)
        .fetch_all(&mut *tx)
        .await?;
        Ok(Owners(found.into_iter().collect()))
    }
}

fn stream_uuid(env: &EventEnvelope) -> anyhow::Result<Uuid> {
    Ok(env.stream_id.id().parse()?)
}

impl FeedProjector {
    async fn chat(
        &self,
        tx: &mut PgConnection,
        env: &EventEnvelope,
        event: ChatEvent,
        rows: &mut Rows,
    ) -> anyhow::Result<()> {
        let mut payload = serde_json::to_value(&event)?;
        if let Some(o) = payload.as_object_mut() {
            o.remove("type");
        }
        match &event {
            ChatEvent::EmailInvited { .. }
            | ChatEvent::MessageFlagged { .. }
            | ChatEvent::FlagCleared { .. } => {}
            ChatEvent::MessagePosted {
                message_id,
                room_id,
                mentions,
                ..
            } => {
                rows.message_rooms.insert(*message_id, *room_id);
                for u in mentions {
                    rows.push(
                        user_topic(*u),
                        env,
                        serde_json::json!({ "room_id": room_id, "message_id": message_id }),
                    );
                }
                rows.push(room_topic(*room_id), env, payload);
            }
            ChatEvent::MessageEdited { .. }
            | ChatEvent::MessageRedacted { .. }
            | ChatEvent::ReactionAdded { .. }
            | ChatEvent::ReactionRemoved { .. } => {
                let message_id = stream_uuid(env)?;
                let room: Option<Uuid> = match rows.message_rooms.get(&message_id) {
                    Some(room) => Some(*room),
                    None => {
                        sqlx::query_scalar(
                            "SELECT room_id FROM feed_message_rooms WHERE message_id = $1",
                        )
                        .bind(message_id)
                        .fetch_optional(&mut *tx)
                        .await?
                    }
                };
                if let (Some(room), Some(o)) = (room, payload.as_object_mut()) {
                    o.insert("message_id".into(), serde_json::json!(message_id));
                    o.insert("room_id".into(), serde_json::json!(room));
                    rows.push(room_topic(room), env, payload);
                }
            }
            ChatEvent::ReceiptMoved { room_id, .. } => {
                let reader = stream_uuid(env)?;
                if let Some(o) = payload.as_object_mut() {
                    o.insert("room_id".into(), serde_json::json!(room_id));
                }
                rows.push(user_topic(reader), env, payload);
            }
            _ => {
                // Room-stream events: the room's topic, and the user they concern.
                let room = stream_uuid(env)?;
                if let Some(o) = payload.as_object_mut() {
                    o.insert("room_id".into(), serde_json::json!(room));
                }
                if let ChatEvent::MemberInvited { user_id, .. }
                | ChatEvent::MemberKicked { user_id, .. }
                | ChatEvent::MemberBanned { user_id, .. } = &event
                {
                    rows.push(user_topic(*user_id), env, payload.clone());
                }
                if matches!(event, ChatEvent::RoomDeleted) {
                    rows.message_rooms.retain(|_, r| *r != room);
                    sqlx::query("DELETE FROM feed_message_rooms WHERE room_id = $1")
                        .bind(room)
                        .execute(&mut *tx)
                        .await?;
                }
                rows.push(room_topic(room), env, payload);
            }
        }
        Ok(())
    }

    async fn wallet(
        &self,
        tx: &mut PgConnection,
        env: &EventEnvelope,
        event: WalletEvent,
        rows: &mut Rows,
        owners: &mut Owners,
    ) -> anyhow::Result<()> {
        let account = stream_uuid(env)?;
        let mut payload = serde_json::to_value(&event)?;
        if let Some(o) = payload.as_object_mut() {
            o.remove("type");
            o.insert("account_id".into(), serde_json::json!(account));
        }
        match &event {
            WalletEvent::AccountOpened {
                owner_id: Some(owner),
                ..
            } => {
                sqlx::query(
                    "INSERT INTO feed_account_owners (account_id, owner_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                )
                .bind(account)
                .bind(owner)
                .execute(&mut *tx)
                .await?;
                owners.0.insert(account, *owner);
                rows.push(user_topic(*owner), env, payload);
            }
            WalletEvent::AccountOpened { .. } => {}
            // Money movements, holds and limits: the owner sees them all
            // (system accounts have none).
            _ => {
                if let Some(owner) = owners.0.get(&account) {
                    rows.push(user_topic(*owner), env, payload);
                }
            }
        }
        Ok(())
    }
}

/// Delete feed rows older than the newest `keep` positions of the log; returns
/// the new floor (rows at or below it are gone, so older cursors cannot replay).
pub async fn prune(pool: &sqlx::PgPool, keep: i64) -> anyhow::Result<i64> {
    let checkpoint = crate::checkpoint(pool, "feed").await?;
    let floor = (checkpoint - keep).max(0);
    let mut tx = pool.begin().await?;
    let current: i64 = sqlx::query_scalar("SELECT position FROM proj_feed_floor FOR UPDATE")
        .fetch_one(&mut *tx)
        .await?;
    if floor > current {
        sqlx::query("DELETE FROM proj_feed WHERE position <= $1")
            .bind(floor)
            .execute(&mut *tx)
            .await?;
        sqlx::query("UPDATE proj_feed_floor SET position = $1")
            .bind(floor)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(floor.max(current))
}
