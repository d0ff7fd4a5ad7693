//! The wallet read models: `proj_wallet_accounts` (balances) and
//! `proj_wallet_entries` (one row per ledger leg, the history).

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
        &[events::wallet::DOMAIN]
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
        // Last (version, balance, time) per account in this batch.
        let mut balances: BTreeMap<Uuid, (i64, i64, chrono::DateTime<chrono::Utc>)> =
            BTreeMap::new();
        for env in batch {
            let Event::Wallet(event) = env.event()? else {
                continue;
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
                                                  reference, balance_after, occurred_at)
                 SELECT * FROM UNNEST($1::uuid[], $2::bigint[], $3::bigint[], $4::uuid[], $5::text[], $6::bigint[],
                                      $7::uuid[], $8::text[], $9::bigint[], $10::timestamptz[])
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
            .execute(&mut *tx)
            .await?;
            let ids: Vec<Uuid> = balances.keys().copied().collect();
            let versions: Vec<i64> = balances.values().map(|b| b.0).collect();
            let posted: Vec<i64> = balances.values().map(|b| b.1).collect();
            let at: Vec<chrono::DateTime<chrono::Utc>> = balances.values().map(|b| b.2).collect();
            sqlx::query(
                "UPDATE proj_wallet_accounts a SET posted = u.p, version = u.v, updated_at = u.t
                 FROM UNNEST($1::uuid[], $2::bigint[], $3::bigint[], $4::timestamptz[]) AS u(id, v, p, t)
                 WHERE a.account_id = u.id AND a.version < u.v",
            )
            .bind(&ids)
            .bind(&versions)
            .bind(&posted)
            .bind(&at)
            .execute(&mut *tx)
            .await?;
        }
        Ok(())
    }
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
}

impl EntryRows {
    fn push(
        &mut self,
        env: &EventEnvelope,
        leg: &events::wallet::Leg,
        signed: i64,
        balances: &mut BTreeMap<Uuid, (i64, i64, chrono::DateTime<chrono::Utc>)>,
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
        balances.insert(account, (env.version, leg.balance_after, env.occurred_at));
    }
}
