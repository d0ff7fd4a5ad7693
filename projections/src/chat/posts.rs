//! Set-based application of runs of main-timeline `MessagePosted` events.
//!
//! `ChatProjector::apply_one` costs about six statements per posted message
//! (the row, the room's last position, the unread counts, two keystore reads
//! and the index tokens). Under load most of a batch is consecutive posts, so
//! `apply` collects each run of consecutive main-timeline posts and applies it
//! here with one statement per table, whatever the run's length.
//!
//! Same rows as applying the run event by event: no other chat event lies
//! inside a run (any other event ends it and is applied after it), so the set
//! of unread rows is the same for every post of the run, the room's last
//! position is the greatest position of the run in it, and each counter gains
//! the sum of the per-post increments. Thread replies keep the per-event path
//! (they create unread rows and touch their root). Whatever changes in how
//! `apply_one` projects a main-timeline post must change here too.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use commands::crypto;
use events::EventEnvelope;
use events::chat::{ChatEvent, Sealed};
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use super::{ChatProjector, MAIN};

/// One main-timeline post, as the run collects it.
pub(super) struct Post {
    message_id: Uuid,
    room_id: Uuid,
    position: i64,
    sender: Uuid,
    kind: &'static str,
    body: Sealed,
    attachment: Option<String>,
    quote: Option<Uuid>,
    mentions: Vec<Uuid>,
    mentions_assistant: bool,
    client_message_id: Option<String>,
    sent_at: DateTime<Utc>,
}

impl Post {
    /// The post that `event` is, or the event back when it is anything else
    /// (another event, or a thread reply).
    pub(super) fn main_timeline(
        env: &EventEnvelope,
        event: ChatEvent,
    ) -> anyhow::Result<Result<Post, ChatEvent>> {
        Ok(match event {
            ChatEvent::MessagePosted {
                message_id,
                room_id,
                sender,
                kind,
                body,
                attachment,
                thread_root: None,
                quote,
                mentions,
                mentions_assistant,
                client_message_id,
                sent_at,
                ..
            } => Ok(Post {
                message_id,
                room_id,
                position: env.position,
                sender,
                kind: kind.as_str(),
                body,
                attachment: attachment.as_ref().map(serde_json::to_string).transpose()?,
                quote,
                mentions,
                mentions_assistant,
                client_message_id,
                sent_at,
            }),
            other => Err(other),
        })
    }
}

/// `{a,b}`: an array literal (of uuids or numbers), for a column of arrays
/// passed as text[].
fn array_literal<T: std::fmt::Display>(values: &[T]) -> String {
    let inner: Vec<String> = values.iter().map(T::to_string).collect();
    format!("{{{}}}", inner.join(","))
}

impl ChatProjector {
    /// Apply a run of consecutive main-timeline posts.
    pub(super) async fn apply_posts(
        &self,
        tx: &mut PgConnection,
        posts: &[Post],
    ) -> anyhow::Result<()> {
        if posts.is_empty() {
            return Ok(());
        }
        let ids: Vec<Uuid> = posts.iter().map(|p| p.message_id).collect();
        let rooms: Vec<Uuid> = posts.iter().map(|p| p.room_id).collect();
        let senders: Vec<Uuid> = posts.iter().map(|p| p.sender).collect();
        let mentions: Vec<String> = posts.iter().map(|p| array_literal(&p.mentions)).collect();
        let mut bodies = Vec::with_capacity(posts.len());
        for p in posts {
            bodies.push(serde_json::to_string(&p.body)?);
        }
        let tokens = self.tokens_of(tx, posts).await?;
        sqlx::query(
            "INSERT INTO proj_chat_messages (message_id, room_id, position, thread_root, sender, kind, body, attachment,
                quote, mentions, mentions_assistant, client_message_id, sent_at, search_tokens)
             SELECT x.id, x.room, x.pos, NULL, x.sender, x.kind, x.body::jsonb, x.att::jsonb, x.quote,
                    x.mentions::uuid[], x.assistant, x.cmid, x.at, x.tokens::bigint[]
             FROM UNNEST($1::uuid[], $2::uuid[], $3::bigint[], $4::uuid[], $5::text[], $6::text[], $7::text[],
                         $8::uuid[], $9::text[], $10::bool[], $11::text[], $12::timestamptz[], $13::text[])
               AS x(id, room, pos, sender, kind, body, att, quote, mentions, assistant, cmid, at, tokens)",
        )
        .bind(&ids)
        .bind(&rooms)
        .bind(posts.iter().map(|p| p.position).collect::<Vec<i64>>())
        .bind(&senders)
        .bind(posts.iter().map(|p| p.kind).collect::<Vec<&str>>())
        .bind(&bodies)
        .bind(
            posts
                .iter()
                .map(|p| p.attachment.clone())
                .collect::<Vec<Option<String>>>(),
        )
        .bind(posts.iter().map(|p| p.quote).collect::<Vec<Option<Uuid>>>())
        .bind(&mentions)
        .bind(
            posts
                .iter()
                .map(|p| p.mentions_assistant)
                .collect::<Vec<bool>>(),
        )
        .bind(
            posts
                .iter()
                .map(|p| p.client_message_id.clone())
                .collect::<Vec<Option<String>>>(),
        )
        .bind(posts.iter().map(|p| p.sent_at).collect::<Vec<DateTime<Utc>>>())
        .bind(&tokens)
        .execute(&mut *tx)
        .await?;
        // Positions grow along the run: the last post of a room is its greatest.
        let last: BTreeMap<Uuid, i64> = posts.iter().map(|p| (p.room_id, p.position)).collect();
        sqlx::query(
            "UPDATE proj_chat_rooms r SET last_position = x.p
             FROM UNNEST($1::uuid[], $2::bigint[]) AS x(room_id, p) WHERE r.room_id = x.room_id",
        )
        .bind(last.keys().copied().collect::<Vec<Uuid>>())
        .bind(last.values().copied().collect::<Vec<i64>>())
        .execute(&mut *tx)
        .await?;
        // Every member's row of the main timeline counts the posts of others.
        sqlx::query(
            "UPDATE proj_chat_unread u SET unread = u.unread + c.n, mentions = u.mentions + c.m
             FROM (SELECT r.user_id, r.room_id, count(*)::int AS n,
                          (count(*) FILTER (WHERE r.user_id = ANY(x.mentions::uuid[])))::int AS m
                   FROM UNNEST($1::uuid[], $2::uuid[], $3::text[]) AS x(room_id, sender, mentions)
                   JOIN proj_chat_unread r ON r.room_id = x.room_id AND r.thread_root = $4 AND r.user_id <> x.sender
                   GROUP BY r.user_id, r.room_id) c
             WHERE u.user_id = c.user_id AND u.room_id = c.room_id AND u.thread_root = $4",
        )
        .bind(&rooms)
        .bind(&senders)
        .bind(&mentions)
        .bind(MAIN)
        .execute(&mut *tx)
        .await?;
        Ok(())
    }

    /// The blind index of each post of the run, as `bigint[]` literals (keys in
    /// two reads; what `ChatProjector::tokens` gives per message).
    async fn tokens_of(
        &self,
        tx: &mut PgConnection,
        posts: &[Post],
    ) -> anyhow::Result<Vec<Option<String>>> {
        let ids: Vec<Uuid> = posts.iter().map(|p| p.message_id).collect();
        let keys = self.keystore.message_keys(tx, &ids).await?;
        let mut rooms: Vec<Uuid> = posts.iter().map(|p| p.room_id).collect();
        rooms.sort();
        rooms.dedup();
        let rows = sqlx::query(
            "SELECT room_id, wrapped FROM chat_room_keys WHERE room_id = ANY($1) AND version = 1",
        )
        .bind(&rooms)
        .fetch_all(&mut *tx)
        .await?;
        let search: BTreeMap<Uuid, crypto::Key> = rows
            .iter()
            .filter_map(|r| {
                let room: Uuid = r.get("room_id");
                let wrapped: Vec<u8> = r.get("wrapped");
                self.keystore
                    .open_room_key(room, 1, &wrapped)
                    .map(|k| (room, crypto::search_key(&k)))
            })
            .collect();
        Ok(posts
            .iter()
            .map(|p| {
                let key = keys.get(&p.message_id)?;
                let search = search.get(&p.room_id)?;
                super::sealed_tokens(search, key, p.message_id, &p.body).map(|t| array_literal(&t))
            })
            .collect())
    }
}
