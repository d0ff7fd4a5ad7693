//! `loadgen --fees`: transfers with a fee leg and a daily limit check (issue 7).
//!
//! The fee schedule is gateway configuration (`MATHIA_WALLET_FEE_BPS`,
//! `MATHIA_WALLET_FEE_FIXED`): the gateway prices each transfer and the handler
//! decides the fee leg in the same decision as the transfer. So that the plain
//! and the fee transfers are measured in one run, against the same handlers,
//! relay, projectors and store, [`Fees::start`] runs a second gateway in this
//! process with the fee configured, beside the plain one (it idles through the
//! plain phase). Then, after `main`'s plain transfer saturation phase:
//! 1. **Limits**: every one of the 1,000 wallets gets a `daily_spend_limit`
//!    through `PUT /v1/wallets/{id}/limits`, so every transfer of the phase is
//!    checked against the rolling 24 h window of the payer's spends (spends of
//!    the plain phase included).
//! 2. **Checks**: one transfer must answer with the configured fee, and one over
//!    the limit (though within the balance) must be refused with
//!    `daily_spend_limit_exceeded`.
//! 3. **Fees**: the saturation phase again, through the fee gateway: transfers of
//!    [`AMOUNT`] between random pairs, each with a fee leg to a fee account
//!    shard; transfers/s, answer and visibility (`wallet` projector) p50/p99,
//!    and the ratio to the plain phase's transfers/s (target ≥ 0.7).

use std::sync::Arc;

use anyhow::Context as _;
use futures::StreamExt as _;
use mathia::{Config, Roles};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{Client, Load, SETUP_IN_FLIGHT, Wallet, transfer, verdict, write_phase};

/// Issue 7's target: fee transfers/s ÷ plain transfers/s.
const RATIO_TARGET: f64 = 0.7;
/// The fee schedule: 1 % plus 5 minor units.
const FEE_BPS: u32 = 100;
const FEE_FIXED: i64 = 5;
/// Minor units per transfer of the phase (the fee on it is 15).
const AMOUNT: i64 = 1_000;
/// Each wallet's daily spend limit: far above what the phase spends (the
/// wallets hold 100,000,000), so the check runs on every transfer and refuses none.
const DAILY_LIMIT: i64 = 50_000_000;

/// The second gateway, with the fee configured.
pub struct Fees {
    client: Arc<Client>,
    stop: CancellationToken,
    gateway: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Fees {
    /// Start a gateway with the fee schedule on `config`'s database and streams.
    pub async fn start(config: Config, shutdown: &CancellationToken) -> anyhow::Result<Fees> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let base = format!("http://{}", listener.local_addr()?);
        let config = Config {
            wallet_fee_bps: FEE_BPS,
            wallet_fee_fixed: FEE_FIXED,
            ..config
        };
        let roles = Roles {
            gateway: true,
            handlers: false,
            relay: false,
            projections: false,
            scheduler: false,
        };
        let stop = shutdown.child_token();
        let gateway = tokio::spawn(mathia::run(config, roles, Some(listener), stop.clone()));
        let client = Client::ready(base).await?;
        Ok(Fees {
            client,
            stop,
            gateway,
        })
    }

    /// Limits, checks and the fee phase; `transfers` is the same run's plain saturation rate.
    pub async fn run(
        self,
        wallets: &Arc<Vec<Wallet>>,
        database_url: &str,
        transfers: f64,
        load: &Load,
    ) -> anyhow::Result<()> {
        let client = &self.client;
        eprintln!(
            "setting a daily spend limit of {DAILY_LIMIT} on {} wallets…",
            wallets.len()
        );
        let set: Vec<anyhow::Result<()>> = futures::stream::iter(wallets.iter())
            .map(|w| async move {
                let (s, b) = client
                    .send(
                        reqwest::Method::PUT,
                        &format!("/v1/wallets/{}/limits", w.wallet),
                        Some(&w.token),
                        &json!({"daily_spend_limit": DAILY_LIMIT}),
                        Some(&Uuid::now_v7().to_string()),
                    )
                    .await?;
                anyhow::ensure!(s == 200, "setting limits answered {s}: {b}");
                anyhow::Ok(())
            })
            .buffer_unordered(SETUP_IN_FLIGHT)
            .collect()
            .await;
        set.into_iter().collect::<anyhow::Result<Vec<()>>>()?;

        let (payer, payee) = (&wallets[0], &wallets[1]);
        let pay = async |amount: i64| {
            let body = json!({"from_wallet": payer.wallet, "to_user": payee.user, "amount": amount, "currency": "KES"});
            client
                .post("/v1/transfers", Some(&payer.token), &body, None)
                .await
        };
        let fee = i64::from(FEE_BPS) * AMOUNT / 10_000 + FEE_FIXED;
        let (s, b) = pay(AMOUNT).await?;
        anyhow::ensure!(
            s == 201 && b["fee"].as_i64() == Some(fee),
            "a transfer of {AMOUNT} should pay a fee of {fee}; answered {s}: {b}"
        );
        let (s, b) = pay(DAILY_LIMIT + 1).await?;
        anyhow::ensure!(
            s == 422 && b.to_string().contains("daily_spend_limit_exceeded"),
            "a transfer over the daily limit should be refused; answered {s}: {b}"
        );
        println!(
            "fees         fee {FEE_BPS} bps + {FEE_FIXED} on every transfer ({fee} on {AMOUNT}); daily limit {DAILY_LIMIT} on every wallet (checked: over it is refused)"
        );

        eprintln!(
            "fee transfers: {} clients for {} s…",
            load.clients, load.seconds
        );
        let (client, wallets) = (self.client.clone(), wallets.clone());
        let (rate, _) = write_phase(
            "fee+limit",
            "transfers",
            "wallet",
            database_url,
            load.clients,
            load.seconds,
            move |phase, pending| {
                let (client, wallets) = (client.clone(), wallets.clone());
                async move { transfer(&client, &wallets, AMOUNT, &phase, &pending).await }
            },
        )
        .await?;
        println!(
            "ratio        fee transfers/s ÷ plain transfers/s = {:.2} (target ≥ {RATIO_TARGET}: {})",
            rate / transfers,
            verdict(rate / transfers >= RATIO_TARGET)
        );
        self.stop.cancel();
        self.gateway
            .await
            .context("the fee gateway")?
            .context("the fee gateway")?;
        Ok(())
    }
}
