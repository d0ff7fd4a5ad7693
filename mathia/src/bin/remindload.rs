//! Load generator for the scheduler: `--reminders` reminders spread over
//! `--spread` seconds, each owner listening on the WebSocket user stream;
//! lateness = notification frame received − the reminder's due time. Also
//! checks that every reminder rang exactly once. Runs against a `mathia serve`
//! child process (see `mathia::bench`).
//!
//! ```text
//! source scripts/services.sh && cargo build --release -p mathia --bins && target/release/remindload
//! ```

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Timelike, Utc};
use clap::Parser;
use futures::StreamExt;
use hdrhistogram::Histogram;
use mathia::bench::{Server, Services};
use serde_json::{Value, json};
use yawc::OpCode;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(about = "Reminder firing lateness: due time → notification pushed")]
struct Args {
    /// Reminders.
    #[arg(long, default_value_t = 10_000)]
    reminders: usize,
    /// Seconds over which their due times are spread.
    #[arg(long, default_value_t = 60)]
    spread: u64,
    /// Owners (each listening on one WebSocket).
    #[arg(long, default_value_t = 100)]
    users: usize,
    /// Seconds from now to the first due time (setting them all up must fit in it).
    #[arg(long, default_value_t = 40)]
    lead: u64,
    /// Admin connection string; the benchmark creates and drops its own database.
    #[arg(
        long,
        env = "MATHIA_TEST_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    admin_database_url: String,
    /// NATS.
    #[arg(long, env = "MATHIA_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    /// Redis.
    #[arg(
        long,
        env = "MATHIA_REDIS_URL",
        default_value = "redis://127.0.0.1:6379"
    )]
    redis_url: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let server = Server::start(
        &Services {
            admin_database_url: &args.admin_database_url,
            nats_url: &args.nats_url,
            redis_url: &args.redis_url,
        },
        &[],
    )
    .await?;
    let result = run(&args, &server).await;
    server.stop().await?;
    result
}

async fn run(args: &Args, server: &Server) -> anyhow::Result<()> {
    let users: Vec<(uuid::Uuid, String)> = futures::stream::iter(0..args.users)
        .map(|i| server.user(i))
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<_>>()?;
    // content → due; frames → lateness.
    let due: Arc<Mutex<HashMap<String, DateTime<Utc>>>> = Arc::default();
    let rang: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let hist = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(
        1,
        600_000_000,
        3,
    )?));
    let stop = tokio_util::sync::CancellationToken::new();
    let mut readers = vec![];
    for (_, token) in &users {
        let mut ws = server.open(token, "user").await?;
        let (due, rang, hist, stop) = (due.clone(), rang.clone(), hist.clone(), stop.clone());
        readers.push(tokio::spawn(async move {
            loop {
                let f = tokio::select! {
                    _ = stop.cancelled() => return,
                    f = ws.next() => f,
                };
                let Some(f) = f else { return };
                if f.opcode() != OpCode::Text {
                    continue;
                }
                let now = Utc::now();
                let Ok(v) = serde_json::from_str::<Value>(f.as_str()) else {
                    continue;
                };
                if v["kind"] != "NotificationCreated" {
                    continue;
                }
                let Some(title) = v["data"]["title"].as_str() else {
                    continue;
                };
                *rang
                    .lock()
                    .expect("lock")
                    .entry(title.to_owned())
                    .or_default() += 1;
                if let Some(d) = due.lock().expect("lock").get(title) {
                    let us = (now - *d).num_microseconds().unwrap_or(0).max(1) as u64;
                    let _ = hist.lock().expect("lock").record(us);
                }
            }
        }));
    }
    let first = (Utc::now() + chrono::Duration::seconds(args.lead as i64))
        .with_nanosecond(0)
        .unwrap_or_else(Utc::now);
    eprintln!(
        "setting {} reminders due from {first} over {} s…",
        args.reminders, args.spread
    );
    let started = std::time::Instant::now();
    let spread_ms = args.spread as i64 * 1000;
    futures::stream::iter(0..args.reminders)
        .map(|i| {
            let (due, token) = (due.clone(), users[i % users.len()].1.clone());
            async move {
                // Whole seconds, as reminders are kept; spread evenly over the window.
                let at = (first
                    + chrono::Duration::milliseconds(spread_ms * i as i64 / args.reminders as i64))
                .with_nanosecond(0)
                .unwrap_or(first);
                let content = format!("r{i}");
                due.lock().expect("lock").insert(content.clone(), at);
                server
                    .post(
                        "/v1/reminders",
                        Some(&token),
                        &json!({"content": content, "due_at": at}),
                    )
                    .await
            }
        })
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<Vec<_>>>()?;
    let setup = started.elapsed();
    anyhow::ensure!(
        Utc::now() < first,
        "setting up took {setup:?}, longer than --lead; raise it"
    );
    eprintln!(
        "set up in {:.1} s; waiting for them to ring…",
        setup.as_secs_f64()
    );
    let end = first + chrono::Duration::seconds(args.spread as i64 + 10);
    while Utc::now() < end {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if rang.lock().expect("lock").len() == args.reminders {
            break;
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.cancel();
    for r in readers {
        let _ = r.await;
    }
    let rang = rang.lock().expect("lock");
    let twice = rang.values().filter(|n| **n > 1).count();
    let h = hist.lock().expect("lock");
    println!(
        "reminders: {} set ({} users, {:.0}/s), due over {} s",
        args.reminders,
        args.users,
        args.reminders as f64 / setup.as_secs_f64(),
        args.spread
    );
    println!(
        "  rang {} of {} ({} more than once)",
        rang.len(),
        args.reminders,
        twice
    );
    println!(
        "  lateness due→notification frame: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms (target p99 ≤ 1,000 ms)",
        h.value_at_quantile(0.5) as f64 / 1000.0,
        h.value_at_quantile(0.99) as f64 / 1000.0,
        h.max() as f64 / 1000.0
    );
    Ok(())
}
