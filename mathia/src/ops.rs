//! Operator commands: `mathia replay` (rebuild read models into shadow tables
//! and swap them in) and `mathia deadletters` (events a projector parked).

use std::io::IsTerminal as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use projections::chat::ChatProjector;
use projections::feed::FeedProjector;
use projections::itinerary::{FeedQueue, ItineraryProjector};
use projections::rebuild::{self, Options, Outcome, Progress};
use projections::reminder::RemindersProjector;
use projections::wallet::WalletProjector;
use projections::webhook::WebhookQueue;
use projections::{assistant::AssistantQueue, deadletter, screen::ScreenQueue};
use sqlx::PgPool;

use crate::{Config, Roles};

/// The read models a rebuild can recreate, in the order `replay all` takes them.
pub const READ_MODELS: &[&str] = &["wallet", "chat", "feed", "itinerary", "reminders"];
/// The reactors: projectors whose rows trigger side effects; never rebuilt.
pub const REACTORS: &[&str] = &["screen", "assistant", "itinerary-feed", "webhooks"];

/// Run `$body` with `$p` bound to the projector named `$name` (`$keystore` builds
/// the chat projector's keystore only when it is needed).
macro_rules! with_projector {
    ($name:expr, $config:expr, |$p:ident| $body:expr) => {
        match $name {
            "wallet" => {
                let $p = WalletProjector;
                $body
            }
            "chat" => {
                let $p = ChatProjector {
                    keystore: keystore($config)?,
                };
                $body
            }
            "feed" => {
                let $p = FeedProjector;
                $body
            }
            "itinerary" => {
                let $p = ItineraryProjector;
                $body
            }
            "reminders" => {
                let $p = RemindersProjector;
                $body
            }
            "screen" => {
                let $p = ScreenQueue;
                $body
            }
            "assistant" => {
                let $p = AssistantQueue;
                $body
            }
            "itinerary-feed" => {
                let $p = FeedQueue;
                $body
            }
            "webhooks" => {
                let $p = WebhookQueue;
                $body
            }
            other => anyhow::bail!(
                "no projector {other}; read models: {}; reactors: {}",
                READ_MODELS.join(", "),
                REACTORS.join(", ")
            ),
        }
    };
}

fn keystore(config: &Config) -> anyhow::Result<handlers::keystore::Keystore> {
    if config.master_key.is_none() && !std::path::Path::new(".data/master.key").exists() {
        anyhow::bail!("the chat read model needs the master key: set MATHIA_MASTER_KEY");
    }
    Ok(handlers::keystore::Keystore::new(crate::master_key(
        config,
        Roles::ALL,
    )?))
}

/// `mathia replay <model|all>`: prints progress to stderr and the outcome(s);
/// returns the exit code (1 when a dry run found differences).
pub async fn replay(
    config: &Config,
    pool: &PgPool,
    model: &str,
    options: &Options,
    json: bool,
) -> anyhow::Result<i32> {
    if REACTORS.contains(&model) {
        anyhow::bail!(
            "{model} is a reactor: its rows trigger side effects (moderation calls, assistant replies, \
             trip-room posts, webhook deliveries) that must not fire again, so it is never rebuilt"
        );
    }
    let models: Vec<&str> = if model == "all" {
        eprintln!(
            "replay all: {} (reactors are never rebuilt: {})",
            READ_MODELS.join(", "),
            REACTORS.join(", ")
        );
        READ_MODELS.to_vec()
    } else {
        vec![model]
    };
    // The models rebuild side by side, each into its own shadow with its own
    // swap: `all` takes about as long as the longest, not the sum. (One rebuild
    // alone leaves a core idle on this kind of machine: it waits on Postgres,
    // then Postgres on it.) A rebuild holds one connection at a time, so at most
    // as many run as the pool has connections; the others wait for a turn here,
    // not in the pool (whose acquire times out while an index builds). The
    // outcomes print in the order of `models`.
    let bars = indicatif::MultiProgress::new();
    let turns = Arc::new(tokio::sync::Semaphore::new(
        pool.options().get_max_connections().max(1) as usize,
    ));
    let runs: Vec<_> = models
        .into_iter()
        .map(|m| {
            let m = m.to_owned();
            let (config, pool, options, bars, turns) = (
                config.clone(),
                pool.clone(),
                options.clone(),
                bars.clone(),
                turns.clone(),
            );
            tokio::spawn(async move {
                let _turn = turns.acquire_owned().await?;
                let outcome = with_projector!(m.as_str(), &config, |p| {
                    let mut bar = Bar::new(&m, &bars);
                    let outcome = rebuild::rebuild(&pool, &p, &options, |pr| bar.show(pr)).await;
                    bar.finish();
                    outcome.with_context(|| format!("rebuild of {m}"))?
                });
                anyhow::Ok(outcome)
            })
        })
        .collect();
    let mut code = 0;
    for run in futures::future::join_all(runs).await {
        let outcome = run.context("a rebuild task panicked")??;
        if outcome.differs() {
            code = 1;
        }
        if json {
            println!("{}", serde_json::to_string(&outcome)?);
        } else {
            print!("{}", render(&outcome));
        }
    }
    Ok(code)
}

/// `mathia replay --discard <model>`: drop an interrupted rebuild.
pub async fn discard(pool: &PgPool, model: &str) -> anyhow::Result<()> {
    rebuild::discard(pool, model).await?;
    println!("{model}: rebuild discarded (shadow tables dropped)");
    Ok(())
}

fn render(outcome: &Outcome) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    match outcome {
        Outcome::Swapped {
            model,
            position,
            epoch,
            events,
            rate,
            resumed,
        } => {
            let _ = writeln!(
                out,
                "{model}: rebuilt{} and swapped in at position {position}, epoch {epoch}: {events} events, {rate:.0} events/s",
                if *resumed { " (resumed)" } else { "" }
            );
        }
        Outcome::Paused {
            model,
            position,
            events,
        } => {
            let _ = writeln!(
                out,
                "{model}: paused at position {position} after {events} events; run the same command again to resume"
            );
        }
        Outcome::DryRun {
            model,
            position,
            tables,
            events,
            rate,
        } => {
            let _ = writeln!(
                out,
                "{model}: dry run compared at position {position} ({events} events, {rate:.0} events/s); nothing swapped"
            );
            for t in tables {
                let verdict = if t.only_live == 0 && t.only_rebuilt == 0 {
                    "identical".to_owned()
                } else {
                    format!(
                        "DIFFERS: {} row(s) only live, {} only rebuilt",
                        t.only_live, t.only_rebuilt
                    )
                };
                let _ = writeln!(
                    out,
                    "  {:<26} live {:>9}  rebuilt {:>9}  {verdict}",
                    t.table, t.live_rows, t.rebuilt_rows
                );
                for r in &t.samples_live {
                    let _ = writeln!(out, "    live only:    {r}");
                }
                for r in &t.samples_rebuilt {
                    let _ = writeln!(out, "    rebuilt only: {r}");
                }
            }
        }
    }
    out
}

/// A progress bar on a terminal; a line every 5 s otherwise.
struct Bar {
    bar: Option<indicatif::ProgressBar>,
    model: String,
    last_line: Instant,
}

impl Bar {
    fn new(model: &str, bars: &indicatif::MultiProgress) -> Bar {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = bars.add(indicatif::ProgressBar::new(0));
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{prefix:>10} [{bar:40}] {pos}/{len} positions  {msg}  ETA {eta}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            bar.set_prefix(model.to_owned());
            bar
        });
        Bar {
            bar,
            model: model.to_owned(),
            last_line: Instant::now(),
        }
    }

    fn show(&mut self, p: &Progress) {
        let span = (p.target - p.started_at).max(1) as u64;
        let done = (p.position - p.started_at).max(0) as u64;
        match &self.bar {
            Some(bar) => {
                bar.set_length(span);
                bar.set_position(done);
                bar.set_message(format!("{} events, {:.0} events/s", p.events, p.rate));
            }
            None if self.last_line.elapsed() >= Duration::from_secs(5) => {
                self.last_line = Instant::now();
                let secs = p.elapsed.as_secs_f64();
                let eta = if done > 0 && secs > 0.0 {
                    let per_sec = done as f64 / secs;
                    format!("{:.0} s", span.saturating_sub(done) as f64 / per_sec)
                } else {
                    "?".into()
                };
                eprintln!(
                    "{}: position {} of {} ({:.0} %), {} events, {:.0} events/s, ETA {eta}",
                    self.model,
                    p.position,
                    p.target,
                    100.0 * done as f64 / span as f64,
                    p.events,
                    p.rate
                );
            }
            None => {}
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// `mathia deadletters list`.
pub async fn list_deadletters(
    pool: &PgPool,
    model: Option<&str>,
    all: bool,
    json: bool,
) -> anyhow::Result<()> {
    let rows = deadletter::list(pool, model, all).await?;
    if json {
        for r in &rows {
            println!("{}", serde_json::to_string(r)?);
        }
        return Ok(());
    }
    if rows.is_empty() {
        println!("no dead letters");
        return Ok(());
    }
    println!(
        "{:>6}  {:<14} {:>10}  {:<8} {:>3}  {:<22} {:<56} error",
        "id", "projector", "position", "status", "try", "type", "stream"
    );
    for r in rows {
        println!(
            "{:>6}  {:<14} {:>10}  {:<8} {:>3}  {:<22} {:<56} {}",
            r.id,
            r.model,
            r.position,
            r.status,
            r.attempts,
            r.event_type,
            r.stream_id,
            r.error.as_deref().unwrap_or("")
        );
    }
    Ok(())
}

/// `mathia deadletters retry|skip <id>`.
pub async fn settle_deadletter(
    config: &Config,
    pool: &PgPool,
    id: i64,
    skip: bool,
) -> anyhow::Result<()> {
    let model = deadletter::model_of(pool, id)
        .await?
        .with_context(|| format!("no dead letter {id} (see `mathia deadletters list`)"))?;
    let settled = with_projector!(model.as_str(), config, |p| {
        if skip {
            deadletter::skip(pool, &p, id).await?
        } else {
            deadletter::retry(pool, &p, id).await?
        }
    });
    println!(
        "{model}: {} applied, {} skipped",
        settled.applied, settled.skipped
    );
    if let Some(d) = settled.still_parked {
        println!(
            "still parked: id {} at position {} ({}): {}",
            d.id,
            d.position,
            d.event_type,
            d.error.unwrap_or_default()
        );
        std::process::exit(2);
    }
    Ok(())
}

/// The reconciliation report for a terminal: one line per currency, then every finding.
pub fn render_reconciliation(r: &projections::reconcile::Reconciliation) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let verdict = if r.balanced {
        "BALANCED"
    } else {
        "DIFFERENCES FOUND"
    };
    let _ = writeln!(
        out,
        "ledger reconciliation at {}: {verdict}",
        r.generated_at.to_rfc3339()
    );
    let _ = writeln!(
        out,
        "{:<4} {:>18} {:>18} {:>10} {:>10} {:>14} {:>14} {:>14}",
        "CUR", "DEBITS", "CREDITS", "DIFF", "LEGS", "MODEL SUM", "FLOAT", "FX DESKS"
    );
    for c in &r.currencies {
        let _ = writeln!(
            out,
            "{:<4} {:>18} {:>18} {:>10} {:>10} {:>14} {:>14} {:>14}",
            c.currency, c.debits, c.credits, c.difference, c.legs, c.posted_sum, c.float, c.fx
        );
    }
    for t in &r.unbalanced_transfers {
        let _ = writeln!(out, "unbalanced transfer {t}");
    }
    let p = &r.providers;
    let _ = writeln!(
        out,
        "provider payments: {} matched, {} in flight, {} pending, {} failed, {} findings",
        p.matched, p.in_flight, p.pending, p.failed, p.findings_count
    );
    for f in &p.findings {
        let _ = writeln!(
            out,
            "  {:<22} {}:{} status={} expected={:?}@{:?} credited={:?}@{:?}",
            f.problem,
            f.provider,
            f.payment_id,
            f.status.as_deref().unwrap_or("unknown"),
            f.expected_amount,
            f.expected_wallet,
            f.credited_amount,
            f.credited_wallet
        );
    }
    out
}
