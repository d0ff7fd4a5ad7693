//! The wallet read models: `proj_wallet_accounts` (balances: posted, pending,
//! limits), `proj_wallet_entries` (one row per ledger leg, the history) and
//! `proj_wallet_holds` (pending transfers; the expiry scheduler reads it), and
//! the invoices ([`crate::invoice`]).

use std::collections::BTreeMap;

use events::wallet::WalletEvent;
use events::{Event, EventEnvelope};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::Projector;

/// Projector `wallet`.
#[derive(Debug, Default, Clone, Copy)]
pub struct WalletProjector;

impl Projector for WalletProjector {
    fn name(&self) -> &'static str {
        "wallet"
    }

    fn domains(&self) -> &'static [&'static str] {
        &[events::wallet::DOMAIN, events::invoice::DOMAIN]
    }

    fn tables(&self) -> &'static [&'static str] {
        &[
            "proj_wallet_accounts",
            "proj_wallet_entries",
            "proj_wallet_holds",
            "proj_wallet_disputes",
            "proj_invoices",
            "proj_invoice_payments",
            "proj_invoice_schedules",
        ]
    }

    async fn apply(&self, tx: &mut PgConnection, batch: &[EventEnvelope]) -> anyhow::Result<()> {
        // Set-based: one statement per table per batch, whatever the batch size.
        let mut opened = (
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
        );
        let mut entries = EntryRows::default();
        // Last (version, posted, pending, time) per account in this batch.
        let mut balances: BTreeMap<Uuid, Balance> = BTreeMap::new();
        for env in batch {
            let event = match env.event()? {
                Event::Wallet(e) => e,
                Event::Invoice(e) => {
                    crate::invoice::apply(tx, env, e).await?;
                    continue;
                }
                _ => continue,
            };
            match event {
                WalletEvent::AccountOpened {
                    account_id,
                    owner_id,
                    currency,
                    kind,
                    ..
                } => {
                    opened.0.push(account_id);
                    opened.1.push(owner_id);
                    opened.2.push(currency);
                    opened.3.push(kind.as_str());
                    opened.4.push(env.version);
                    opened.5.push(env.occurred_at);
                }
                WalletEvent::Debited(leg) => entries.push(env, &leg, -leg.amount, &mut balances),
                WalletEvent::Credited(leg) => entries.push(env, &leg, leg.amount, &mut balances),
                WalletEvent::HoldPlaced {
                    hold_id,
                    amount,
                    counterparty,
                    reference,
                    expires_at,
                    at,
                    pending_after,
                } => {
                    let account = stream_uuid(env)?;
                    sqlx::query(
                        "INSERT INTO proj_wallet_holds (hold_id, from_account, to_account, amount, status, reference,
                                                        expires_at, placed_at, position)
                         VALUES ($1, $2, $3, $4, 'pending', $5, $6, $7, $8) ON CONFLICT (hold_id) DO NOTHING",
                    )
                    .bind(hold_id)
                    .bind(account)
                    .bind(counterparty)
                    .bind(amount)
                    .bind(reference)
                    .bind(expires_at)
                    .bind(at)
                    .bind(env.position)
                    .execute(&mut *tx)
                    .await?;
                    balance(&mut balances, account, env).pending = Some(pending_after);
                }
                WalletEvent::HoldReleased {
                    hold_id,
                    posted,
                    end,
                    pending_after,
                    ..
                } => {
                    let account = stream_uuid(env)?;
                    sqlx::query(
                        "UPDATE proj_wallet_holds SET status = $2, posted = $3, ended_at = $4
                         WHERE hold_id = $1 AND status = 'pending'",
                    )
                    .bind(hold_id)
                    .bind(end.as_str())
                    .bind(posted)
                    .bind(env.occurred_at)
                    .execute(&mut *tx)
                    .await?;
                    balance(&mut balances, account, env).pending = Some(pending_after);
                }
                WalletEvent::DisputeOpened {
                    dispute_id,
                    transfer_id,
                    payer,
                    held,
                    amount,
                    reason,
                } => {
                    let account = stream_uuid(env)?;
                    sqlx::query(
                        "INSERT INTO proj_wallet_disputes (dispute_id, transfer_id, payee, payer, amount, held, status,
                                                           reason, opened_at, position)
                         VALUES ($1, $2, $3, $4, $5, $6, 'open', $7, $8, $9) ON CONFLICT (dispute_id) DO NOTHING",
                    )
                    .bind(dispute_id)
                    .bind(transfer_id)
                    .bind(account)
                    .bind(payer)
                    .bind(amount)
                    .bind(held)
                    .bind(reason)
                    .bind(env.occurred_at)
                    .bind(env.position)
                    .execute(&mut *tx)
                    .await?;
                    sqlx::query(
                        "UPDATE proj_wallet_accounts SET frozen = true WHERE account_id = $1",
                    )
                    .bind(account)
                    .execute(&mut *tx)
                    .await?;
                    balance(&mut balances, account, env);
                }
                WalletEvent::DisputeEvidenceAdded {
                    dispute_id,
                    evidence,
                } => {
                    let account = stream_uuid(env)?;
                    sqlx::query(
                        "UPDATE proj_wallet_disputes SET evidence = evidence || jsonb_build_array(jsonb_build_object(
                             'evidence', $2::text, 'at', $3::timestamptz, 'position', $4::bigint))
                         WHERE dispute_id = $1 AND NOT evidence @> jsonb_build_array(jsonb_build_object('position', $4::bigint))",
                    )
                    .bind(dispute_id)
                    .bind(evidence)
                    .bind(env.occurred_at)
                    .bind(env.position)
                    .execute(&mut *tx)
                    .await?;
                    balance(&mut balances, account, env);
                }
                WalletEvent::DisputeResolved {
                    dispute_id,
                    outcome,
                    ..
                } => {
                    let account = stream_uuid(env)?;
                    sqlx::query(
                        "UPDATE proj_wallet_disputes SET status = $2, resolved_at = $3 WHERE dispute_id = $1",
                    )
                    .bind(dispute_id)
                    .bind(outcome.as_str())
                    .bind(env.occurred_at)
                    .execute(&mut *tx)
                    .await?;
                    sqlx::query(
                        "UPDATE proj_wallet_accounts SET frozen = EXISTS (
                             SELECT 1 FROM proj_wallet_disputes WHERE payee = $1 AND status = 'open')
                         WHERE account_id = $1",
                    )
                    .bind(account)
                    .execute(&mut *tx)
                    .await?;
                    balance(&mut balances, account, env);
                }
                WalletEvent::LimitsSet {
                    max_withdraw_amount,
                    daily_spend_limit,
                    payout_allow_list,
                } => {
                    let account = stream_uuid(env)?;
                    sqlx::query(
                        "UPDATE proj_wallet_accounts SET limits = $2 WHERE account_id = $1",
                    )
                    .bind(account)
                    .bind(serde_json::json!({
                        "max_withdraw_amount": max_withdraw_amount,
                        "daily_spend_limit": daily_spend_limit,
                        "payout_allow_list": payout_allow_list,
                    }))
                    .execute(&mut *tx)
                    .await?;
                    balance(&mut balances, account, env);
                }
            }
        }
        if !opened.0.is_empty() {
            sqlx::query(
                "INSERT INTO proj_wallet_accounts (account_id, owner_id, currency, kind, posted, version, opened_at, updated_at)
                 SELECT id, o, c, k, 0, v, t, t FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::bigint[], $6::timestamptz[])
                   AS u(id, o, c, k, v, t)
                 ON CONFLICT (account_id) DO NOTHING",
            )
            .bind(&opened.0)
            .bind(&opened.1)
            .bind(&opened.2)
            .bind(&opened.3)
            .bind(&opened.4)
            .bind(&opened.5)
            .execute(&mut *tx)
            .await?;
        }
        if !entries.account.is_empty() {
            sqlx::query(
                "INSERT INTO proj_wallet_entries (account_id, version, position, transfer_id, kind, amount, counterparty,
                                                  reference, balance_after, occurred_at, fx)
                 SELECT * FROM UNNEST($1::uuid[], $2::bigint[], $3::bigint[], $4::uuid[], $5::text[], $6::bigint[],
                                      $7::uuid[], $8::text[], $9::bigint[], $10::timestamptz[], $11::jsonb[])
                 ON CONFLICT (account_id, version) DO NOTHING",
            )
            .bind(&entries.account)
            .bind(&entries.version)
            .bind(&entries.position)
            .bind(&entries.transfer)
            .bind(&entries.kind)
            .bind(&entries.amount)
            .bind(&entries.counterparty)
            .bind(&entries.reference)
            .bind(&entries.balance_after)
            .bind(&entries.at)
            .bind(&entries.fx)
            .execute(&mut *tx)
            .await?;
        }
        if !balances.is_empty() {
            let ids: Vec<Uuid> = balances.keys().copied().collect();
            let versions: Vec<i64> = balances.values().map(|b| b.version).collect();
            let posted: Vec<Option<i64>> = balances.values().map(|b| b.posted).collect();
            let pending: Vec<Option<i64>> = balances.values().map(|b| b.pending).collect();
            let at: Vec<chrono::DateTime<chrono::Utc>> = balances.values().map(|b| b.at).collect();
            sqlx::query(
                "UPDATE proj_wallet_accounts a SET posted = coalesce(u.p, a.posted), pending = coalesce(u.pe, a.pending),
                        version = u.v, updated_at = u.t
                 FROM UNNEST($1::uuid[], $2::bigint[], $3::bigint[], $4::bigint[], $5::timestamptz[]) AS u(id, v, p, pe, t)
                 WHERE a.account_id = u.id AND a.version < u.v",
            )
            .bind(&ids)
            .bind(&versions)
            .bind(&posted)
            .bind(&pending)
            .bind(&at)
            .execute(&mut *tx)
            .await?;
        }
        Ok(())
    }
}

/// The last state of one account within a batch; none: unchanged by it.
struct Balance {
    version: i64,
    posted: Option<i64>,
    pending: Option<i64>,
    at: chrono::DateTime<chrono::Utc>,
}

/// `account`'s entry in `balances`, moved to `env`'s version.
fn balance<'a>(
    balances: &'a mut BTreeMap<Uuid, Balance>,
    account: Uuid,
    env: &EventEnvelope,
) -> &'a mut Balance {
    let b = balances.entry(account).or_insert(Balance {
        version: env.version,
        posted: None,
        pending: None,
        at: env.occurred_at,
    });
    b.version = env.version;
    b.at = env.occurred_at;
    b
}

fn stream_uuid(env: &EventEnvelope) -> anyhow::Result<Uuid> {
    env.stream_id
        .id()
        .parse()
        .map_err(|e| anyhow::anyhow!("wallet stream {} is not a uuid: {e}", env.stream_id))
}

#[derive(Default)]
struct EntryRows {
    account: Vec<Uuid>,
    version: Vec<i64>,
    position: Vec<i64>,
    transfer: Vec<Uuid>,
    kind: Vec<&'static str>,
    amount: Vec<i64>,
    counterparty: Vec<Uuid>,
    reference: Vec<Option<String>>,
    balance_after: Vec<i64>,
    at: Vec<chrono::DateTime<chrono::Utc>>,
    fx: Vec<Option<serde_json::Value>>,
}

impl EntryRows {
    fn push(
        &mut self,
        env: &EventEnvelope,
        leg: &events::wallet::Leg,
        signed: i64,
        balances: &mut BTreeMap<Uuid, Balance>,
    ) {
        let Ok(account) = env.stream_id.id().parse::<Uuid>() else {
            return;
        };
        self.account.push(account);
        self.version.push(env.version);
        self.position.push(env.position);
        self.transfer.push(leg.transfer_id);
        self.kind.push(leg.kind.as_str());
        self.amount.push(signed);
        self.counterparty.push(leg.counterparty);
        self.reference.push(leg.reference.clone());
        self.balance_after.push(leg.balance_after);
        self.at.push(env.occurred_at);
        self.fx
            .push(leg.fx.as_ref().and_then(|f| serde_json::to_value(f).ok()));
        balance(balances, account, env).posted = Some(leg.balance_after);
    }
}

/// Fires the expiry of holds whose timeout has passed: due work is state
/// derived from events (`proj_wallet_holds`), firing is a `wallet.ExpireHold`
/// command with a deterministic id ([`commands::wallet::expiry_command_id`]).
///
/// Exactly once, whatever fires twice: the command ledger answers a repeated
/// id without deciding it again, and the decision refuses a hold that already
/// ended. The command carries the same clock reading the due query used, so a
/// fired expiry is never refused as "not due" (which the ledger would keep).
/// It runs inside the `proj-wallet` role (written beside the scheduler role, which can host it as is).
pub struct HoldExpirer {
    /// The read model.
    pub pool: sqlx::PgPool,
    /// Where commands go.
    pub js: async_nats::jetstream::Context,
    /// Subject and stream names.
    pub subjects: events::Subjects,
    /// How often to look for due holds.
    pub every: std::time::Duration,
}

impl HoldExpirer {
    /// Run until `shutdown`.
    pub async fn run(self, shutdown: tokio_util::sync::CancellationToken) -> anyhow::Result<()> {
        // Fired recently: the read model has not caught up with the release yet.
        let mut fired: std::collections::HashMap<Uuid, std::time::Instant> = Default::default();
        while !shutdown.is_cancelled() {
            fired.retain(|_, at| at.elapsed() < std::time::Duration::from_secs(30));
            if let Err(e) = self.expire_due(&mut fired).await {
                tracing::warn!(error = format!("{e:#}"), "hold expiry failed; retrying");
            }
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = tokio::time::sleep(self.every) => {}
            }
        }
        Ok(())
    }

    /// Publish the expiry of every due hold not fired recently; how many.
    pub async fn expire_due(
        &self,
        fired: &mut std::collections::HashMap<Uuid, std::time::Instant>,
    ) -> anyhow::Result<usize> {
        use sqlx::Row;
        let now = chrono::Utc::now();
        let rows = sqlx::query(
            "SELECT hold_id, from_account FROM proj_wallet_holds
             WHERE status = 'pending' AND expires_at <= $1 ORDER BY expires_at LIMIT 500",
        )
        .bind(now)
        .fetch_all(&self.pool)
        .await?;
        let mut n = 0;
        for r in rows {
            let (hold_id, from): (Uuid, Uuid) = (r.get("hold_id"), r.get("from_account"));
            if fired.contains_key(&hold_id) {
                continue;
            }
            let command_id = commands::wallet::expiry_command_id(hold_id);
            let envelope = handlers::bus::CommandEnvelope {
                command_id,
                correlation_id: command_id,
                actor: commands::Actor {
                    user_id: None,
                    role: commands::Role::System,
                },
                issued_at: now,
                request_hash: format!("expire-hold:{hold_id}"),
                command: commands::Command::Wallet(commands::wallet::WalletCommand::ExpireHold {
                    hold_id,
                    from,
                    at: now,
                }),
                expected_version: None,
            };
            let inbox = format!(
                "{}.{command_id}",
                self.subjects.outcome_inbox("hold-expirer")
            );
            match handlers::bus::publish_command(&self.js, &self.subjects, &envelope, &inbox)
                .await?
            {
                handlers::bus::Published::Stored { .. } => {
                    fired.insert(hold_id, std::time::Instant::now());
                    n += 1;
                }
                handlers::bus::Published::Unknown => {
                    anyhow::bail!("COMMANDS did not acknowledge a hold expiry")
                }
            }
        }
        if n > 0 {
            metrics::counter!("mathia_wallet_holds_expired_total").increment(n as u64);
        }
        Ok(n)
    }
}
