//! Load generator for realtime: WebSocket delivery latency, memory per idle
//! connection, and fan-out, against a `mathia serve` child process.
//!
//! The server runs as its own process (the `mathia` binary next to this one),
//! so its memory is measured apart from the clients': `VmRSS` of the server
//! before and after the idle connections are opened. Phases:
//! 1. delivery: `--clients` connections, `--members` per room, each subscribed
//!    to its room; messages are sent through the HTTP API open-loop at `--rate`
//!    per second for `--seconds`; for every frame received, latency = frame
//!    received − the sender's HTTP answer (what a user sees: "sent" to "arrived");
//! 2. idle: `--idle` more connections, authenticated and subscribed to their
//!    user stream, doing nothing; RSS growth per connection;
//! 3. fan-out: every client joins one room; `--fanout-messages` messages, one at
//!    a time; for each, the time until the last of the subscribers has it.
//!
//! ```text
//! source scripts/services.sh && cargo build --release -p mathia --bins && target/release/wsload
//! ```

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use futures::StreamExt;
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use uuid::Uuid;
use yawc::OpCode;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(about = "WebSocket delivery latency, memory per idle connection and fan-out")]
struct Args {
    /// Subscribed clients in the delivery phase (one user each).
    #[arg(long, default_value_t = 1000)]
    clients: usize,
    /// Members per room.
    #[arg(long, default_value_t = 10)]
    members: usize,
    /// Messages per second, all rooms together.
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// Seconds of the delivery phase.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Extra idle connections.
    #[arg(long, default_value_t = 10_000)]
    idle: usize,
    /// Messages of the fan-out phase.
    #[arg(long, default_value_t = 30)]
    fanout_messages: usize,
    /// Admin connection string; the benchmark creates and drops its own database.
    #[arg(
        long,
        env = "MATHIA_TEST_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    admin_database_url: String,
    /// NATS (≥ 2.10 with JetStream).
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

use mathia::bench::{Server, Services, Socket};

/// When each message's HTTP answer came back.
type Answered = Arc<Mutex<HashMap<String, Instant>>>;

/// Read `ws` until `stop`, recording answer→frame latencies of MessagePosted events.
fn reader(
    mut ws: Socket,
    answered: Answered,
    hist: Arc<Mutex<Histogram<u64>>>,
    last_seen: Arc<Mutex<HashMap<String, (usize, Instant)>>>,
    stop: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let f = tokio::select! {
                _ = stop.cancelled() => return,
                f = ws.next() => f,
            };
            let Some(f) = f else { return };
            if f.opcode() != OpCode::Text {
                continue;
            }
            let now = Instant::now();
            let Ok(v) = serde_json::from_str::<Value>(f.as_str()) else {
                continue;
            };
            if v["type"] != "event" || v["kind"] != "MessagePosted" {
                continue;
            }
            let Some(id) = v["data"]["message_id"].as_str() else {
                continue;
            };
            {
                let mut seen = last_seen.lock().expect("lock");
                let e = seen.entry(id.to_owned()).or_insert((0, now));
                e.0 += 1;
                e.1 = now;
            }
            // The frame may come before the sender has read its answer: then wait for it.
            for _ in 0..200 {
                let at = answered.lock().expect("lock").get(id).copied();
                if let Some(at) = at {
                    let us = now.saturating_duration_since(at).as_micros() as u64;
                    let _ = hist.lock().expect("lock").record(us.max(1));
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    })
}

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.members >= 2 && args.clients >= args.members,
        "need at least one room of 2"
    );
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
    eprintln!(
        "setting up {} users in rooms of {}…",
        args.clients, args.members
    );
    let users: Vec<(Uuid, String)> = futures::stream::iter(0..args.clients)
        .map(|i| server.user(i))
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<_>>()?;
    let rooms: Vec<(Uuid, Vec<usize>)> =
        futures::stream::iter(users.chunks(args.members).enumerate())
            .map(|(r, members)| async move {
                let owner = &members[0].1;
                let room = server
                    .post(
                        "/v1/rooms",
                        Some(owner),
                        &json!({"name": format!("room {r}")}),
                    )
                    .await?;
                let room: Uuid = room["room_id"].as_str().context("room")?.parse()?;
                for (user, token) in &members[1..] {
                    server
                        .post(
                            &format!("/v1/rooms/{room}/invites"),
                            Some(owner),
                            &json!({"user_id": user}),
                        )
                        .await?;
                    server
                        .post(&format!("/v1/rooms/{room}/join"), Some(token), &json!({}))
                        .await?;
                }
                let idx = (r * args.members..r * args.members + members.len()).collect();
                anyhow::Ok((room, idx))
            })
            .buffer_unordered(8)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<anyhow::Result<_>>()?;
    // Let the read models catch up with the joins before subscribing.
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Phase 1: delivery latency.
    let answered: Answered = Arc::default();
    let hist = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(
        1, 60_000_000, 3,
    )?));
    let last_seen = Arc::new(Mutex::new(HashMap::new()));
    let stop = tokio_util::sync::CancellationToken::new();
    let mut readers = vec![];
    for (room, members) in &rooms {
        for &m in members {
            let ws = server.open(&users[m].1, &format!("room:{room}")).await?;
            readers.push(reader(
                ws,
                answered.clone(),
                hist.clone(),
                last_seen.clone(),
                stop.clone(),
            ));
        }
    }
    let rss_subscribed = server.rss_kib();
    eprintln!(
        "{} clients subscribed; sending {} msgs/s for {} s…",
        readers.len(),
        args.rate,
        args.seconds
    );
    let interval = Duration::from_secs_f64(1.0 / args.rate as f64);
    let start = Instant::now();
    let mut sent = 0u64;
    let mut inflight = futures::stream::FuturesUnordered::new();
    let mut failures = 0u64;
    while start.elapsed() < Duration::from_secs(args.seconds) {
        let due = start + interval * sent as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            tokio::time::sleep(wait).await;
        }
        let (room, members) = &rooms[sent as usize % rooms.len()];
        let sender = &users[members[(sent as usize / rooms.len()) % members.len()]].1;
        let answered = answered.clone();
        let path = format!("/v1/rooms/{room}/messages");
        inflight.push(async move {
            let r = server
                .post(
                    &path,
                    Some(sender),
                    &json!({"body": format!("ping {sent} from the bench")}),
                )
                .await;
            if let Ok(v) = &r
                && let Some(id) = v["message_id"].as_str()
            {
                answered
                    .lock()
                    .expect("lock")
                    .insert(id.to_owned(), Instant::now());
            }
            r.is_ok()
        });
        sent += 1;
        while let Some(Some(ok)) = futures::FutureExt::now_or_never(inflight.next()) {
            failures += u64::from(!ok);
        }
    }
    while let Some(ok) = inflight.next().await {
        failures += u64::from(!ok);
    }
    let send_secs = start.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let expected = (sent - failures) * args.members as u64;
    let delivered: u64 = last_seen
        .lock()
        .expect("lock")
        .values()
        .map(|(n, _)| *n as u64)
        .sum();
    {
        let h = hist.lock().expect("lock");
        println!(
            "delivery: {} clients, {} rooms of {}",
            readers.len(),
            rooms.len(),
            args.members
        );
        println!(
            "  sent {sent} messages in {send_secs:.1} s ({:.0}/s, {failures} failed); frames {delivered} of {expected}",
            sent as f64 / send_secs
        );
        println!(
            "  answer→frame latency p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (target p99 ≤ 100 ms at 1,000 msgs/s)",
            ms(&h, 0.5),
            ms(&h, 0.99),
            h.max() as f64 / 1000.0
        );
    }

    // Phase 2: idle connections.
    let before = server.rss_kib();
    let mut idle = Vec::with_capacity(args.idle);
    let t = Instant::now();
    for i in 0..args.idle {
        match server.open(&users[i % users.len()].1, "user").await {
            Ok(ws) => idle.push(ws),
            Err(e) => {
                eprintln!("idle connection {i} failed: {e:#}");
                break;
            }
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = server.rss_kib();
    println!(
        "idle: {} connections held (opened in {:.1} s)",
        idle.len(),
        t.elapsed().as_secs_f64()
    );
    println!(
        "  server RSS {before} KiB → {after} KiB: {:.1} KiB per idle connection (target ≤ 30 KiB); {} KiB with the delivery clients subscribed",
        (after.saturating_sub(before)) as f64 / idle.len().max(1) as f64,
        rss_subscribed
    );
    drop(idle);
    stop.cancel();
    for r in readers {
        let _ = r.await;
    }

    // Phase 3: fan-out to every client in one room.
    let (owner_id, owner) = &users[0];
    let big = server
        .post("/v1/rooms", Some(owner), &json!({"name": "everyone"}))
        .await?;
    let big: Uuid = big["room_id"].as_str().context("room")?.parse()?;
    futures::stream::iter(users.iter().filter(|(u, _)| u != owner_id))
        .map(|(u, token)| async move {
            server
                .post(
                    &format!("/v1/rooms/{big}/invites"),
                    Some(owner),
                    &json!({"user_id": u}),
                )
                .await?;
            server
                .post(&format!("/v1/rooms/{big}/join"), Some(token), &json!({}))
                .await
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<Vec<_>>>()?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let answered: Answered = Arc::default();
    let per_frame = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(
        1, 60_000_000, 3,
    )?));
    let last_seen = Arc::new(Mutex::new(HashMap::new()));
    let stop = tokio_util::sync::CancellationToken::new();
    let mut readers = vec![];
    for (_, token) in &users {
        let ws = server.open(token, &format!("room:{big}")).await?;
        readers.push(reader(
            ws,
            answered.clone(),
            per_frame.clone(),
            last_seen.clone(),
            stop.clone(),
        ));
    }
    let mut all = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for i in 0..args.fanout_messages {
        let v = server
            .post(
                &format!("/v1/rooms/{big}/messages"),
                Some(owner),
                &json!({"body": format!("to all {i}")}),
            )
            .await?;
        let id = v["message_id"].as_str().context("id")?.to_owned();
        let at = Instant::now();
        answered.lock().expect("lock").insert(id.clone(), at);
        let deadline = at + Duration::from_secs(10);
        loop {
            let done = last_seen.lock().expect("lock").get(&id).copied();
            if let Some((n, last)) = done
                && n == readers.len()
            {
                let _ = all.record(last.saturating_duration_since(at).as_micros().max(1) as u64);
                break;
            }
            if Instant::now() > deadline {
                eprintln!("message {i}: not everyone got it within 10 s");
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    stop.cancel();
    {
        let h = per_frame.lock().expect("lock");
        println!(
            "fan-out: 1 room, {} subscribers, {} messages",
            readers.len(),
            args.fanout_messages
        );
        println!(
            "  answer→every subscriber p50 {:.1} ms, p99 {:.1} ms; answer→one frame p50 {:.1} ms, p99 {:.1} ms",
            ms(&all, 0.5),
            ms(&all, 0.99),
            ms(&h, 0.5),
            ms(&h, 0.99)
        );
    }
    Ok(())
}
