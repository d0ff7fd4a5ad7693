//! Invoice read models: `proj_invoices`, `proj_invoice_payments` and
//! `proj_invoice_schedules`. Applied by projector `wallet` (see
//! [`crate::wallet::WalletProjector`]): a payment's ledger legs and its
//! invoice row then move one checkpoint together, so a read that waits for
//! a payment's position sees both.

use events::EventEnvelope;
use events::invoice::InvoiceEvent;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::reminder::snake;

/// Apply one invoice-domain event.
pub async fn apply(
    tx: &mut PgConnection,
    env: &EventEnvelope,
    e: InvoiceEvent,
) -> anyhow::Result<()> {
    let id: Uuid = env.stream_id.id().parse()?;
    let (pos, ver) = (env.position, env.version);
    // Every invoice event but the counter's moves the invoice's version.
    let bump = |sql: &'static str| sqlx::query(sql).bind(id).bind(ver).bind(pos);
    match e {
        InvoiceEvent::InvoiceDrafted {
            invoice_id,
            issuer,
            client,
            currency,
            lines,
            total,
            due_at,
            memo,
            schedule_id,
        } => {
            sqlx::query(
                "INSERT INTO proj_invoices (invoice_id, issuer, client_user, client_email, client_name, currency,
                    lines, total, due_at, memo, status, schedule_id, created_at, version, position)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 'draft', $11, $12, $13, $14)
                 ON CONFLICT (invoice_id) DO NOTHING",
            )
            .bind(invoice_id)
            .bind(issuer)
            .bind(client.user_id)
            .bind(client.email)
            .bind(client.name)
            .bind(currency)
            .bind(serde_json::to_value(&lines)?)
            .bind(total)
            .bind(due_at)
            .bind(memo)
            .bind(schedule_id)
            .bind(env.occurred_at)
            .bind(ver)
            .bind(pos)
            .execute(&mut *tx)
            .await?;
        }
        InvoiceEvent::InvoiceSent {
            number,
            year,
            seq,
            at,
        } => {
            bump(
                "UPDATE proj_invoices SET status = 'sent', number = $4, year = $5, seq = $6, sent_at = $7,
                    version = $2, position = $3 WHERE invoice_id = $1",
            )
            .bind(number)
            .bind(year)
            .bind(seq)
            .bind(at)
            .execute(&mut *tx)
            .await?;
        }
        InvoiceEvent::InvoicePaymentReceived {
            payment_id,
            payer,
            amount,
            paid,
            via_link,
            at,
            ..
        } => {
            bump("UPDATE proj_invoices SET amount_paid = $4, version = $2, position = $3 WHERE invoice_id = $1")
                .bind(paid)
                .execute(&mut *tx)
                .await?;
            sqlx::query(
                "INSERT INTO proj_invoice_payments (payment_id, invoice_id, payer, amount, via_link, paid_at, position)
                 VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (payment_id) DO NOTHING",
            )
            .bind(payment_id)
            .bind(id)
            .bind(payer)
            .bind(amount)
            .bind(via_link)
            .bind(at)
            .bind(pos)
            .execute(&mut *tx)
            .await?;
        }
        InvoiceEvent::InvoicePaid { at } => {
            bump("UPDATE proj_invoices SET status = 'paid', paid_at = $4, version = $2, position = $3 WHERE invoice_id = $1")
                .bind(at)
                .execute(&mut *tx)
                .await?;
        }
        InvoiceEvent::InvoiceOverdue { at } => {
            bump("UPDATE proj_invoices SET status = 'overdue', overdue_at = $4, version = $2, position = $3 WHERE invoice_id = $1")
                .bind(at)
                .execute(&mut *tx)
                .await?;
        }
        InvoiceEvent::InvoiceVoided { reason, at } => {
            bump(
                "UPDATE proj_invoices SET status = 'void', voided_at = $4, void_reason = $5, version = $2, position = $3
                 WHERE invoice_id = $1",
            )
            .bind(at)
            .bind(reason)
            .execute(&mut *tx)
            .await?;
        }
        // The counter is decision state only; the numbers are on the invoices.
        InvoiceEvent::InvoiceNumberAssigned { .. } => {}
        InvoiceEvent::InvoiceScheduleCreated {
            schedule_id,
            issuer,
            template,
            interval,
            zone,
            next_run_at,
            ..
        } => {
            sqlx::query(
                "INSERT INTO proj_invoice_schedules (schedule_id, issuer, template, every, zone, next_run_at, status,
                    created_at, version, position)
                 VALUES ($1, $2, $3, $4, $5, $6, 'active', $7, $8, $9) ON CONFLICT (schedule_id) DO NOTHING",
            )
            .bind(schedule_id)
            .bind(issuer)
            .bind(serde_json::to_value(&template)?)
            .bind(snake(&interval)?)
            .bind(zone)
            .bind(next_run_at)
            .bind(env.occurred_at)
            .bind(ver)
            .bind(pos)
            .execute(&mut *tx)
            .await?;
        }
        InvoiceEvent::InvoiceScheduleRan {
            invoice_id,
            next_run_at,
            ..
        } => {
            bump(
                "UPDATE proj_invoice_schedules SET runs = runs + 1, last_invoice = $4, next_run_at = $5,
                    version = $2, position = $3 WHERE schedule_id = $1",
            )
            .bind(invoice_id)
            .bind(next_run_at)
            .execute(&mut *tx)
            .await?;
        }
        InvoiceEvent::InvoiceScheduleCancelled { .. } => {
            bump(
                "UPDATE proj_invoice_schedules SET status = 'cancelled', next_run_at = NULL, version = $2, position = $3
                 WHERE schedule_id = $1",
            )
            .execute(&mut *tx)
            .await?;
        }
    }
    Ok(())
}

/// The scheduler's invoice work due at `now`: overdue marks of sent invoices
/// past their due time, and the runs of recurring schedules, as commands from
/// the system actor with ids derived from what they fire
/// ([`commands::invoice::overdue_command_id`], [`commands::invoice::run_command_id`]).
/// Each command carries `now`, the clock the due query used, so a fired one is
/// never refused as "not due" (a refusal the command ledger would keep).
pub async fn due_work(
    pool: &sqlx::PgPool,
    now: chrono::DateTime<chrono::Utc>,
) -> anyhow::Result<Vec<handlers::bus::CommandEnvelope>> {
    use commands::invoice::{InvoiceCommand, overdue_command_id, run_command_id};
    use sqlx::Row;
    let system = commands::Actor {
        user_id: None,
        role: commands::Role::System,
    };
    let envelope =
        |command_id: Uuid, hash: String, command: InvoiceCommand| handlers::bus::CommandEnvelope {
            command_id,
            correlation_id: command_id,
            actor: system.clone(),
            issued_at: now,
            request_hash: hash,
            command: commands::Command::Invoice(command),
            expected_version: None,
        };
    let mut out = vec![];
    let overdue = sqlx::query(
        "SELECT invoice_id FROM proj_invoices WHERE status = 'sent' AND due_at <= $1 ORDER BY due_at LIMIT 1000",
    )
    .bind(now)
    .fetch_all(pool)
    .await?;
    for r in overdue {
        let invoice_id: Uuid = r.get("invoice_id");
        out.push(envelope(
            overdue_command_id(invoice_id),
            format!("invoice-overdue:{invoice_id}"),
            InvoiceCommand::MarkOverdue {
                invoice_id,
                at: now,
            },
        ));
    }
    let runs = sqlx::query(
        "SELECT schedule_id, issuer, next_run_at FROM proj_invoice_schedules
         WHERE status = 'active' AND next_run_at <= $1 ORDER BY next_run_at LIMIT 1000",
    )
    .bind(now)
    .fetch_all(pool)
    .await?;
    for r in runs {
        let schedule_id: Uuid = r.get("schedule_id");
        let run_at: chrono::DateTime<chrono::Utc> = r.get("next_run_at");
        out.push(envelope(
            run_command_id(schedule_id, run_at),
            format!("invoice-run:{schedule_id}:{}", run_at.timestamp_micros()),
            InvoiceCommand::RunSchedule {
                schedule_id,
                run_at,
                issuer: r.get("issuer"),
                at: now,
            },
        ));
    }
    Ok(out)
}
