//! Flags, mutes and notes in the chat read model (`proj_chat_flags`,
//! `proj_chat_mutes`, `proj_chat_notes`). Every statement is keyed so that the
//! rows depend only on the events, which keeps a rebuild identical.

use events::EventEnvelope;
use events::chat::{ChatEvent, FlagSource};
use sqlx::PgConnection;

use super::stream_uuid;

/// Apply one moderation or note event of a room stream.
pub(super) async fn apply(
    tx: &mut PgConnection,
    env: &EventEnvelope,
    event: ChatEvent,
) -> anyhow::Result<()> {
    let room = stream_uuid(env)?;
    let (at, pos) = (env.occurred_at, env.position);
    match event {
        ChatEvent::MessageFlagged {
            message_id,
            sender,
            source,
            reason,
            score,
            ..
        } => {
            let (label, report) = match source {
                FlagSource::Classifier => (Some(reason), None),
                FlagSource::Report => (None, Some(reason)),
            };
            sqlx::query(
                "INSERT INTO proj_chat_flags (message_id, room_id, sender, classifier_label, classifier_score,
                    reports, report_reasons, first_flagged_at, last_flagged_at, position)
                 VALUES ($1, $2, $3, $4, $5, ($6::text IS NOT NULL)::int,
                    CASE WHEN $6::text IS NULL THEN '{}'::text[] ELSE ARRAY[$6::text] END, $7, $7, $8)
                 ON CONFLICT (message_id) DO UPDATE SET
                    classifier_label = COALESCE(EXCLUDED.classifier_label, proj_chat_flags.classifier_label),
                    classifier_score = COALESCE(EXCLUDED.classifier_score, proj_chat_flags.classifier_score),
                    reports = proj_chat_flags.reports + EXCLUDED.reports,
                    report_reasons = proj_chat_flags.report_reasons || EXCLUDED.report_reasons,
                    last_flagged_at = EXCLUDED.last_flagged_at,
                    position = EXCLUDED.position",
            )
            .bind(message_id)
            .bind(room)
            .bind(sender)
            .bind(label)
            .bind(score.map(|s| s as i16))
            .bind(report)
            .bind(at)
            .bind(pos)
            .execute(&mut *tx)
            .await?;
        }
        ChatEvent::FlagCleared { message_id, .. } => {
            sqlx::query("DELETE FROM proj_chat_flags WHERE message_id = $1")
                .bind(message_id)
                .execute(&mut *tx)
                .await?;
        }
        ChatEvent::MemberMuted {
            user_id,
            until,
            by,
            reason,
        } => {
            sqlx::query(
                "INSERT INTO proj_chat_mutes (room_id, user_id, until, reason, muted_by)
                 VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (room_id, user_id) DO UPDATE
                   SET until = EXCLUDED.until, reason = EXCLUDED.reason, muted_by = EXCLUDED.muted_by",
            )
            .bind(room)
            .bind(user_id)
            .bind(until)
            .bind(reason)
            .bind(by)
            .execute(&mut *tx)
            .await?;
        }
        ChatEvent::MemberUnmuted { user_id, .. } => {
            sqlx::query("DELETE FROM proj_chat_mutes WHERE room_id = $1 AND user_id = $2")
                .bind(room)
                .bind(user_id)
                .execute(&mut *tx)
                .await?;
        }
        ChatEvent::NotePinned {
            note_id,
            author,
            priority,
            body,
            key_version,
        } => {
            sqlx::query(
                "INSERT INTO proj_chat_notes (note_id, room_id, author, priority, body, key_version,
                    created_at, updated_at, position)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $7, $8)",
            )
            .bind(note_id)
            .bind(room)
            .bind(author)
            .bind(priority.as_str())
            .bind(serde_json::to_value(&body)?)
            .bind(key_version)
            .bind(at)
            .bind(pos)
            .execute(&mut *tx)
            .await?;
        }
        ChatEvent::NoteEdited {
            note_id,
            body,
            priority,
            ..
        } => {
            sqlx::query(
                "UPDATE proj_chat_notes SET body = COALESCE($2, body), priority = COALESCE($3, priority),
                    updated_at = $4 WHERE note_id = $1",
            )
            .bind(note_id)
            .bind(body.as_ref().map(serde_json::to_value).transpose()?)
            .bind(priority.map(|p| p.as_str()))
            .bind(at)
            .execute(&mut *tx)
            .await?;
        }
        ChatEvent::NoteUnpinned { note_id, .. } => {
            sqlx::query("DELETE FROM proj_chat_notes WHERE note_id = $1")
                .bind(note_id)
                .execute(&mut *tx)
                .await?;
        }
        _ => {}
    }
    Ok(())
}
