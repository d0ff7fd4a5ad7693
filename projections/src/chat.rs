//! The chat read models: rooms, members, invitations, the timeline (messages,
//! edits, reactions, thread summaries), unread and mention counts, and the blind
//! search index.
//!
//! Unread counts are kept so that, at every checkpoint, for each joined member
//! and timeline (main or one thread):
//! `unread = #{messages in it after read_position, not theirs, not redacted}`,
//! and `mentions` the same restricted to messages mentioning them. Joining
//! resets the row to the join position; leaving deletes it. Receipts recount.
//!
//! The search index needs the plaintext, so this projector opens bodies with
//! the keystore; a redacted message has no key and is never indexed, which makes
//! a rebuild from zero identical to the live model.

use std::collections::BTreeMap;

use commands::crypto;
use events::chat::{ChatEvent, Sealed};
use events::{Event, EventEnvelope};
use handlers::keystore::Keystore;
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use crate::Projector;

mod moderation;
mod posts;

/// The main timeline's key in `proj_chat_unread.thread_root`.
pub const MAIN: Uuid = Uuid::nil();

/// Projector `chat`.
#[derive(Debug, Clone)]
pub struct ChatProjector {
    /// Opens message keys for the search index.
    pub keystore: Keystore,
}

impl Projector for ChatProjector {
    fn name(&self) -> &'static str {
        "chat"
    }

    fn domains(&self) -> &'static [&'static str] {
        &[events::chat::DOMAIN]
    }

    fn tables(&self) -> &'static [&'static str] {
        &[
            "proj_chat_rooms",
            "proj_chat_members",
            "proj_chat_email_invites",
            "proj_chat_messages",
            "proj_chat_edits",
            "proj_chat_unread",
            "proj_chat_flags",
            "proj_chat_mutes",
            "proj_chat_notes",
        ]
    }

    fn deferred_indexes(&self) -> &'static [&'static str] {
        // Read by the gateway (search, jump to date, thread lists), never by `apply`.
        &[
            "proj_chat_messages_search",
            "proj_chat_messages_room",
            "proj_chat_messages_at",
            "proj_chat_messages_threads",
        ]
    }

    async fn apply(&self, tx: &mut PgConnection, batch: &[EventEnvelope]) -> anyhow::Result<()> {
        // Runs of consecutive main-timeline posts go in set-based (module `posts`).
        let mut run = Vec::new();
        for env in batch {
            let Event::Chat(event) = env.event()? else {
                continue;
            };
            match posts::Post::main_timeline(env, event)? {
                Ok(post) => run.push(post),
                Err(event) => {
                    self.apply_posts(tx, &std::mem::take(&mut run)).await?;
                    self.apply_one(tx, env, event).await?;
                }
            }
        }
        self.apply_posts(tx, &run).await
    }
}

/// The blind index of a sealed body under its message key and the room's
/// search key (`None` when it has no searchable word or does not open).
fn sealed_tokens(
    search: &crypto::Key,
    key: &crypto::Key,
    message: Uuid,
    body: &Sealed,
) -> Option<Vec<i64>> {
    let Ok(plain) = crypto::open(key, &crypto::field_aad(message, "body"), body) else {
        tracing::warn!(%message, "a message body does not open with its key; not indexed");
        return None;
    };
    let tokens = crypto::index_tokens(search, &String::from_utf8_lossy(&plain));
    (!tokens.is_empty()).then_some(tokens)
}

fn stream_uuid(env: &EventEnvelope) -> anyhow::Result<Uuid> {
    Ok(env.stream_id.id().parse()?)
}

impl ChatProjector {
    async fn apply_one(
        &self,
        tx: &mut PgConnection,
        env: &EventEnvelope,
        event: ChatEvent,
    ) -> anyhow::Result<()> {
        let at = env.occurred_at;
        let pos = env.position;
        match event {
            ChatEvent::RoomCreated {
                room_id,
                name,
                topic,
                visibility,
                created_by,
            } => {
                sqlx::query(
                    "INSERT INTO proj_chat_rooms (room_id, name, topic, visibility, created_by, created_at, key_version, version, last_position)
                     VALUES ($1, $2, $3, $4, $5, $6, 1, $7, $8)",
                )
                .bind(room_id)
                .bind(&name)
                .bind(&topic)
                .bind(visibility.as_str())
                .bind(created_by)
                .bind(at)
                .bind(env.version)
                .bind(pos)
                .execute(&mut *tx)
                .await?;
                self.join(tx, room_id, created_by, "owner", env).await?;
            }
            ChatEvent::RoomUpdated { name, topic } => {
                let room = stream_uuid(env)?;
                sqlx::query(
                    "UPDATE proj_chat_rooms SET name = COALESCE($2, name),
                        topic = CASE WHEN $3::text IS NULL THEN topic WHEN $3 = '' THEN NULL ELSE $3 END,
                        version = $4 WHERE room_id = $1",
                )
                .bind(room)
                .bind(&name)
                .bind(&topic)
                .bind(env.version)
                .execute(&mut *tx)
                .await?;
            }
            ChatEvent::RoomArchived => {
                self.room_version(tx, env, "archived = true, ").await?;
            }
            ChatEvent::RoomKeyRotated { version } => {
                sqlx::query(
                    "UPDATE proj_chat_rooms SET key_version = $2, version = $3 WHERE room_id = $1",
                )
                .bind(stream_uuid(env)?)
                .bind(version)
                .bind(env.version)
                .execute(&mut *tx)
                .await?;
            }
            ChatEvent::RoomDeleted => {
                let room = stream_uuid(env)?;
                for table in [
                    "DELETE FROM proj_chat_edits WHERE message_id IN (SELECT message_id FROM proj_chat_messages WHERE room_id = $1)",
                    "DELETE FROM proj_chat_messages WHERE room_id = $1",
                    "DELETE FROM proj_chat_unread WHERE room_id = $1",
                    "DELETE FROM proj_chat_members WHERE room_id = $1",
                    "DELETE FROM proj_chat_email_invites WHERE room_id = $1",
                    "DELETE FROM proj_chat_rooms WHERE room_id = $1",
                    "DELETE FROM proj_chat_flags WHERE room_id = $1",
                    "DELETE FROM proj_chat_mutes WHERE room_id = $1",
                    "DELETE FROM proj_chat_notes WHERE room_id = $1",
                ] {
                    sqlx::query(table).bind(room).execute(&mut *tx).await?;
                }
            }
            ChatEvent::MemberInvited { user_id, .. } => {
                let room = stream_uuid(env)?;
                self.member_state(tx, room, user_id, "invited", None, env)
                    .await?;
                self.room_version(tx, env, "").await?;
            }
            ChatEvent::EmailInvited { email, by } => {
                sqlx::query(
                    "INSERT INTO proj_chat_email_invites (room_id, email, invited_by, at) VALUES ($1, $2, $3, $4)
                     ON CONFLICT DO NOTHING",
                )
                .bind(stream_uuid(env)?)
                .bind(&email)
                .bind(by)
                .bind(at)
                .execute(&mut *tx)
                .await?;
                self.room_version(tx, env, "").await?;
            }
            ChatEvent::InviteDeclined { user_id } => {
                sqlx::query("DELETE FROM proj_chat_members WHERE room_id = $1 AND user_id = $2 AND state = 'invited'")
                    .bind(stream_uuid(env)?)
                    .bind(user_id)
                    .execute(&mut *tx)
                    .await?;
                self.room_version(tx, env, "").await?;
            }
            ChatEvent::MemberJoined { user_id, role, .. } => {
                let room = stream_uuid(env)?;
                self.join(tx, room, user_id, role.as_str(), env).await?;
                self.room_version(tx, env, "").await?;
            }
            ChatEvent::MemberLeft { user_id } => self.depart(tx, env, user_id, "left").await?,
            ChatEvent::MemberKicked { user_id, .. } => {
                self.depart(tx, env, user_id, "kicked").await?
            }
            ChatEvent::MemberBanned { user_id, .. } => {
                self.depart(tx, env, user_id, "banned").await?
            }
            ChatEvent::MemberUnbanned { user_id } => {
                sqlx::query("UPDATE proj_chat_members SET state = 'left', since = $3, since_position = $4 WHERE room_id = $1 AND user_id = $2 AND state = 'banned'")
                    .bind(stream_uuid(env)?)
                    .bind(user_id)
                    .bind(at)
                    .bind(pos)
                    .execute(&mut *tx)
                    .await?;
                self.room_version(tx, env, "").await?;
            }
            ChatEvent::MemberRoleChanged { user_id, role } => {
                sqlx::query(
                    "UPDATE proj_chat_members SET role = $3 WHERE room_id = $1 AND user_id = $2",
                )
                .bind(stream_uuid(env)?)
                .bind(user_id)
                .bind(role.as_str())
                .execute(&mut *tx)
                .await?;
                self.room_version(tx, env, "").await?;
            }
            // Main-timeline posts usually arrive in runs and go through
            // `posts::apply_posts` instead: keep the two in step.
            ChatEvent::MessagePosted {
                message_id,
                room_id,
                sender,
                kind,
                body,
                attachment,
                thread_root,
                quote,
                mentions,
                mentions_assistant,
                client_message_id,
                sent_at,
                ..
            } => {
                sqlx::query(
                    "INSERT INTO proj_chat_messages (message_id, room_id, position, thread_root, sender, kind, body, attachment,
                        quote, mentions, mentions_assistant, client_message_id, sent_at, search_tokens)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
                )
                .bind(message_id)
                .bind(room_id)
                .bind(pos)
                .bind(thread_root)
                .bind(sender)
                .bind(kind.as_str())
                .bind(serde_json::to_value(&body)?)
                .bind(attachment.as_ref().map(serde_json::to_value).transpose()?)
                .bind(quote)
                .bind(&mentions)
                .bind(mentions_assistant)
                .bind(&client_message_id)
                .bind(sent_at)
                .bind(self.tokens(tx, room_id, message_id, &body).await?)
                .execute(&mut *tx)
                .await?;
                sqlx::query("UPDATE proj_chat_rooms SET last_position = $2 WHERE room_id = $1")
                    .bind(room_id)
                    .bind(pos)
                    .execute(&mut *tx)
                    .await?;
                match thread_root {
                    None => {
                        sqlx::query(
                            "UPDATE proj_chat_unread SET unread = unread + 1,
                                mentions = mentions + (user_id = ANY($3))::int
                             WHERE room_id = $1 AND thread_root = $4 AND user_id <> $2",
                        )
                        .bind(room_id)
                        .bind(sender)
                        .bind(&mentions)
                        .bind(MAIN)
                        .execute(&mut *tx)
                        .await?;
                    }
                    Some(root) => {
                        sqlx::query(
                            "UPDATE proj_chat_messages SET reply_count = reply_count + 1, latest_reply = $2,
                                latest_reply_position = $3 WHERE message_id = $1",
                        )
                        .bind(root)
                        .bind(message_id)
                        .bind(pos)
                        .execute(&mut *tx)
                        .await?;
                        // Every joined member (but the sender) gets a row for the thread the
                        // first time it grows after they joined; it counts from their join.
                        sqlx::query(
                            "INSERT INTO proj_chat_unread (user_id, room_id, thread_root, read_position, unread, mentions)
                             SELECT m.user_id, $1, $3, m.since_position, 1, (m.user_id = ANY($4))::int
                             FROM proj_chat_members m
                             WHERE m.room_id = $1 AND m.state = 'joined' AND m.user_id <> $2
                             ON CONFLICT (user_id, room_id, thread_root) DO UPDATE
                               SET unread = proj_chat_unread.unread + 1,
                                   mentions = proj_chat_unread.mentions + (proj_chat_unread.user_id = ANY($4))::int",
                        )
                        .bind(room_id)
                        .bind(sender)
                        .bind(root)
                        .bind(&mentions)
                        .execute(&mut *tx)
                        .await?;
                    }
                }
            }
            ChatEvent::MessageEdited { body, .. } => {
                let id = stream_uuid(env)?;
                let row = sqlx::query(
                    "SELECT room_id, body, edits FROM proj_chat_messages WHERE message_id = $1",
                )
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
                let Some(row) = row else { return Ok(()) };
                let (room, old, edits): (Uuid, Option<serde_json::Value>, i32) =
                    (row.get("room_id"), row.get("body"), row.get("edits"));
                if let Some(old) = old {
                    sqlx::query(
                        "INSERT INTO proj_chat_edits (message_id, edit_no, body, replaced_at) VALUES ($1, $2, $3, $4)
                         ON CONFLICT DO NOTHING",
                    )
                    .bind(id)
                    .bind(edits + 1)
                    .bind(old)
                    .bind(at)
                    .execute(&mut *tx)
                    .await?;
                }
                sqlx::query(
                    "UPDATE proj_chat_messages SET body = $2, edited_at = $3, edits = edits + 1, search_tokens = $4
                     WHERE message_id = $1",
                )
                .bind(id)
                .bind(serde_json::to_value(&body)?)
                .bind(at)
                .bind(self.tokens(tx, room, id, &body).await?)
                .execute(&mut *tx)
                .await?;
            }
            ChatEvent::MessageRedacted { .. } => self.redact(tx, env).await?,
            ChatEvent::ReactionAdded { user_id, emoji } => {
                self.react(tx, env, user_id, &emoji, true).await?
            }
            ChatEvent::ReactionRemoved { user_id, emoji } => {
                self.react(tx, env, user_id, &emoji, false).await?
            }
            ChatEvent::ReceiptMoved {
                room_id,
                thread_root,
                message_id,
            } => {
                let reader = stream_uuid(env)?;
                self.receipt(tx, reader, room_id, thread_root, message_id)
                    .await?
            }
            e @ (ChatEvent::MessageFlagged { .. }
            | ChatEvent::FlagCleared { .. }
            | ChatEvent::MemberMuted { .. }
            | ChatEvent::MemberUnmuted { .. }
            | ChatEvent::NotePinned { .. }
            | ChatEvent::NoteEdited { .. }
            | ChatEvent::NoteUnpinned { .. }) => moderation::apply(tx, env, e).await?,
        }
        Ok(())
    }

    /// Bump the room's version, with extra assignments (`"archived = true, "`).
    async fn room_version(
        &self,
        tx: &mut PgConnection,
        env: &EventEnvelope,
        set: &str,
    ) -> anyhow::Result<()> {
        // `set` is one of this module's constant fragments, never input.
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE proj_chat_rooms SET {set}version = $2 WHERE room_id = $1"
        )))
        .bind(stream_uuid(env)?)
        .bind(env.version)
        .execute(&mut *tx)
        .await?;
        Ok(())
    }

    async fn member_state(
        &self,
        tx: &mut PgConnection,
        room: Uuid,
        user: Uuid,
        state: &str,
        role: Option<&str>,
        env: &EventEnvelope,
    ) -> anyhow::Result<()> {
        sqlx::query(
            "INSERT INTO proj_chat_members (room_id, user_id, state, role, since, since_position)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (room_id, user_id) DO UPDATE SET state = $3, role = $4, since = $5, since_position = $6",
        )
        .bind(room)
        .bind(user)
        .bind(state)
        .bind(role)
        .bind(env.occurred_at)
        .bind(env.position)
        .execute(&mut *tx)
        .await?;
        Ok(())
    }

    async fn join(
        &self,
        tx: &mut PgConnection,
        room: Uuid,
        user: Uuid,
        role: &str,
        env: &EventEnvelope,
    ) -> anyhow::Result<()> {
        self.member_state(tx, room, user, "joined", Some(role), env)
            .await?;
        sqlx::query("DELETE FROM proj_chat_unread WHERE room_id = $1 AND user_id = $2")
            .bind(room)
            .bind(user)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO proj_chat_unread (user_id, room_id, thread_root, read_position, unread, mentions)
             VALUES ($1, $2, $3, $4, 0, 0)",
        )
        .bind(user)
        .bind(room)
        .bind(MAIN)
        .bind(env.position)
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM proj_chat_email_invites WHERE room_id = $1 AND email = (SELECT email FROM users WHERE user_id = $2)")
            .bind(room)
            .bind(user)
            .execute(&mut *tx)
            .await?;
        Ok(())
    }

    async fn depart(
        &self,
        tx: &mut PgConnection,
        env: &EventEnvelope,
        user: Uuid,
        state: &str,
    ) -> anyhow::Result<()> {
        let room = stream_uuid(env)?;
        self.member_state(tx, room, user, state, None, env).await?;
        sqlx::query("DELETE FROM proj_chat_unread WHERE room_id = $1 AND user_id = $2")
            .bind(room)
            .bind(user)
            .execute(&mut *tx)
            .await?;
        self.room_version(tx, env, "").await
    }

    /// The blind index of one message (`None`: nothing to index, or its key
    /// is gone: redacted or the room deleted since).
    async fn tokens(
        &self,
        tx: &mut PgConnection,
        room: Uuid,
        message: Uuid,
        body: &Sealed,
    ) -> anyhow::Result<Option<Vec<i64>>> {
        let keys = self.keystore.message_keys(tx, &[message]).await?;
        let (Some(key), Some(search)) = (
            keys.get(&message),
            self.keystore.search_key(tx, room).await?,
        ) else {
            return Ok(None);
        };
        Ok(sealed_tokens(&search, key, message, body))
    }

    async fn redact(&self, tx: &mut PgConnection, env: &EventEnvelope) -> anyhow::Result<()> {
        let id = stream_uuid(env)?;
        let row = sqlx::query(
            "UPDATE proj_chat_messages SET body = NULL, attachment = NULL, reactions = '{}', search_tokens = NULL, redacted_at = $2
             WHERE message_id = $1 AND redacted_at IS NULL
             RETURNING room_id, position, thread_root, sender, mentions",
        )
        .bind(id)
        .bind(env.occurred_at)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else { return Ok(()) };
        let (room, position, thread, sender, mentions): (Uuid, i64, Option<Uuid>, Uuid, Vec<Uuid>) = (
            row.get("room_id"),
            row.get("position"),
            row.get("thread_root"),
            row.get("sender"),
            row.get("mentions"),
        );
        sqlx::query("DELETE FROM proj_chat_edits WHERE message_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        // Whoever had not read it yet counted it: take it back.
        sqlx::query(
            "UPDATE proj_chat_unread SET unread = unread - 1, mentions = mentions - (user_id = ANY($5))::int
             WHERE room_id = $1 AND thread_root = $2 AND user_id <> $3 AND read_position < $4",
        )
        .bind(room)
        .bind(thread.unwrap_or(MAIN))
        .bind(sender)
        .bind(position)
        .bind(&mentions)
        .execute(&mut *tx)
        .await?;
        if let Some(root) = thread {
            // The summary counts the replies that are still there.
            sqlx::query(
                "UPDATE proj_chat_messages r SET reply_count = r.reply_count - 1,
                    latest_reply = l.message_id, latest_reply_position = l.position
                 FROM (SELECT max(position) AS position, (array_agg(message_id ORDER BY position DESC))[1] AS message_id
                       FROM proj_chat_messages WHERE thread_root = $1 AND redacted_at IS NULL) l
                 WHERE r.message_id = $1",
            )
            .bind(root)
            .execute(&mut *tx)
            .await?;
        }
        Ok(())
    }

    async fn react(
        &self,
        tx: &mut PgConnection,
        env: &EventEnvelope,
        user: Uuid,
        emoji: &str,
        add: bool,
    ) -> anyhow::Result<()> {
        let id = stream_uuid(env)?;
        let current: Option<serde_json::Value> = sqlx::query_scalar(
            "SELECT reactions FROM proj_chat_messages WHERE message_id = $1 FOR UPDATE",
        )
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(current) = current else {
            return Ok(());
        };
        let mut map: BTreeMap<String, Vec<Uuid>> =
            serde_json::from_value(current).unwrap_or_default();
        let users = map.entry(emoji.to_owned()).or_default();
        users.retain(|u| *u != user);
        if add {
            users.push(user);
            users.sort();
        }
        map.retain(|_, v| !v.is_empty());
        sqlx::query("UPDATE proj_chat_messages SET reactions = $2 WHERE message_id = $1")
            .bind(id)
            .bind(serde_json::to_value(&map)?)
            .execute(&mut *tx)
            .await?;
        Ok(())
    }

    async fn receipt(
        &self,
        tx: &mut PgConnection,
        reader: Uuid,
        room: Uuid,
        thread: Option<Uuid>,
        message: Uuid,
    ) -> anyhow::Result<()> {
        let position: Option<i64> =
            sqlx::query_scalar("SELECT position FROM proj_chat_messages WHERE message_id = $1")
                .bind(message)
                .fetch_optional(&mut *tx)
                .await?;
        let Some(position) = position else {
            return Ok(());
        };
        let timeline = thread.unwrap_or(MAIN);
        // Thread rows may not exist yet (no reply since the reader joined).
        sqlx::query(
            "INSERT INTO proj_chat_unread (user_id, room_id, thread_root, read_position, unread, mentions)
             SELECT $1, $2, $3, m.since_position, 0, 0 FROM proj_chat_members m
             WHERE m.room_id = $2 AND m.user_id = $1 AND m.state = 'joined'
             ON CONFLICT DO NOTHING",
        )
        .bind(reader)
        .bind(room)
        .bind(timeline)
        .execute(&mut *tx)
        .await?;
        // Receipts only move forward; then count what is left.
        let Some(read) = sqlx::query_scalar::<_, i64>(
            "SELECT GREATEST(read_position, $4) FROM proj_chat_unread
             WHERE user_id = $1 AND room_id = $2 AND thread_root = $3 FOR UPDATE",
        )
        .bind(reader)
        .bind(room)
        .bind(timeline)
        .bind(position)
        .fetch_optional(&mut *tx)
        .await?
        else {
            return Ok(()); // not a member any more
        };
        let filter = if thread.is_some() {
            "m.thread_root = $2"
        } else {
            "m.room_id = $2 AND m.thread_root IS NULL"
        };
        let counts = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT count(*)::int AS unread, count(*) FILTER (WHERE $1 = ANY(m.mentions))::int AS mentions
             FROM proj_chat_messages m
             WHERE {filter} AND m.position > $3 AND m.sender <> $1 AND m.redacted_at IS NULL"
        )))
        .bind(reader)
        .bind(if thread.is_some() { timeline } else { room })
        .bind(read)
        .fetch_one(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE proj_chat_unread SET read_position = $4, unread = $5, mentions = $6
             WHERE user_id = $1 AND room_id = $2 AND thread_root = $3",
        )
        .bind(reader)
        .bind(room)
        .bind(timeline)
        .bind(read)
        .bind(counts.get::<i32, _>("unread"))
        .bind(counts.get::<i32, _>("mentions"))
        .execute(&mut *tx)
        .await?;
        Ok(())
    }
}
