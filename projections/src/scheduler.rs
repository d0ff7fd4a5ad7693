//! The scheduler role: fires due work. Due work is state derived from events
//! (`proj_reminders.next_due_at`, kept by projector `reminders`; overdue
//! invoices and recurring invoice runs, kept by projector `wallet`); firing is
//! a command like any other (`reminder.FireReminder`, `invoice.MarkOverdue`,
//! `invoice.RunSchedule`, from the system actor).
//!
//! Exactly once, with any number of schedulers and restarts: the command names
//! the occurrence it fires and its id is derived from (reminder, occurrence), so
//! two schedulers publishing the same occurrence are one command to JetStream
//! (inside its duplicate window) and to the command ledger (forever), and the
//! aggregate refuses an occurrence that is not its next one. Nothing is held
//! between ticks but a memory of what was just published, to avoid publishing
//! it again while the read model catches up.
//!
//! A reminder aimed at a room also posts its text there as a chat message from
//! its owner, sealed like any message, with the owner's authority (if they
//! left the room, the post is refused and the notification remains).

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use commands::chat::ChatCommand;
use commands::reminder::ReminderCommand;
use commands::{Actor, Command, Role, crypto};
use events::Subjects;
use events::chat::{Bytes64, MessageKind};
use handlers::bus::{self, CommandEnvelope};
use handlers::keystore::Keystore;
use sha2::{Digest, Sha256};
use sqlx::{PgPool, Row};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const FIRE_NS: Uuid = Uuid::from_u128(0x6d61_7468_6961_5f66_6972_6500_0000_0001);
const POST_NS: Uuid = Uuid::from_u128(0x6d61_7468_6961_5f70_6f73_7400_0000_0001);

/// The id of the command firing `reminder`'s occurrence at `due_at`.
pub fn fire_command_id(reminder: Uuid, due_at: DateTime<Utc>) -> Uuid {
    Uuid::new_v5(
        &FIRE_NS,
        format!("{reminder}|{}", due_at.timestamp_micros()).as_bytes(),
    )
}

/// What the scheduler needs.
pub struct Scheduler {
    /// Read models (due work) and the keystore.
    pub pool: PgPool,
    /// Where commands go.
    pub js: async_nats::jetstream::Context,
    /// Names.
    pub subjects: Subjects,
    /// Seals room posts.
    pub keystore: Keystore,
    /// How often it looks.
    pub tick: Duration,
}

fn hash(parts: &str) -> String {
    Sha256::digest(parts.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl Scheduler {
    /// Fire due work until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        tracing::info!(tick_ms = self.tick.as_millis() as u64, "scheduler started");
        let mut published: HashMap<Uuid, (DateTime<Utc>, std::time::Instant)> = HashMap::new();
        while !shutdown.is_cancelled() {
            if let Err(e) = self.fire_due(&mut published).await {
                tracing::warn!(error = format!("{e:#}"), "firing due work failed; retrying");
            }
            // Forget what was published long ago: if it is still due, it was lost; send it again.
            published.retain(|_, (_, at)| at.elapsed() < Duration::from_secs(10));
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(self.tick) => {}
            }
        }
        Ok(())
    }

    /// One look: publish a fire command for every occurrence that is due.
    pub async fn fire_due(
        &self,
        published: &mut HashMap<Uuid, (DateTime<Utc>, std::time::Instant)>,
    ) -> anyhow::Result<usize> {
        let rows = sqlx::query(
            "SELECT reminder_id, owner, content, next_due_at, room_id FROM proj_reminders
             WHERE status = 'active' AND next_due_at <= now() ORDER BY next_due_at LIMIT 2000",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut acks = vec![];
        for r in &rows {
            let id: Uuid = r.get("reminder_id");
            let due: DateTime<Utc> = r.get("next_due_at");
            if published.get(&id).is_some_and(|(d, _)| *d == due) {
                continue;
            }
            let content: String = r.get("content");
            let command_id = fire_command_id(id, due);
            let envelope = CommandEnvelope {
                command_id,
                correlation_id: command_id,
                actor: Actor {
                    user_id: None,
                    role: Role::System,
                },
                issued_at: Utc::now(),
                request_hash: hash(&format!("fire|{id}|{}", due.timestamp_micros())),
                command: Command::Reminder(ReminderCommand::FireReminder {
                    reminder_id: id,
                    due_at: due,
                    now: Utc::now(),
                    content: content.clone(),
                    owner: r.get("owner"),
                }),
                expected_version: None,
            };
            acks.push(self.publish(envelope));
            if let Some(room) = r.get::<Option<Uuid>, _>("room_id") {
                acks.push(
                    self.publish(
                        self.room_post(id, due, r.get("owner"), room, &content)
                            .await?,
                    ),
                );
            }
            published.insert(id, (due, std::time::Instant::now()));
        }
        // Invoices: overdue marks and recurring runs (see `crate::invoice::due_work`).
        let now = Utc::now();
        for envelope in crate::invoice::due_work(&self.pool, now).await? {
            let id = envelope.command_id;
            if published.contains_key(&id) {
                continue;
            }
            acks.push(self.publish(envelope));
            published.insert(id, (now, std::time::Instant::now()));
        }
        let n = acks.len();
        for a in futures::future::join_all(acks).await {
            a?;
        }
        if n > 0 {
            metrics::counter!("mathia_scheduler_fired_total").increment(n as u64);
        }
        Ok(n)
    }

    async fn publish(&self, envelope: CommandEnvelope) -> anyhow::Result<()> {
        let reply = format!(
            "{}.{}",
            self.subjects.outcome_inbox("scheduler"),
            envelope.command_id
        );
        bus::publish_command(&self.js, &self.subjects, &envelope, &reply).await?;
        Ok(())
    }

    async fn room_post(
        &self,
        reminder: Uuid,
        due: DateTime<Utc>,
        owner: Uuid,
        room: Uuid,
        content: &str,
    ) -> anyhow::Result<CommandEnvelope> {
        let message_id = Uuid::new_v5(
            &POST_NS,
            format!("{reminder}|{}", due.timestamp_micros()).as_bytes(),
        );
        let keys = self
            .keystore
            .room_keys(&self.pool, room)
            .await?
            .ok_or_else(|| anyhow::anyhow!("the reminder's room has no keys"))?;
        let (key, wrapped) = handlers::keystore::new_message_key(&keys.current, message_id);
        let text = format!("⏰ Reminder: {content}");
        let body = crypto::seal(
            &key,
            &crypto::field_aad(message_id, "body"),
            text.as_bytes(),
        );
        Ok(CommandEnvelope {
            command_id: message_id,
            correlation_id: fire_command_id(reminder, due),
            // The owner's own authority: a reminder can only say what they could.
            actor: Actor {
                user_id: Some(owner),
                role: Role::User,
            },
            issued_at: Utc::now(),
            request_hash: hash(&format!("post|{reminder}|{}", due.timestamp_micros())),
            command: Command::Chat(ChatCommand::SendMessage {
                message_id,
                room_id: room,
                kind: MessageKind::Text,
                body,
                attachment: None,
                thread_root: None,
                quote: None,
                mentions: vec![],
                mentions_assistant: false,
                client_message_id: None,
                key_version: keys.version,
                message_key: Bytes64(wrapped),
                sent_at: Utc::now(),
            }),
            expected_version: None,
        })
    }
}
