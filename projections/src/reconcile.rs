//! The ledger's reconciliation report: Σ debits = Σ credits per currency,
//! every transfer's legs sum to zero, the read model agrees with the log, and
//! every provider payment matches the deposit it credited (and no deposit
//! claims a provider payment that did not complete).
//!
//! The ledger part reads the event log itself (an auditor's check must not
//! trust the read model) in one statement, so it sees one snapshot. Admins
//! run it on demand (`GET /v1/admin/reconciliation`, `mathia reconcile`); the
//! scheduler runs it every `MATHIA_RECONCILE_SECS` ([`Reconciler`]), keeps
//! each run in `reconciliation_runs` and exports `mathia_ledger_balanced`.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgPool, Row};
use tokio_util::sync::CancellationToken;
use utoipa::ToSchema;
use uuid::Uuid;

/// A completed provider payment younger than this may still be on its way to
/// the ledger (the deposit command is in flight); older and uncredited is a finding.
pub const CREDIT_GRACE_SECS: i64 = 300;

/// Most findings listed per kind (the counts are always complete).
pub const MAX_LISTED: i64 = 100;

/// One currency of the report.
#[derive(Debug, Serialize, ToSchema)]
pub struct CurrencyReconciliation {
    /// ISO code.
    pub currency: String,
    /// Σ of every Debited leg in the event log (minor units).
    pub debits: i64,
    /// Σ of every Credited leg in the event log.
    pub credits: i64,
    /// debits − credits: 0 when the ledger balances.
    pub difference: i64,
    /// Legs counted.
    pub legs: i64,
    /// Σ posted over the read model's accounts of this currency: 0 when balanced.
    pub posted_sum: i64,
    /// Σ pending (open holds) in the read model.
    pub pending_sum: i64,
    /// Σ held by fee accounts (Mathia's revenue).
    pub fees: i64,
    /// Σ of the provider float shards (negative: money deposited and not withdrawn).
    pub float: i64,
    /// Σ of the currency desks (Mathia's position from conversions).
    pub fx: i64,
}

/// A provider payment and the ledger disagree.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ProviderFinding {
    /// `not_credited` (completed at the provider, no deposit after the grace
    /// period), `no_completed_payment` (a deposit names a provider payment that
    /// is unknown or did not complete), `amount_differs`, `wallet_differs`.
    pub problem: String,
    /// `mpesa` or `card`.
    pub provider: String,
    /// The provider's payment id.
    pub payment_id: String,
    /// The payment's state as the provider last reported it; none if unknown.
    pub status: Option<String>,
    /// The wallet and amount the provider reported.
    pub expected_wallet: Option<Uuid>,
    /// Minor units the provider reported.
    pub expected_amount: Option<i64>,
    /// The wallet the ledger credited.
    pub credited_wallet: Option<Uuid>,
    /// Minor units the ledger credited.
    pub credited_amount: Option<i64>,
}

/// Provider payments against the deposits they credited.
#[derive(Debug, Default, Serialize, ToSchema)]
pub struct ProviderReconciliation {
    /// Completed payments credited with the same wallet and amount.
    pub matched: i64,
    /// Completed payments younger than the grace period, not credited yet.
    pub in_flight: i64,
    /// Payments still pending at the provider.
    pub pending: i64,
    /// Failed payments (never credited, as it should be).
    pub failed: i64,
    /// How many findings there are (all of them, even past the listed 100).
    pub findings_count: i64,
    /// The findings, up to 100.
    pub findings: Vec<ProviderFinding>,
}

/// The whole report.
#[derive(Debug, Serialize, ToSchema)]
pub struct Reconciliation {
    /// When it was computed.
    pub generated_at: DateTime<Utc>,
    /// Whether every currency balances, every transfer's legs sum to 0, the
    /// read model agrees and every provider payment matches its deposit.
    pub balanced: bool,
    /// Per currency.
    pub currencies: Vec<CurrencyReconciliation>,
    /// Transfer (or leg) ids whose debits and credits differ; empty when balanced.
    pub unbalanced_transfers: Vec<Uuid>,
    /// Provider references against the ledger.
    pub providers: ProviderReconciliation,
}

/// Compute the report.
pub async fn reconcile(pool: &PgPool) -> sqlx::Result<Reconciliation> {
    let log = sqlx::query(
        "WITH cur AS (SELECT stream_id, payload->>'currency' AS currency FROM events
                      WHERE domain = 'wallet' AND event_type = 'AccountOpened')
         SELECT c.currency,
                coalesce(sum((e.payload->>'amount')::bigint) FILTER (WHERE e.event_type = 'Debited'), 0)::bigint AS debits,
                coalesce(sum((e.payload->>'amount')::bigint) FILTER (WHERE e.event_type = 'Credited'), 0)::bigint AS credits,
                count(*) AS legs
         FROM events e JOIN cur c USING (stream_id)
         WHERE e.domain = 'wallet' AND e.event_type IN ('Debited', 'Credited')
         GROUP BY c.currency ORDER BY c.currency",
    )
    .fetch_all(pool)
    .await?;
    let unbalanced: Vec<Uuid> = sqlx::query_scalar(
        "SELECT (payload->>'transfer_id')::uuid FROM events
         WHERE domain = 'wallet' AND event_type IN ('Debited', 'Credited')
         GROUP BY payload->>'transfer_id'
         HAVING sum(CASE WHEN event_type = 'Debited' THEN -(payload->>'amount')::bigint
                         ELSE (payload->>'amount')::bigint END) <> 0
         LIMIT 100",
    )
    .fetch_all(pool)
    .await?;
    let model = sqlx::query(
        "SELECT currency, coalesce(sum(posted), 0)::bigint AS posted, coalesce(sum(pending), 0)::bigint AS pending,
                coalesce(sum(posted) FILTER (WHERE kind = 'system_fees'), 0)::bigint AS fees,
                coalesce(sum(posted) FILTER (WHERE kind = 'system_float'), 0)::bigint AS float,
                coalesce(sum(posted) FILTER (WHERE kind = 'system_fx'), 0)::bigint AS fx
         FROM proj_wallet_accounts GROUP BY currency",
    )
    .fetch_all(pool)
    .await?;
    let currencies: Vec<CurrencyReconciliation> = log
        .iter()
        .map(|r| {
            let currency: String = r.get("currency");
            let m = model
                .iter()
                .find(|m| m.get::<String, _>("currency") == currency);
            let get = |col: &str| m.map_or(0, |m| m.get::<i64, _>(col));
            let (debits, credits): (i64, i64) = (r.get("debits"), r.get("credits"));
            CurrencyReconciliation {
                debits,
                credits,
                difference: debits - credits,
                legs: r.get("legs"),
                posted_sum: get("posted"),
                pending_sum: get("pending"),
                fees: get("fees"),
                float: get("float"),
                fx: get("fx"),
                currency,
            }
        })
        .collect();
    let providers = providers(pool).await?;
    let balanced = unbalanced.is_empty()
        && providers.findings_count == 0
        && currencies
            .iter()
            .all(|c| c.difference == 0 && c.posted_sum == 0);
    Ok(Reconciliation {
        generated_at: Utc::now(),
        balanced,
        currencies,
        unbalanced_transfers: unbalanced,
        providers,
    })
}

/// Every provider payment against the deposit legs that name it
/// (`reference` = `<provider>:<payment id>` on the credited wallet's leg).
async fn providers(pool: &PgPool) -> sqlx::Result<ProviderReconciliation> {
    let rows = sqlx::query(
        "WITH credited AS (
             SELECT split_part(payload->>'reference', ':', 1) AS provider,
                    substr(payload->>'reference', strpos(payload->>'reference', ':') + 1) AS payment_id,
                    split_part(stream_id, '.', 3)::uuid AS wallet_id,
                    sum((payload->>'amount')::bigint)::bigint AS amount
             FROM events
             WHERE domain = 'wallet' AND event_type = 'Credited' AND payload->>'kind' = 'deposit'
               AND split_part(payload->>'reference', ':', 1) IN ('mpesa', 'card')
             GROUP BY 1, 2, 3)
         SELECT coalesce(p.provider, c.provider) AS provider, coalesce(p.payment_id, c.payment_id) AS payment_id,
                p.status, p.wallet_id AS expected_wallet, p.amount AS expected_amount,
                c.wallet_id AS credited_wallet, c.amount AS credited_amount,
                (p.updated_at > now() - make_interval(secs => $1)) AS recent
         FROM payment_intents p FULL JOIN credited c
           ON c.provider = p.provider AND c.payment_id = p.payment_id",
    )
    .bind(CREDIT_GRACE_SECS as f64)
    .fetch_all(pool)
    .await?;
    let mut report = ProviderReconciliation::default();
    for r in rows {
        let finding = |problem: &str| ProviderFinding {
            problem: problem.into(),
            provider: r.get("provider"),
            payment_id: r.get("payment_id"),
            status: r.get("status"),
            expected_wallet: r.get("expected_wallet"),
            expected_amount: r.get("expected_amount"),
            credited_wallet: r.get("credited_wallet"),
            credited_amount: r.get("credited_amount"),
        };
        let status: Option<String> = r.get("status");
        let credited: Option<i64> = r.get("credited_amount");
        let problem = match (status.as_deref(), credited) {
            (Some("completed"), Some(amount)) => {
                if r.get::<Option<Uuid>, _>("expected_wallet")
                    != r.get::<Option<Uuid>, _>("credited_wallet")
                {
                    Some("wallet_differs")
                } else if r.get::<Option<i64>, _>("expected_amount") != Some(amount) {
                    Some("amount_differs")
                } else {
                    report.matched += 1;
                    None
                }
            }
            (Some("completed"), None) if r.get::<Option<bool>, _>("recent") == Some(true) => {
                report.in_flight += 1;
                None
            }
            (Some("completed"), None) => Some("not_credited"),
            (_, Some(_)) => Some("no_completed_payment"),
            (Some("pending"), None) => {
                report.pending += 1;
                None
            }
            (_, None) => {
                report.failed += 1;
                None
            }
        };
        if let Some(problem) = problem {
            report.findings_count += 1;
            if (report.findings.len() as i64) < MAX_LISTED {
                report.findings.push(finding(problem));
            }
        }
    }
    Ok(report)
}

/// Runs the report on a schedule and keeps each run: the scheduler's part.
pub struct Reconciler {
    /// The store.
    pub pool: PgPool,
    /// Time between runs.
    pub every: Duration,
}

impl Reconciler {
    /// Run every `every` until `shutdown`; a run another scheduler instance
    /// made within the interval counts (two instances do not double the work).
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let mut tick = tokio::time::interval(self.every.min(Duration::from_secs(60)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                _ = tick.tick() => {}
            }
            if let Err(e) = self.run_if_due().await {
                tracing::warn!(error = %e, "reconciliation run failed");
            }
        }
    }

    /// One run if the last is older than the interval; whether it ran.
    pub async fn run_if_due(&self) -> anyhow::Result<bool> {
        let due: bool = sqlx::query_scalar(
            "SELECT NOT EXISTS (SELECT 1 FROM reconciliation_runs
                                WHERE ran_at > now() - make_interval(secs => $1))",
        )
        .bind(self.every.as_secs_f64())
        .fetch_one(&self.pool)
        .await?;
        if !due {
            return Ok(false);
        }
        let report = reconcile(&self.pool).await?;
        record(&self.pool, &report, "scheduler").await?;
        Ok(true)
    }
}

/// Keep a run, export its verdict, and warn when it found something.
pub async fn record(pool: &PgPool, report: &Reconciliation, by: &str) -> anyhow::Result<i64> {
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO reconciliation_runs (ran_at, ran_by, balanced, findings, report)
         VALUES ($1, $2, $3, $4, $5) RETURNING id",
    )
    .bind(report.generated_at)
    .bind(by)
    .bind(report.balanced)
    .bind(report.providers.findings_count + report.unbalanced_transfers.len() as i64)
    .bind(serde_json::to_value(report)?)
    .fetch_one(pool)
    .await?;
    metrics::gauge!("mathia_ledger_balanced").set(if report.balanced { 1.0 } else { 0.0 });
    if !report.balanced {
        tracing::warn!(
            run = id,
            unbalanced_transfers = report.unbalanced_transfers.len(),
            provider_findings = report.providers.findings_count,
            "reconciliation found a difference; see GET /v1/admin/reconciliation/runs"
        );
    }
    Ok(id)
}
