//! Load generator for the spine: transfers through the HTTP API, end to end.
//!
//! Starts the whole backend in this process against a fresh database, funds
//! 1,000 wallets, then:
//! 1. baseline: single-event INSERT transactions into an events-like table from
//!    32 connections (this machine's raw Postgres commit rate);
//! 2. saturation: as many transfers as the system takes, between uniformly random
//!    pairs, from many concurrent clients, for `--seconds`;
//! 3. half rate: an open-loop schedule at half the saturation rate, for `--seconds`.
//!
//! For each phase it prints committed transfers/s, p50/p99 of the command answer,
//! and p50/p99 of projection visibility (request sent → the wallet read model's
//! checkpoint has passed the transfer's position).
//!
//! ```text
//! scripts/services.sh && cargo run --release -p mathia --bin loadgen -- --seconds 20
//! ```
//!
//! `--chat` runs the chat benchmark instead (module [`chat`]): the saturation
//! phase above as the same-run baseline, then message sends, timeline pages and
//! search with 1,000,000 messages in the store. `--itinerary` (module
//! [`itinerary`]) and `--fees` (module [`fees`]) do the same for item writes and
//! itinerary reads, and for transfers with a fee leg and a daily limit.

// Not `src/bin/chat.rs`: Cargo would take that for a binary of its own.
#[path = "loadgen/chat.rs"]
mod chat;
#[path = "loadgen/fees.rs"]
mod fees;
#[path = "loadgen/itinerary.rs"]
mod itinerary;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use base64::Engine as _;
use clap::Parser;
use futures::StreamExt as _;
use hdrhistogram::Histogram;
use mathia::bench::db_url;
use mathia::{Config, Roles};
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Setup requests (registrations, wallets, trips, limits) in flight at once.
const SETUP_IN_FLIGHT: usize = 64;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(about = "Drive transfers through the HTTP API and report throughput and latency")]
struct Args {
    /// Seconds per measured phase.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Funded wallets (one user each).
    #[arg(long, default_value_t = 1000)]
    wallets: usize,
    /// Concurrent clients in the saturation phase.
    #[arg(long, default_value_t = 256)]
    clients: usize,
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
    /// Diagnostic: instead of measuring transfers only, first saturate `GET <path>`
    /// (e.g. /healthz, /v1/me) to see the HTTP stack's own ceiling.
    #[arg(long)]
    probe: Option<String>,
    /// Diagnostic: turn the rate limits off (no Redis round trip per request).
    #[arg(long)]
    without_rate_limits: bool,
    /// Diagnostic: run only the gateway and the handlers (no relay, no projections).
    #[arg(long)]
    without_pipeline: bool,
    /// Diagnostic: run the handlers, relay and projector on threads of their own (`MATHIA_ROLE_THREADS`).
    #[arg(long)]
    role_threads: bool,
    /// Print the handlers' batch metrics after the saturation phase.
    #[arg(long)]
    show_metrics: bool,
    /// Chat benchmark: transfer saturation as the baseline, then 100 rooms × 10
    /// members, message sends, and timeline/search reads over `--chat-store` messages.
    #[arg(long)]
    chat: bool,
    /// Messages seeded into the read model (and keystore) for the read phases.
    #[arg(long, default_value_t = 1_000_000)]
    chat_store: usize,
    /// Itinerary benchmark: transfer saturation as the baseline, then item writes
    /// into one trip per user, and detail reads (trips of 100 items) and "my
    /// itineraries" reads (one user with `--itinerary-list` trips).
    #[arg(long)]
    itinerary: bool,
    /// Itineraries of the one user whose list is read.
    #[arg(long, default_value_t = 10_000)]
    itinerary_list: usize,
    /// Fees benchmark: transfer saturation as the baseline, then transfers with a
    /// fee leg and a daily spend limit on every wallet.
    #[arg(long)]
    fees: bool,
    /// Requests per read phase (timeline, search; itinerary detail, list).
    #[arg(long, alias = "chat-reads", default_value_t = 4000)]
    reads: usize,
    /// Concurrent clients of the read phases (closed loop: latency is measured at
    /// the load these clients make, not at saturation).
    #[arg(long, alias = "chat-read-clients", default_value_t = 8)]
    read_clients: usize,
    /// Keep the benchmark's database at the end (to EXPLAIN its queries); prints its name.
    #[arg(long)]
    keep_database: bool,
}

struct Client {
    http: reqwest::Client,
    base: String,
}

impl Client {
    /// A client of the gateway at `base`, once it answers `/healthz` (or 10 s have passed).
    async fn ready(base: String) -> anyhow::Result<Arc<Client>> {
        let client = Arc::new(Client {
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(1024)
                .build()?,
            base,
        });
        for _ in 0..200 {
            if client
                .http
                .get(format!("{}/healthz", client.base))
                .send()
                .await
                .is_ok()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(client)
    }

    async fn post(
        &self,
        path: &str,
        token: Option<&str>,
        body: &Value,
        key: Option<&str>,
    ) -> anyhow::Result<(u16, Value)> {
        self.send(reqwest::Method::POST, path, token, body, key)
            .await
    }

    /// `method` with a JSON `body` (and an `Idempotency-Key`); the status and the JSON answer.
    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: &Value,
        key: Option<&str>,
    ) -> anyhow::Result<(u16, Value)> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .json(body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(k) = key {
            req = req.header("idempotency-key", k);
        }
        let res = req.send().await?;
        let status = res.status().as_u16();
        Ok((status, res.json().await.unwrap_or(Value::Null)))
    }

    /// A read, timed from sending to the last byte of the answer (the server's
    /// latency as the client sees it), then read for what the readers need:
    /// a non-200 answer is an error naming it.
    async fn timed_read(&self, path: &str, token: &str) -> anyhow::Result<(PageHead, Duration)> {
        let sent = Instant::now();
        let res = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(token)
            .send()
            .await?;
        let status = res.status().as_u16();
        let bytes = res.bytes().await?;
        let took = sent.elapsed();
        anyhow::ensure!(
            status == 200,
            "{path} answered {status}: {}",
            String::from_utf8_lossy(&bytes[..bytes.len().min(300)])
        );
        Ok((serde_json::from_slice(&bytes)?, took))
    }
}

/// What the readers need of an answer: how many items and its cursors. Every
/// other field is skipped unparsed (`IgnoredAny`): the load generator runs on
/// the same two cores and the same runtime as the server, and building a
/// `serde_json::Value` of each 60 KB itinerary was a third of all CPU samples
/// of the detail phase (`perf record -a`, 2026-12-02).
#[derive(Debug, Default, serde::Deserialize)]
struct PageHead {
    #[serde(default)]
    items: Vec<serde::de::IgnoredAny>,
    #[serde(default)]
    next: Option<String>,
    #[serde(default)]
    prev: Option<String>,
}

/// Load of the measured phases of `--chat`, `--itinerary` and `--fees`.
struct Load {
    seconds: u64,
    clients: usize,
    reads: usize,
    read_clients: usize,
}

struct Wallet {
    token: String,
    wallet: Uuid,
    user: Uuid,
}

/// Transfers whose visibility is not yet observed: (position, sent at).
type Pending = Arc<Mutex<Vec<(i64, Instant)>>>;

struct Phase {
    answered: AtomicU64,
    failed: AtomicU64,
    answer: std::sync::Mutex<Histogram<u64>>,
    visible: std::sync::Mutex<Histogram<u64>>,
    /// The first failure's status and body (or error), for the report.
    first_failure: std::sync::Mutex<Option<String>>,
}

impl Phase {
    fn new() -> Arc<Phase> {
        let h = || std::sync::Mutex::new(histogram());
        Arc::new(Phase {
            answered: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            answer: h(),
            visible: h(),
            first_failure: std::sync::Mutex::new(None),
        })
    }

    /// POST one write and count it: a 201 is answered (its latency recorded,
    /// its position left in `pending` for the visibility watcher), anything
    /// else failed.
    async fn post(
        &self,
        client: &Client,
        path: &str,
        token: &str,
        body: &Value,
        key: Option<&str>,
        pending: &Pending,
    ) {
        let sent = Instant::now();
        match client.post(path, Some(token), body, key).await {
            Ok((201, answer)) => {
                self.answer
                    .lock()
                    .expect("histogram")
                    .record(sent.elapsed().as_micros() as u64)
                    .ok();
                self.answered.fetch_add(1, Ordering::Relaxed);
                if let Some(p) = answer["position"].as_i64() {
                    pending.lock().await.push((p, sent));
                }
            }
            other => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                let mut f = self.first_failure.lock().expect("failure");
                if f.is_none() {
                    *f = Some(match other {
                        Ok((s, b)) => format!("{s} {b}"),
                        Err(e) => format!("{e:#}"),
                    });
                }
            }
        }
    }

    fn report(&self, name: &str, elapsed: Duration) -> f64 {
        self.report_as(name, "transfers", elapsed)
    }

    /// [`Phase::report`] counting `unit` (e.g. `messages`).
    fn report_as(&self, name: &str, unit: &str, elapsed: Duration) -> f64 {
        let n = self.answered.load(Ordering::Relaxed);
        let rate = n as f64 / elapsed.as_secs_f64();
        let a = self.answer.lock().expect("histogram");
        let v = self.visible.lock().expect("histogram");
        let ms = |us: u64| us as f64 / 1000.0;
        println!(
            "{name:<12} {rate:>9.0} {unit}/s  answer p50 {:>6.1} ms  p99 {:>6.1} ms  visible p50 {:>6.1} ms  p99 {:>6.1} ms  ({} ok, {} failed)",
            ms(a.value_at_quantile(0.5)),
            ms(a.value_at_quantile(0.99)),
            ms(v.value_at_quantile(0.5)),
            ms(v.value_at_quantile(0.99)),
            n,
            self.failed.load(Ordering::Relaxed)
        );
        if let Some(f) = self.first_failure.lock().expect("failure").as_ref() {
            println!("  first failure: {f}");
        }
        rate
    }
}

/// One transfer of `amount` between a uniformly random pair of wallets.
async fn transfer(
    client: &Client,
    wallets: &[Wallet],
    amount: i64,
    phase: &Phase,
    pending: &Pending,
) {
    let (i, j) = loop {
        let i = rand::random_range(0..wallets.len());
        let j = rand::random_range(0..wallets.len());
        if i != j {
            break (i, j);
        }
    };
    let body = json!({"from_wallet": wallets[i].wallet, "to_user": wallets[j].user, "amount": amount, "currency": "KES"});
    let key = Uuid::now_v7().to_string();
    phase
        .post(
            client,
            "/v1/transfers",
            &wallets[i].token,
            &body,
            Some(&key),
            pending,
        )
        .await;
}

/// `clients` concurrent clients each repeat `one` until `seconds` have passed;
/// returns how long they took (the last requests end after the deadline).
async fn closed_loop<F, Fut>(clients: usize, seconds: u64, one: F) -> anyhow::Result<Duration>
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send,
{
    let one = Arc::new(one);
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let workers: Vec<_> = (0..clients)
        .map(|_| {
            let one = one.clone();
            tokio::spawn(async move {
                while Instant::now() < deadline {
                    one().await;
                }
            })
        })
        .collect();
    for w in workers {
        w.await?;
    }
    Ok(started.elapsed())
}

/// A measured saturation phase of writes: [`closed_loop`] over `one`, with
/// visibility watched on projector `model`'s checkpoint (bounded wait for the
/// last ones after the phase); prints the phase's line and returns committed
/// `unit`/s and how many were answered.
async fn write_phase<F, Fut>(
    name: &str,
    unit: &str,
    model: &'static str,
    database_url: &str,
    clients: usize,
    seconds: u64,
    one: F,
) -> anyhow::Result<(f64, u64)>
where
    F: Fn(Arc<Phase>, Pending) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send,
{
    let pending: Pending = Arc::new(Mutex::new(Vec::new()));
    let phase = Phase::new();
    let stop = CancellationToken::new();
    let watcher = tokio::spawn(watch_visibility(
        model,
        database_url.to_owned(),
        pending.clone(),
        Arc::new(std::sync::Mutex::new(phase.clone())),
        stop.clone(),
    ));
    let (p, q) = (phase.clone(), pending.clone());
    let elapsed = closed_loop(clients, seconds, move || one(p.clone(), q.clone())).await?;
    let settle = Instant::now() + Duration::from_secs(10);
    while !pending.lock().await.is_empty() && Instant::now() < settle {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.cancel();
    let _ = watcher.await;
    let rate = phase.report_as(name, unit, elapsed);
    Ok((rate, phase.answered.load(Ordering::Relaxed)))
}

/// Latency histogram in microseconds.
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds")
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "NOT met" }
}

/// Wait until every projector in `models` has caught up with the store's head.
async fn caught_up(conn: &mut PgConnection, models: &[&str]) -> anyhow::Result<()> {
    let head: i64 = sqlx::query_scalar("SELECT position FROM event_log_head")
        .fetch_one(&mut *conn)
        .await?;
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let behind: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM proj_checkpoints WHERE model = ANY($1) AND position < $2",
        )
        .bind(models)
        .bind(head)
        .fetch_one(&mut *conn)
        .await?;
        let present: i64 =
            sqlx::query_scalar("SELECT count(*) FROM proj_checkpoints WHERE model = ANY($1)")
                .bind(models)
                .fetch_one(&mut *conn)
                .await?;
        if behind == 0 && present == models.len() as i64 {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "projectors {models:?} did not reach position {head}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Wait until every running projector has caught up with the store's head.
async fn all_caught_up(conn: &mut PgConnection) -> anyhow::Result<()> {
    let models: Vec<String> = sqlx::query_scalar("SELECT model FROM proj_checkpoints")
        .fetch_all(&mut *conn)
        .await?;
    let models: Vec<&str> = models.iter().map(String::as_str).collect();
    caught_up(conn, &models).await
}

/// One read request: its kind, how long it took, how many items it returned.
type Sample = (&'static str, Duration, usize);

/// A client of a read phase, with what it carries from one request to the next.
trait Reader: Send + 'static {
    /// Make one request.
    fn read(&mut self) -> impl Future<Output = anyhow::Result<Sample>> + Send;
}

/// Closed-loop reads: `reads` requests (after a warm-up of a tenth as many)
/// from `clients` readers made by `reader`; latency by kind of request.
async fn read_phase<R: Reader>(
    reads: usize,
    clients: usize,
    reader: impl Fn() -> R,
) -> anyhow::Result<ReadStats> {
    let stats: Arc<std::sync::Mutex<ReadStats>> = Arc::default();
    for (measured, total) in [(false, reads / 10), (true, reads)] {
        let left = Arc::new(AtomicUsize::new(total));
        let started = Instant::now();
        let workers: Vec<_> = (0..clients)
            .map(|_| {
                let (mut r, left, stats) = (reader(), left.clone(), stats.clone());
                tokio::spawn(async move {
                    while left
                        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                        .is_ok()
                    {
                        let (kind, took, items) = r.read().await?;
                        if measured {
                            stats.lock().expect("stats").record(kind, took, items);
                        }
                    }
                    anyhow::Ok(())
                })
            })
            .collect();
        for w in workers {
            w.await??;
        }
        if measured {
            stats.lock().expect("stats").elapsed = started.elapsed();
        }
    }
    let s = std::mem::take(&mut *stats.lock().expect("stats"));
    Ok(s)
}

/// Open-loop reads: `reads` requests on a fixed schedule of `rate` per second,
/// served by up to `readers` readers made by `reader`. Each is timed from the
/// moment the schedule gives it, so a request that waits for a free reader or
/// behind a slow one counts its wait (no coordinated omission). This is the
/// latency at a stated load, as the spine's half-rate phase measures answers.
async fn paced_read_phase<R: Reader>(
    reads: usize,
    rate: f64,
    readers: usize,
    reader: impl Fn() -> R,
) -> anyhow::Result<ReadStats> {
    let pool = Arc::new(std::sync::Mutex::new(
        (0..readers).map(|_| reader()).collect::<Vec<R>>(),
    ));
    let free = Arc::new(tokio::sync::Semaphore::new(readers));
    let stats: Arc<std::sync::Mutex<ReadStats>> = Arc::default();
    let interval = Duration::from_secs_f64(1.0 / rate.max(1.0));
    let started = Instant::now();
    let mut requests = Vec::with_capacity(reads);
    for i in 0..reads {
        let due = started + interval.mul_f64(i as f64);
        tokio::time::sleep_until(due.into()).await;
        let (pool, free, stats) = (pool.clone(), free.clone(), stats.clone());
        requests.push(tokio::spawn(async move {
            let _turn = free.acquire().await?;
            let mut r = pool
                .lock()
                .expect("readers")
                .pop()
                .context("a reader for every permit")?;
            let read = r.read().await;
            pool.lock().expect("readers").push(r);
            let (kind, _, items) = read?;
            stats
                .lock()
                .expect("stats")
                .record(kind, due.elapsed(), items);
            anyhow::Ok(())
        }));
    }
    for r in requests {
        r.await??;
    }
    stats.lock().expect("stats").elapsed = started.elapsed();
    let s = std::mem::take(&mut *stats.lock().expect("stats"));
    Ok(s)
}

/// Read latencies by request kind ("" = all), with the items they returned.
#[derive(Default)]
struct ReadStats {
    by_kind: BTreeMap<&'static str, (Histogram<u64>, u64)>,
    elapsed: Duration,
}

impl ReadStats {
    fn record(&mut self, kind: &'static str, took: Duration, items: usize) {
        let us = took.as_micros() as u64;
        for k in ["", kind] {
            let e = self.by_kind.entry(k).or_insert_with(|| (histogram(), 0));
            e.0.record(us).ok();
            e.1 += items as u64;
        }
    }

    /// Requests per second over the phase.
    fn rate(&self) -> f64 {
        let n = self.by_kind.get("").map_or(0, |(h, _)| h.len());
        n as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

fn report_reads(name: &str, stats: &ReadStats, target_ms: f64, unit: &str) {
    let Some((all, _)) = stats.by_kind.get("") else {
        return;
    };
    let p99 = ms(all.value_at_quantile(0.99));
    println!(
        "{name:<12} {:>9.0} requests/s  p50 {:>6.1} ms  p99 {p99:>6.1} ms  max {:>6.1} ms  ({} requests; target p99 ≤ {target_ms} ms: {})",
        stats.rate(),
        ms(all.value_at_quantile(0.5)),
        ms(all.max()),
        all.len(),
        verdict(p99 <= target_ms)
    );
    for (kind, (h, items)) in stats.by_kind.iter().filter(|(k, _)| !k.is_empty()) {
        println!(
            "  {kind:<14} p50 {:>6.1} ms  p99 {:>6.1} ms  ({} requests, {:.1} {unit})",
            ms(h.value_at_quantile(0.5)),
            ms(h.value_at_quantile(0.99)),
            h.len(),
            *items as f64 / h.len().max(1) as f64
        );
    }
}

/// Watch projector `model`'s checkpoint and record when each pending position becomes visible.
async fn watch_visibility(
    model: &'static str,
    database_url: String,
    pending: Pending,
    phase: Arc<std::sync::Mutex<Arc<Phase>>>,
    stop: CancellationToken,
) {
    let Ok(mut conn) = PgConnection::connect(&database_url).await else {
        return;
    };
    while !stop.is_cancelled() {
        let cp: i64 = sqlx::query_scalar("SELECT position FROM proj_checkpoints WHERE model = $1")
            .bind(model)
            .fetch_optional(&mut conn)
            .await
            .ok()
            .flatten()
            .unwrap_or(0);
        let now = Instant::now();
        let current = phase.lock().expect("phase").clone();
        let mut p = pending.lock().await;
        p.retain(|(pos, sent)| {
            if *pos <= cp {
                current
                    .visible
                    .lock()
                    .expect("histogram")
                    .record(now.duration_since(*sent).as_micros() as u64)
                    .ok();
                false
            } else {
                true
            }
        });
        drop(p);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Raw baseline: single-event INSERT transactions from 32 connections.
async fn baseline(database_url: &str, seconds: u64) -> anyhow::Result<f64> {
    let mut conn = PgConnection::connect(database_url).await?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS bench_raw_events (position BIGSERIAL PRIMARY KEY, event_id UUID NOT NULL UNIQUE,
         stream_id TEXT NOT NULL, version BIGINT NOT NULL, event_type TEXT NOT NULL, payload JSONB NOT NULL,
         occurred_at TIMESTAMPTZ NOT NULL DEFAULT now(), UNIQUE (stream_id, version))",
    )
    .execute(&mut conn)
    .await?;
    let count = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = vec![];
    for c in 0..32 {
        let url = database_url.to_owned();
        let count = count.clone();
        tasks.push(tokio::spawn(async move {
            let mut conn = PgConnection::connect(&url).await?;
            let mut v = 0i64;
            while Instant::now() < deadline {
                v += 1;
                sqlx::query("INSERT INTO bench_raw_events (event_id, stream_id, version, event_type, payload) VALUES ($1, $2, $3, 'Credited', $4)")
                    .bind(Uuid::now_v7())
                    .bind(format!("bench.account.{c}"))
                    .bind(v)
                    .bind(json!({"amount": 1, "balance_after": v}))
                    .execute(&mut conn)
                    .await?;
                count.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(count.load(Ordering::Relaxed) as f64 / seconds as f64)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let db = format!("mathia_bench_{}", Uuid::new_v4().simple());
    let mut admin = PgConnection::connect(&args.admin_database_url)
        .await
        .context("connecting to the admin database")?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db}")))
        .execute(&mut admin)
        .await?;
    let database_url = db_url(&args.admin_database_url, &db);
    let prefix = format!("bench{}", &Uuid::new_v4().simple().to_string()[..8]);
    let master = commands::crypto::Key::random();
    let config = Config {
        database_url: database_url.clone(),
        nats_url: args.nats_url.clone(),
        redis_url: args.redis_url.clone(),
        listen: "127.0.0.1:0".into(),
        jwt_secret: Some("YmVuY2htYXJrLW9ubHktc2VjcmV0LWJlbmNobWFyay1vbmx5LXNlY3JldA==".into()),
        nats_prefix: prefix.clone(),
        redis_prefix: format!("{prefix}:"),
        // The limits stay on (their Redis round trip is part of every request), just high.
        rate_limit_api_per_min: if args.without_rate_limits {
            0
        } else {
            10_000_000
        },
        rate_limit_anon_per_min: 10_000_000,
        command_timeout_ms: 5000,
        read_wait_ms: 2000,
        database_pool: 32,
        handler_batch: 512,
        // Logins are not what is measured; keep the 1,000 registrations quick.
        argon2_memory_kib: 1024,
        role_threads: args.role_threads,
        master_key: Some(base64::engine::general_purpose::STANDARD.encode(master.as_bytes())),
        chat_messages_per_min: 0,
        chat_messages_per_day: 0,
        searches_per_day: 0,
        uploads_per_day: 0,
        upload_max_bytes: 50 * 1024 * 1024,
        upload_dir: std::env::temp_dir().join(format!("mathia-loadgen-uploads-{prefix}")),
        ..Config::defaults()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let shutdown = CancellationToken::new();
    handlers::infra::migrate(&handlers::infra::connect_pg(&database_url, 2).await?).await?;
    let roles = if args.without_pipeline {
        Roles {
            relay: false,
            projections: false,
            ..Roles::ALL
        }
    } else {
        Roles::ALL
    };
    // `--fees` serves its phase from a second gateway configured with a fee.
    let fee_config = config.clone();
    let server = tokio::spawn(mathia::run(config, roles, Some(listener), shutdown.clone()));
    let client = Client::ready(base).await?;

    eprintln!("setting up {} funded wallets…", args.wallets);
    let pw = "Bench&Mark-2026";
    client
        .post(
            "/v1/auth/register",
            None,
            &json!({"email": "admin@bench.local", "password": pw, "display_name": "admin"}),
            None,
        )
        .await?;
    let bench_pool = handlers::infra::connect_pg(&database_url, 1).await?;
    gateway::auth::set_admin(&bench_pool, "admin@bench.local", true).await?;
    let (_, login) = client
        .post(
            "/v1/auth/login",
            None,
            &json!({"email": "admin@bench.local", "password": pw}),
            None,
        )
        .await?;
    let admin_token = login["access_token"]
        .as_str()
        .context("admin login")?
        .to_owned();
    // At most SETUP_IN_FLIGHT at once: on a busy machine a thousand at a time
    // outwait the command timeout (answered 202, no wallet id).
    let setup = futures::stream::iter(0..args.wallets).map(|i| {
        let client = client.clone();
        let admin_token = admin_token.clone();
        async move {
            let email = format!("u{i}@bench.local");
            let (_, user) = client
                .post(
                    "/v1/auth/register",
                    None,
                    &json!({"email": email, "password": pw, "display_name": "u"}),
                    None,
                )
                .await?;
            let (_, login) = client
                .post(
                    "/v1/auth/login",
                    None,
                    &json!({"email": email, "password": pw}),
                    None,
                )
                .await?;
            let token = login["access_token"].as_str().context("login")?.to_owned();
            let (_, w) = client
                .post(
                    "/v1/wallets",
                    Some(&token),
                    &json!({"currency": "KES"}),
                    None,
                )
                .await?;
            let wallet: Uuid = w["wallet_id"]
                .as_str()
                .with_context(|| format!("opening a wallet answered {w}"))?
                .parse()?;
            let (s, _) = client
                .post(
                    &format!("/v1/wallets/{wallet}/deposits"),
                    Some(&admin_token),
                    &json!({"amount": 100_000_000, "currency": "KES"}),
                    None,
                )
                .await?;
            anyhow::ensure!(s == 201, "deposit answered {s}");
            let user: Uuid = user["user_id"].as_str().context("user")?.parse()?;
            anyhow::Ok(Wallet {
                token,
                wallet,
                user,
            })
        }
    });
    let setup: Vec<anyhow::Result<Wallet>> = setup.buffered(SETUP_IN_FLIGHT).collect().await;
    let wallets: Arc<Vec<Wallet>> = Arc::new(setup.into_iter().collect::<anyhow::Result<_>>()?);

    if let Some(path) = &args.probe {
        let count = Arc::new(AtomicU64::new(0));
        let deadline = Instant::now() + Duration::from_secs(args.seconds);
        let workers: Vec<_> = (0..args.clients)
            .map(|i| {
                let (client, count, wallets, path) =
                    (client.clone(), count.clone(), wallets.clone(), path.clone());
                tokio::spawn(async move {
                    let token = &wallets[i % wallets.len()].token;
                    while Instant::now() < deadline {
                        if let Ok(r) = client
                            .http
                            .get(format!("{}{path}", client.base))
                            .bearer_auth(token)
                            .send()
                            .await
                            && r.status().is_success()
                            && r.bytes().await.is_ok()
                        {
                            count.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        for w in workers {
            w.await?;
        }
        println!(
            "probe        {:>9.0} GET {path}/s",
            count.load(Ordering::Relaxed) as f64 / args.seconds as f64
        );
    }

    // The chat and itinerary benchmarks build their stores first, so the
    // transfer baseline and their writes run against the same store.
    let chat = match args.chat {
        true => {
            Some(chat::prepare(&client, &wallets, &database_url, &master, args.chat_store).await?)
        }
        false => None,
    };
    let itinerary = match args.itinerary {
        true => {
            Some(itinerary::prepare(&client, &wallets, &database_url, args.itinerary_list).await?)
        }
        false => None,
    };
    let fees = match args.fees {
        true => Some(fees::Fees::start(fee_config, &shutdown).await?),
        false => None,
    };
    let only_spine = chat.is_none() && itinerary.is_none() && fees.is_none();
    let raw = if only_spine {
        eprintln!(
            "baseline: single-event INSERT transactions from 32 connections for {} s…",
            args.seconds
        );
        let raw = baseline(&database_url, args.seconds).await?;
        println!("baseline     {raw:>9.0} single-event INSERT transactions/s (32 connections)");
        raw
    } else {
        0.0
    };

    let pending: Pending = Arc::new(Mutex::new(Vec::new()));
    let current = Arc::new(std::sync::Mutex::new(Phase::new()));
    let watch_stop = CancellationToken::new();
    let watcher = tokio::spawn(watch_visibility(
        "wallet",
        database_url.clone(),
        pending.clone(),
        current.clone(),
        watch_stop.clone(),
    ));

    // Saturation: closed loop, many clients.
    let phase = Phase::new();
    *current.lock().expect("phase") = phase.clone();
    let elapsed = {
        let (client, wallets, phase, pending) = (
            client.clone(),
            wallets.clone(),
            phase.clone(),
            pending.clone(),
        );
        closed_loop(args.clients, args.seconds, move || {
            let (client, wallets, phase, pending) = (
                client.clone(),
                wallets.clone(),
                phase.clone(),
                pending.clone(),
            );
            async move { transfer(&client, &wallets, 1, &phase, &pending).await }
        })
        .await?
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let saturated = phase.report("saturation", elapsed);
    if args.show_metrics {
        let text = client
            .http
            .get(format!("{}/metrics", client.base))
            .send()
            .await?
            .text()
            .await?;
        for line in text.lines().filter(|l| {
            (l.starts_with("mathia_command_batch")
                && (l.contains("0.5\"") || l.contains("0.99\"") || l.contains("_count")))
                || l.contains("conflicts")
        }) {
            println!("  {line}");
        }
    }

    if !only_spine {
        watch_stop.cancel();
        let _ = watcher.await;
        let load = Load {
            seconds: args.seconds,
            clients: args.clients,
            reads: args.reads,
            read_clients: args.read_clients,
        };
        if let Some(chat) = chat {
            chat.run(&client, &wallets, &database_url, saturated, &load)
                .await?;
        }
        if let Some(itinerary) = itinerary {
            itinerary
                .run(&client, &wallets, &database_url, saturated, &load)
                .await?;
        }
        if let Some(fees) = fees {
            fees.run(&wallets, &database_url, saturated, &load).await?;
        }
        return cleanup(shutdown, server, admin, &db, &args, &prefix).await;
    }

    // Half rate: open loop at a fixed schedule.
    let target = (saturated / 2.0).max(1.0);
    let phase = Phase::new();
    *current.lock().expect("phase") = phase.clone();
    pending.lock().await.clear();
    let started = Instant::now();
    let interval = Duration::from_secs_f64(1.0 / target);
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut inflight = vec![];
    while started.elapsed() < Duration::from_secs(args.seconds) {
        ticker.tick().await;
        let (client, wallets, phase, pending) = (
            client.clone(),
            wallets.clone(),
            phase.clone(),
            pending.clone(),
        );
        inflight.push(tokio::spawn(async move {
            transfer(&client, &wallets, 1, &phase, &pending).await
        }));
    }
    for t in inflight {
        t.await?;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let half = phase.report(
        &format!("half ({target:.0}/s)"),
        Duration::from_secs(args.seconds),
    );
    let _ = half;

    println!(
        "ratio        end-to-end transfers/s ÷ raw single-event transactions/s = {:.2} (target ≥ 2.0)",
        saturated / raw
    );
    watch_stop.cancel();
    let _ = watcher.await;
    cleanup(shutdown, server, admin, &db, &args, &prefix).await
}

/// Stop the backend, drop the benchmark's database and its streams.
async fn cleanup(
    shutdown: CancellationToken,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
    mut admin: PgConnection,
    db: &str,
    args: &Args,
    prefix: &str,
) -> anyhow::Result<()> {
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), server).await;
    if args.keep_database {
        eprintln!("kept database {db}");
    } else {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {db} WITH (FORCE)"
        )))
        .execute(&mut admin)
        .await?;
    }
    let js = async_nats::jetstream::new(async_nats::connect(&args.nats_url).await?);
    let subjects = events::Subjects::with_prefix(prefix);
    let _ = js.delete_stream(subjects.commands_stream()).await;
    let _ = js.delete_stream(subjects.events_stream()).await;
    Ok(())
}
