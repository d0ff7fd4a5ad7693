//! Projector `reminders`: reminders (`proj_reminders`, which is also the
//! scheduler's due work) and notification inboxes (`proj_notifications`).

use events::notify::NotifyEvent;
use events::reminder::ReminderEvent;
use events::{Event, EventEnvelope};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::Projector;

/// Projector `reminders`.
#[derive(Debug, Clone, Copy, Default)]
pub struct RemindersProjector;

/// A unit enum's serde name (`daily`, `high`): what the read models store.
pub(crate) fn snake<T: serde::Serialize>(v: &T) -> anyhow::Result<String> {
    Ok(serde_json::to_value(v)?
        .as_str()
        .unwrap_or_default()
        .to_owned())
}

impl Projector for RemindersProjector {
    fn name(&self) -> &'static str {
        "reminders"
    }

    fn domains(&self) -> &'static [&'static str] {
        &[events::reminder::DOMAIN, events::notify::DOMAIN]
    }

    fn tables(&self) -> &'static [&'static str] {
        &["proj_reminders", "proj_notifications"]
    }

    async fn apply(&self, tx: &mut PgConnection, batch: &[EventEnvelope]) -> anyhow::Result<()> {
        for env in batch {
            let id: Uuid = env.stream_id.id().parse()?;
            match env.event()? {
                Event::Reminder(e) => reminder(tx, env, id, e).await?,
                Event::Notify(e) => notify(tx, env, id, e).await?,
                _ => {}
            }
        }
        Ok(())
    }
}

async fn reminder(
    tx: &mut PgConnection,
    env: &EventEnvelope,
    id: Uuid,
    e: ReminderEvent,
) -> anyhow::Result<()> {
    let (pos, ver) = (env.position, env.version);
    match e {
        ReminderEvent::ReminderSet {
            owner,
            content,
            due_at,
            local,
            zone,
            recurrence,
            priority,
            room_id,
            ..
        } => {
            sqlx::query(
                "INSERT INTO proj_reminders (reminder_id, owner, content, next_due_at, local, zone, recurrence,
                    priority, room_id, status, created_at, version, position)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 'active', $10, $11, $12)",
            )
            .bind(id)
            .bind(owner)
            .bind(content)
            .bind(due_at)
            .bind(local)
            .bind(zone)
            .bind(snake(&recurrence)?)
            .bind(snake(&priority)?)
            .bind(room_id)
            .bind(env.occurred_at)
            .bind(ver)
            .bind(pos)
            .execute(&mut *tx)
            .await?;
        }
        ReminderEvent::ReminderEdited {
            content,
            due_at,
            local,
            priority,
        } => {
            sqlx::query(
                "UPDATE proj_reminders SET content = COALESCE($2, content), next_due_at = COALESCE($3, next_due_at),
                    local = COALESCE($4, local), priority = COALESCE($5, priority), version = $6, position = $7
                 WHERE reminder_id = $1",
            )
            .bind(id)
            .bind(content)
            .bind(due_at)
            .bind(local)
            .bind(priority.map(|p| snake(&p)).transpose()?)
            .bind(ver)
            .bind(pos)
            .execute(&mut *tx)
            .await?;
        }
        ReminderEvent::ReminderSnoozed { due_at } => {
            sqlx::query(
                "UPDATE proj_reminders SET next_due_at = $2, status = 'active', version = $3, position = $4
                 WHERE reminder_id = $1",
            )
            .bind(id)
            .bind(due_at)
            .bind(ver)
            .bind(pos)
            .execute(&mut *tx)
            .await?;
        }
        ReminderEvent::ReminderCancelled => {
            sqlx::query(
                "UPDATE proj_reminders SET next_due_at = NULL, status = 'cancelled', version = $2, position = $3
                 WHERE reminder_id = $1",
            )
            .bind(id)
            .bind(ver)
            .bind(pos)
            .execute(&mut *tx)
            .await?;
        }
        ReminderEvent::ReminderFired {
            fired_at,
            next_due_at,
            next_local,
            ..
        } => {
            sqlx::query(
                "UPDATE proj_reminders SET fired = fired + 1, last_fired_at = $2, next_due_at = $3,
                    local = COALESCE($6, local),
                    status = CASE WHEN $3::timestamptz IS NULL THEN 'done' ELSE 'active' END,
                    version = $4, position = $5
                 WHERE reminder_id = $1",
            )
            .bind(id)
            .bind(fired_at)
            .bind(next_due_at)
            .bind(ver)
            .bind(pos)
            .bind(next_local)
            .execute(&mut *tx)
            .await?;
        }
    }
    Ok(())
}

async fn notify(
    tx: &mut PgConnection,
    env: &EventEnvelope,
    user: Uuid,
    e: NotifyEvent,
) -> anyhow::Result<()> {
    match e {
        NotifyEvent::NotificationCreated {
            notification_id,
            category,
            title,
            body,
            link,
        } => {
            sqlx::query(
                "INSERT INTO proj_notifications (notification_id, user_id, category, title, body, link, created_at, position)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING",
            )
            .bind(notification_id)
            .bind(user)
            .bind(snake(&category)?)
            .bind(title)
            .bind(body)
            .bind(link)
            .bind(env.occurred_at)
            .bind(env.position)
            .execute(&mut *tx)
            .await?;
        }
        NotifyEvent::NotificationsRead { ids, all } => {
            sqlx::query(
                "UPDATE proj_notifications SET read_at = $3
                 WHERE user_id = $1 AND read_at IS NULL AND ($4 OR notification_id = ANY($2)) AND position < $5",
            )
            .bind(user)
            .bind(&ids)
            .bind(env.occurred_at)
            .bind(all)
            .bind(env.position)
            .execute(&mut *tx)
            .await?;
        }
    }
    Ok(())
}
