//! Moderation screening: every posted message is judged by a [`Classifier`]
//! in batches, and a flagged one becomes a `chat.FlagMessage` command.
//!
//! Two parts, so that screening is state derived from events and flagging is a
//! command like any other:
//! - [`ScreenQueue`], projector `screen`: each `MessagePosted` adds a row to
//!   `chat_screen_queue` (with the body as sealed in the event); a redaction
//!   removes it. Its checkpoint is its own, so rebuilding the chat read model
//!   never screens anything again.
//! - [`Screener`]: claims whole batches of `batch` rows, up to ten at a time
//!   (`FOR UPDATE SKIP LOCKED`, so several screeners share the queue), and a
//!   last partial batch only once its oldest row has waited `flush`; opens the
//!   bodies with the keystore, asks the classifier (one call per batch),
//!   publishes one command per flagged message, and deletes the rows
//!   in the same transaction that held the claim. The command id is derived
//!   from the message and the position of the version judged, so a screener
//!   that dies after publishing and screens the batch again is answered from the
//!   command ledger: one flag per version. An edit queues the message again
//!   (`chat_screen_rooms` remembers its room), so editing a harmless post into
//!   an abusive one is screened too.
//!
//! A classifier that fails leaves the rows queued and is retried with backoff:
//! chat keeps flowing, screening catches up.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use commands::chat::ChatCommand;
use commands::{Actor, Command, Role, crypto};
use events::chat::{ChatEvent, Sealed};
use events::{Event, EventEnvelope, Subjects};
use handlers::bus::{self, CommandEnvelope, Published};
use handlers::keystore::Keystore;
use sha2::{Digest, Sha256};
use sqlx::{PgConnection, PgPool, Row};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::Projector;
use crate::classifier::Classifier;

/// Projector `screen`: the queue of messages waiting to be screened.
#[derive(Debug, Clone, Copy, Default)]
pub struct ScreenQueue;

/// A run of posts for the queue, written with one statement per table.
#[derive(Default)]
struct Posts {
    id: Vec<Uuid>,
    room: Vec<Uuid>,
    position: Vec<i64>,
    body: Vec<serde_json::Value>,
    at: Vec<chrono::DateTime<chrono::Utc>>,
}

impl Posts {
    async fn write(&mut self, tx: &mut PgConnection) -> anyhow::Result<()> {
        if self.id.is_empty() {
            return Ok(());
        }
        sqlx::query(
            "INSERT INTO chat_screen_queue (message_id, room_id, position, body, queued_at)
             SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::bigint[], $4::jsonb[], $5::timestamptz[])
             ON CONFLICT DO NOTHING",
        )
        .bind(&self.id)
        .bind(&self.room)
        .bind(&self.position)
        .bind(&self.body)
        .bind(&self.at)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO chat_screen_rooms (message_id, room_id)
             SELECT * FROM UNNEST($1::uuid[], $2::uuid[]) ON CONFLICT DO NOTHING",
        )
        .bind(&self.id)
        .bind(&self.room)
        .execute(&mut *tx)
        .await?;
        *self = Posts::default();
        Ok(())
    }
}

impl Projector for ScreenQueue {
    fn name(&self) -> &'static str {
        "screen"
    }

    fn domains(&self) -> &'static [&'static str] {
        &[events::chat::DOMAIN]
    }

    async fn apply(&self, tx: &mut PgConnection, batch: &[EventEnvelope]) -> anyhow::Result<()> {
        // Runs of posts go in with one statement per table; anything else that
        // touches the queue first writes the run before it.
        let mut posts = Posts::default();
        for env in batch {
            let event = env.event()?;
            if matches!(
                event,
                Event::Chat(
                    ChatEvent::MessageEdited { .. }
                        | ChatEvent::MessageRedacted { .. }
                        | ChatEvent::RoomDeleted
                )
            ) {
                posts.write(tx).await?;
            }
            match event {
                Event::Chat(ChatEvent::MessagePosted {
                    message_id,
                    room_id,
                    body,
                    ..
                }) => {
                    posts.id.push(message_id);
                    posts.room.push(room_id);
                    posts.position.push(env.position);
                    posts.body.push(serde_json::to_value(&body)?);
                    posts.at.push(env.occurred_at);
                }
                // An edit is screened like a new post: posting something harmless
                // and editing it afterwards must not slip past moderation.
                Event::Chat(ChatEvent::MessageEdited { body, .. }) => {
                    let id: Uuid = env.stream_id.id().parse()?;
                    sqlx::query(
                        "INSERT INTO chat_screen_queue (message_id, room_id, position, body, queued_at)
                         SELECT $1, room_id, $2, $3, $4 FROM chat_screen_rooms WHERE message_id = $1
                         ON CONFLICT (message_id) DO UPDATE
                           SET position = EXCLUDED.position, body = EXCLUDED.body",
                    )
                    .bind(id)
                    .bind(env.position)
                    .bind(serde_json::to_value(&body)?)
                    .bind(env.occurred_at)
                    .execute(&mut *tx)
                    .await?;
                }
                Event::Chat(ChatEvent::MessageRedacted { .. }) => {
                    let id: Uuid = env.stream_id.id().parse()?;
                    for forget in [
                        "DELETE FROM chat_screen_queue WHERE message_id = $1",
                        "DELETE FROM chat_screen_rooms WHERE message_id = $1",
                    ] {
                        sqlx::query(forget).bind(id).execute(&mut *tx).await?;
                    }
                }
                Event::Chat(ChatEvent::RoomDeleted) => {
                    let room: Uuid = env.stream_id.id().parse()?;
                    for forget in [
                        "DELETE FROM chat_screen_queue WHERE room_id = $1",
                        "DELETE FROM chat_screen_rooms WHERE room_id = $1",
                    ] {
                        sqlx::query(forget).bind(room).execute(&mut *tx).await?;
                    }
                }
                _ => {}
            }
        }
        posts.write(tx).await
    }
}

/// Tuning of the screener (SPEC §2: batches of 10, flushed within 5 s, 3 flags mute).
#[derive(Debug, Clone)]
pub struct ScreenConfig {
    /// Most messages per classifier call.
    pub batch: i64,
    /// Longest a message waits for its batch to fill.
    pub flush: Duration,
    /// Classifier flags that mute the sender in that room (0: never).
    pub mute_after: u32,
    /// How long such a mute lasts.
    pub mute_for: Duration,
    /// How often an idle screener looks at the queue.
    pub poll: Duration,
}

impl Default for ScreenConfig {
    fn default() -> Self {
        ScreenConfig {
            batch: 10,
            flush: Duration::from_secs(5),
            mute_after: 3,
            mute_for: Duration::from_secs(3600),
            poll: Duration::from_millis(200),
        }
    }
}

/// The screening worker.
pub struct Screener {
    /// Queue and keystore.
    pub pool: PgPool,
    /// Where flags are published.
    pub js: async_nats::jetstream::Context,
    /// Subject and stream names.
    pub subjects: Subjects,
    /// Opens the bodies.
    pub keystore: Keystore,
    /// Judges them.
    pub classifier: Arc<dyn Classifier>,
    /// Tuning.
    pub config: ScreenConfig,
}

/// Most screening batches claimed in one transaction.
const CLAIM: i64 = 10;

const SCREEN_NS: Uuid = Uuid::from_u128(0x6d61_7468_6961_5f73_6372_6565_6e00_0001);

/// The id of the flag command for the version of `message` that the event at
/// `position` posted or edited: the same every time that version is screened.
pub fn flag_command_id(message: Uuid, position: i64) -> Uuid {
    Uuid::new_v5(&SCREEN_NS, format!("{message}|{position}").as_bytes())
}

impl Screener {
    /// Screen until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        tracing::info!(
            batch = self.config.batch,
            flush_ms = self.config.flush.as_millis() as u64,
            "screener started"
        );
        let mut backoff = Duration::from_millis(500);
        while !shutdown.is_cancelled() {
            let wait = match self.screen_once().await {
                Ok(n) if n > 0 => {
                    backoff = Duration::from_millis(500);
                    continue;
                }
                Ok(_) => self.config.poll,
                Err(e) => {
                    tracing::warn!(error = format!("{e:#}"), "screening failed; retrying");
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    backoff
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(wait) => {}
            }
        }
        Ok(())
    }

    /// Screen one batch if one is due; returns how many messages it screened.
    pub async fn screen_once(&self) -> anyhow::Result<usize> {
        // Derived state: a lost commit screens the batch again, and its flag
        // commands have the same ids (`flag_command_id`), so the ledger dedups them.
        let mut tx = crate::runner::begin_derived(&self.pool).await?;
        // Up to CLAIM batches in one transaction (one claim, one key read, one
        // delete); the classifier still judges `batch` texts per call.
        let batch = self.config.batch.max(1);
        let mut rows = sqlx::query(
            "SELECT message_id, room_id, position, body, queued_at FROM chat_screen_queue
             ORDER BY position LIMIT $1 FOR UPDATE SKIP LOCKED",
        )
        .bind(batch * CLAIM)
        .fetch_all(&mut *tx)
        .await?;
        // Whole batches, and the rest only once its oldest row has waited `flush`.
        let whole = rows.len() - rows.len() % batch as usize;
        let flush = chrono::Duration::from_std(self.config.flush)?;
        let rest_due = rows
            .get(whole)
            .is_some_and(|r| Utc::now() - r.get::<chrono::DateTime<Utc>, _>("queued_at") >= flush);
        if !rest_due {
            rows.truncate(whole);
        }
        if rows.is_empty() {
            return Ok(0);
        }
        let ids: Vec<Uuid> = rows.iter().map(|r| r.get("message_id")).collect();
        let keys = self.keystore.message_keys(&mut tx, &ids).await?;
        // A message without a key was redacted meanwhile: nothing to judge.
        let mut judged = Vec::with_capacity(rows.len());
        let mut texts = Vec::with_capacity(rows.len());
        for r in &rows {
            let id: Uuid = r.get("message_id");
            let sealed: Sealed = serde_json::from_value(r.get("body"))?;
            if let Some(text) = keys
                .get(&id)
                .and_then(|k| crypto::open(k, &crypto::field_aad(id, "body"), &sealed).ok())
            {
                judged.push((id, r.get::<Uuid, _>("room_id"), r.get::<i64, _>("position")));
                texts.push(String::from_utf8_lossy(&text).into_owned());
            }
        }
        let verdicts: Vec<_> =
            futures::future::try_join_all(texts.chunks(batch as usize).map(|chunk| async move {
                let verdicts = self.classifier.classify(chunk).await?;
                anyhow::ensure!(
                    verdicts.len() == chunk.len(),
                    "the classifier judged {} of {} texts",
                    verdicts.len(),
                    chunk.len()
                );
                Ok(verdicts)
            }))
            .await?
            .into_iter()
            .flatten()
            .collect();
        drop(texts);
        let mut flagged = 0;
        for ((message_id, room_id, position), v) in judged.into_iter().zip(verdicts) {
            if !v.flagged {
                continue;
            }
            flagged += 1;
            self.flag(room_id, message_id, position, v.label, v.score)
                .await?;
        }
        sqlx::query("DELETE FROM chat_screen_queue WHERE message_id = ANY($1)")
            .bind(&ids)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        metrics::counter!("mathia_moderation_screened_total").increment(ids.len() as u64);
        metrics::counter!("mathia_moderation_flagged_total").increment(flagged);
        tracing::debug!(screened = ids.len(), flagged, "screened a batch");
        Ok(ids.len())
    }

    async fn flag(
        &self,
        room_id: Uuid,
        message_id: Uuid,
        position: i64,
        label: String,
        score: u16,
    ) -> anyhow::Result<()> {
        let command_id = flag_command_id(message_id, position);
        let hash =
            Sha256::digest(format!("screen|{message_id}|{position}|{label}|{score}").as_bytes());
        let envelope = CommandEnvelope {
            command_id,
            correlation_id: command_id,
            actor: Actor {
                user_id: None,
                role: Role::System,
            },
            issued_at: Utc::now(),
            request_hash: hash.iter().map(|b| format!("{b:02x}")).collect(),
            command: Command::Chat(ChatCommand::FlagMessage {
                room_id,
                message_id,
                label,
                score,
                mute_after: self.config.mute_after,
                mute_for_secs: self.config.mute_for.as_secs() as i64,
                at: Utc::now(),
            }),
            expected_version: None,
        };
        match bus::publish_command(
            &self.js,
            &self.subjects,
            &envelope,
            &format!("{}.{command_id}", self.subjects.outcome_inbox("screener")),
        )
        .await?
        {
            Published::Stored { .. } => Ok(()),
            // Not known to be stored: keep the batch queued; the same id makes a retry safe.
            Published::Unknown => anyhow::bail!("COMMANDS did not acknowledge a flag"),
        }
    }
}
