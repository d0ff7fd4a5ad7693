//! `replaybench`: how fast `mathia replay` rebuilds read models (issue 6).
//!
//! In one run, against a fresh database of its own:
//! 1. **Baseline**: the raw batched insert rate of this machine — 100-row
//!    INSERT transactions into an events-like table from 8 connections.
//! 2. **Store**: `--events` (default 1,000,000) wallet and chat events appended
//!    through the event store's own `append` (5,000 per transaction), with the
//!    keystore rows the handlers write: 1,000 wallets funded from the float and
//!    transfers between random pairs (two legs each, balances carried), and 100
//!    rooms of 10 members with messages whose bodies are sealed under per-message
//!    keys wrapped by the room keys (`--chat-share` of the events, default 40 %).
//! 3. **Rebuild**: `rebuild::rebuild` of `wallet` and `chat` side by side (as
//!    `mathia replay all` runs its models), from position 0 into shadow tables
//!    and swapped in; events/s per model and for both together, and the ratio
//!    to the baseline.
//!
//! Then it checks what was rebuilt (Σ posted = 0, every seeded message in the
//! timeline and indexed) and drops the database (`--keep-database` keeps it).
//! No backend runs meanwhile: the rebuild has the machine to itself.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use chrono::Utc;
use clap::Parser;
use commands::KeyOp;
use commands::crypto::{self, Key};
use events::Event;
use events::chat::{Bytes64, ChatEvent, MemberRole, MessageKind, Visibility};
use events::wallet::{AccountKind, EntryKind, Leg, WalletEvent};
use handlers::keystore::{Keystore, new_message_key};
use handlers::store::{self, PendingEvent};
use mathia::bench::db_url;
use projections::chat::ChatProjector;
use projections::rebuild::{self, Options, Outcome};
use projections::wallet::WalletProjector;
use serde_json::json;
use sqlx::{Connection, PgConnection, PgPool};
use uuid::Uuid;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(about = "Measure how fast `mathia replay` rebuilds the wallet and chat read models")]
struct Args {
    /// Events in the store.
    #[arg(long, default_value_t = 1_000_000)]
    events: usize,
    /// Share of chat events (messages), the rest wallet legs.
    #[arg(long, default_value_t = 0.4)]
    chat_share: f64,
    /// Seconds of the baseline phase.
    #[arg(long, default_value_t = 10)]
    baseline_seconds: u64,
    /// Admin connection string; the benchmark creates and drops its own database.
    #[arg(
        long,
        env = "MATHIA_TEST_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    admin_database_url: String,
    /// Keep the database afterwards.
    #[arg(long)]
    keep_database: bool,
}

const WALLETS: usize = 1000;
const ROOMS: usize = 100;
const MEMBERS: usize = 10;
/// Events per append transaction while seeding.
const SEED_BATCH: usize = 5000;
const WORDS: &[&str] = &[
    "the",
    "ferry",
    "leaves",
    "at",
    "seven",
    "from",
    "mombasa",
    "bring",
    "tickets",
    "and",
    "passports",
    "dinner",
    "tonight",
    "hotel",
    "booking",
    "confirmed",
    "meeting",
    "moved",
    "tomorrow",
    "morning",
    "flight",
    "delayed",
    "nairobi",
    "london",
    "budget",
    "shared",
    "beach",
    "museum",
    "train",
    "station",
    "lunch",
    "coffee",
    "market",
    "photos",
    "weather",
    "sunny",
];

/// Raw baseline: 100-row INSERT transactions from 8 connections.
async fn baseline(database_url: &str, seconds: u64) -> anyhow::Result<f64> {
    let mut conn = PgConnection::connect(database_url).await?;
    sqlx::query("CREATE TABLE bench_raw_events (LIKE events INCLUDING ALL)")
        .execute(&mut conn)
        .await?;
    let count = Arc::new(AtomicU64::new(0));
    let next = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = vec![];
    for c in 0..8 {
        let (url, count, next) = (database_url.to_owned(), count.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut conn = PgConnection::connect(&url).await?;
            let mut version = 0i64;
            while Instant::now() < deadline {
                let first = next.fetch_add(100, Ordering::Relaxed) as i64 + 1;
                let positions: Vec<i64> = (first..first + 100).collect();
                let ids: Vec<Uuid> = (0..100).map(|_| Uuid::now_v7()).collect();
                let versions: Vec<i64> = (0..100).map(|i| version + i + 1).collect();
                version += 100;
                let payloads: Vec<String> = versions
                    .iter()
                    .map(|v| json!({"type": "Credited", "amount": 1, "balance_after": v, "transfer_id": Uuid::now_v7()}).to_string())
                    .collect();
                sqlx::query(
                    "INSERT INTO bench_raw_events (position, event_id, stream_id, version, domain, event_type,
                                                   schema_version, payload, occurred_at, correlation_id, causation_id)
                     SELECT p, id, $3, v, 'wallet', 'Credited', 1, pl::jsonb, now(), id, id
                     FROM UNNEST($1::bigint[], $2::uuid[], $4::bigint[], $5::text[]) AS u(p, id, v, pl)",
                )
                .bind(&positions)
                .bind(&ids)
                .bind(format!("wallet.account.{c}"))
                .bind(&versions)
                .bind(&payloads)
                .execute(&mut conn)
                .await?;
                count.fetch_add(100, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    sqlx::query("DROP TABLE bench_raw_events")
        .execute(&mut conn)
        .await?;
    Ok(count.load(Ordering::Relaxed) as f64 / seconds as f64)
}

/// Events and keystore rows waiting to be appended.
#[derive(Default)]
struct Batch {
    events: Vec<PendingEvent>,
    keys: Vec<KeyOp>,
}

struct Seeder {
    pool: PgPool,
    batch: Batch,
    versions: std::collections::HashMap<Uuid, i64>,
    appended: usize,
}

impl Seeder {
    async fn push(
        &mut self,
        stream: events::StreamId,
        id: Uuid,
        event: Event,
    ) -> anyhow::Result<()> {
        let v = self.versions.entry(id).or_insert(0);
        *v += 1;
        let command = Uuid::now_v7();
        self.batch.events.push(PendingEvent {
            event_id: Uuid::now_v7(),
            stream_id: stream,
            version: *v,
            event,
            occurred_at: Utc::now(),
            correlation_id: command,
            causation_id: command,
            actor: None,
        });
        if self.batch.events.len() >= SEED_BATCH {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> anyhow::Result<()> {
        let batch = std::mem::take(&mut self.batch);
        if batch.events.is_empty() && batch.keys.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        handlers::keystore::apply(&mut tx, &batch.keys).await?;
        store::append(&mut tx, &batch.events).await?;
        tx.commit().await?;
        self.appended += batch.events.len();
        Ok(())
    }
}

fn leg(transfer: Uuid, amount: i64, kind: EntryKind, counterparty: Uuid, after: i64) -> Leg {
    Leg {
        transfer_id: transfer,
        amount,
        kind,
        counterparty,
        reference: None,
        balance_after: after,
        at: Some(Utc::now()),
        refund_of: None,
        fx: None,
    }
}

/// Append the store: wallets and rooms first, then transfers and messages interleaved.
async fn seed(
    pool: &PgPool,
    master: &Key,
    total: usize,
    chat_share: f64,
) -> anyhow::Result<(usize, usize)> {
    let keystore = Keystore::new(master.clone());
    let mut s = Seeder {
        pool: pool.clone(),
        batch: Batch::default(),
        versions: Default::default(),
        appended: 0,
    };
    let float = Uuid::now_v7();
    s.push(
        commands::wallet::account_stream(float),
        float,
        Event::Wallet(WalletEvent::AccountOpened {
            account_id: float,
            owner_id: None,
            currency: "KES".into(),
            kind: AccountKind::SystemFloat,
            floor: None,
        }),
    )
    .await?;
    let users: Vec<Uuid> = (0..WALLETS).map(|_| Uuid::now_v7()).collect();
    let wallets: Vec<Uuid> = (0..WALLETS).map(|_| Uuid::now_v7()).collect();
    let mut balances = vec![0i64; WALLETS];
    let mut float_balance = 0i64;
    for (i, w) in wallets.iter().enumerate() {
        s.push(
            commands::wallet::account_stream(*w),
            *w,
            Event::Wallet(WalletEvent::AccountOpened {
                account_id: *w,
                owner_id: Some(users[i]),
                currency: "KES".into(),
                kind: AccountKind::User,
                floor: Some(0),
            }),
        )
        .await?;
    }
    let mut rooms = vec![];
    for r in 0..ROOMS {
        let room = Uuid::now_v7();
        let (key, wrapped) = keystore.new_room_key(room, 1);
        s.batch.keys.push(KeyOp::PutRoomKey {
            room_id: room,
            version: 1,
            wrapped: Bytes64(wrapped),
        });
        let members: Vec<Uuid> = users[r * MEMBERS..(r + 1) * MEMBERS].to_vec();
        s.push(
            commands::chat::room_stream(room),
            room,
            Event::Chat(ChatEvent::RoomCreated {
                room_id: room,
                name: format!("Bench room {r}"),
                topic: None,
                visibility: Visibility::Public,
                created_by: members[0],
            }),
        )
        .await?;
        for (m, user) in members.iter().enumerate() {
            s.push(
                commands::chat::room_stream(room),
                room,
                Event::Chat(ChatEvent::MemberJoined {
                    user_id: *user,
                    role: if m == 0 {
                        MemberRole::Owner
                    } else {
                        MemberRole::Member
                    },
                    via_email: None,
                }),
            )
            .await?;
        }
        rooms.push((room, key, members));
    }
    // Fund every wallet from the float.
    for (i, w) in wallets.iter().enumerate() {
        let transfer = Uuid::now_v7();
        let amount = 1_000_000_000;
        float_balance -= amount;
        balances[i] += amount;
        s.push(
            commands::wallet::account_stream(float),
            float,
            Event::Wallet(WalletEvent::Debited(leg(
                transfer,
                amount,
                EntryKind::Deposit,
                *w,
                float_balance,
            ))),
        )
        .await?;
        s.push(
            commands::wallet::account_stream(*w),
            *w,
            Event::Wallet(WalletEvent::Credited(leg(
                transfer,
                amount,
                EntryKind::Deposit,
                float,
                balances[i],
            ))),
        )
        .await?;
    }
    let (mut messages, mut transfers) = (0usize, 0usize);
    while s.appended + s.batch.events.len() < total {
        if rand::random::<f64>() < chat_share {
            let (room, key, members) = &rooms[rand::random_range(0..ROOMS)];
            let id = Uuid::now_v7();
            let words = rand::random_range(3..10);
            let body: Vec<&str> = (0..words)
                .map(|_| WORDS[rand::random_range(0..WORDS.len())])
                .collect();
            let (message_key, wrapped) = new_message_key(key, id);
            let sealed = crypto::seal(
                &message_key,
                &crypto::field_aad(id, "body"),
                body.join(" ").as_bytes(),
            );
            s.batch.keys.push(KeyOp::PutMessageKey {
                message_id: id,
                room_id: *room,
                key_version: 1,
                wrapped: Bytes64(wrapped),
            });
            s.push(
                commands::chat::message_stream(id),
                id,
                Event::Chat(ChatEvent::MessagePosted {
                    message_id: id,
                    room_id: *room,
                    sender: members[rand::random_range(0..MEMBERS)],
                    kind: MessageKind::Text,
                    body: sealed,
                    attachment: None,
                    thread_root: None,
                    quote: None,
                    mentions: vec![],
                    mentions_assistant: false,
                    client_message_id: None,
                    key_version: 1,
                    sent_at: Utc::now(),
                }),
            )
            .await?;
            messages += 1;
        } else {
            let a = rand::random_range(0..WALLETS);
            let b = (a + rand::random_range(1..WALLETS)) % WALLETS;
            let amount = rand::random_range(1..1000);
            let transfer = Uuid::now_v7();
            balances[a] -= amount;
            balances[b] += amount;
            s.push(
                commands::wallet::account_stream(wallets[a]),
                wallets[a],
                Event::Wallet(WalletEvent::Debited(leg(
                    transfer,
                    amount,
                    EntryKind::Transfer,
                    wallets[b],
                    balances[a],
                ))),
            )
            .await?;
            s.push(
                commands::wallet::account_stream(wallets[b]),
                wallets[b],
                Event::Wallet(WalletEvent::Credited(leg(
                    transfer,
                    amount,
                    EntryKind::Transfer,
                    wallets[a],
                    balances[b],
                ))),
            )
            .await?;
            transfers += 1;
        }
    }
    s.flush().await?;
    Ok((messages, transfers))
}

fn rate_of(outcome: &Outcome) -> (u64, f64) {
    match outcome {
        Outcome::Swapped { events, rate, .. } | Outcome::DryRun { events, rate, .. } => {
            (*events, *rate)
        }
        Outcome::Paused { events, .. } => (*events, 0.0),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let db = format!("mathia_replaybench_{}", Uuid::new_v4().simple());
    let mut admin = PgConnection::connect(&args.admin_database_url)
        .await
        .context("connecting to the admin database")?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db}")))
        .execute(&mut admin)
        .await?;
    let database_url = db_url(&args.admin_database_url, &db);
    let result = run(&args, &database_url).await;
    if args.keep_database {
        eprintln!("kept database {db}");
    } else {
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE {db} WITH (FORCE)"
        )))
        .execute(&mut admin)
        .await;
    }
    result
}

async fn run(args: &Args, database_url: &str) -> anyhow::Result<()> {
    let pool = handlers::infra::connect_pg(database_url, 4).await?;
    handlers::infra::migrate(&pool).await?;
    eprintln!(
        "baseline: 100-row INSERT transactions from 8 connections, {} s…",
        args.baseline_seconds
    );
    let raw = baseline(database_url, args.baseline_seconds).await?;
    eprintln!("seeding {} events…", args.events);
    let master = Key::random();
    let started = Instant::now();
    let (messages, transfers) = seed(&pool, &master, args.events, args.chat_share).await?;
    let head = store::head_position(&pool).await?;
    eprintln!(
        "seeded {head} events ({transfers} transfers, {messages} messages) in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    sqlx::query("VACUUM ANALYZE events").execute(&pool).await?;

    // Side by side, as `mathia replay all` runs them.
    let started = Instant::now();
    let wallet = tokio::spawn({
        let pool = pool.clone();
        async move {
            let outcome =
                rebuild::rebuild(&pool, &WalletProjector, &Options::default(), |_| {}).await;
            (outcome, started.elapsed().as_secs_f64())
        }
    });
    let chat = tokio::spawn({
        let (pool, keystore) = (pool.clone(), Keystore::new(master.clone()));
        async move {
            let outcome = rebuild::rebuild(
                &pool,
                &ChatProjector { keystore },
                &Options::default(),
                |_| {},
            )
            .await;
            (outcome, started.elapsed().as_secs_f64())
        }
    });
    let ((wallet, wallet_secs), (chat, chat_secs)) = (wallet.await?, chat.await?);
    let (wallet, chat) = (wallet?, chat?);
    let both = started.elapsed().as_secs_f64();

    // What was rebuilt is right.
    let (sum, accounts): (i64, i64) = sqlx::query_as(
        "SELECT coalesce(sum(posted), 0)::bigint, count(*) FROM proj_wallet_accounts",
    )
    .fetch_one(&pool)
    .await?;
    anyhow::ensure!(sum == 0, "Σ posted = {sum}, not 0");
    anyhow::ensure!(accounts == WALLETS as i64 + 1, "{accounts} accounts");
    let timeline: i64 = sqlx::query_scalar("SELECT count(*) FROM proj_chat_messages")
        .fetch_one(&pool)
        .await?;
    anyhow::ensure!(
        timeline == messages as i64,
        "{timeline} of {messages} messages in the timeline"
    );
    let indexed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM proj_chat_messages WHERE search_tokens IS NOT NULL",
    )
    .fetch_one(&pool)
    .await?;
    anyhow::ensure!(
        indexed == messages as i64,
        "{indexed} of {messages} messages indexed"
    );

    let (we, wr) = rate_of(&wallet);
    let (ce, cr) = rate_of(&chat);
    let total = (we + ce) as f64 / both;
    println!(
        "store: {head} events ({transfers} transfers = {} legs, {messages} messages, setup events)",
        2 * transfers
    );
    println!("baseline: 100-row INSERT transactions, 8 connections: {raw:.0} rows/s");
    println!("(wallet and chat rebuild side by side, as `mathia replay all` runs them)");
    println!(
        "rebuild wallet: {we} events at {wr:.0} events/s ({:.2} × baseline), done after {wallet_secs:.1} s",
        wr / raw
    );
    println!(
        "rebuild chat:   {ce} events at {cr:.0} events/s ({:.2} × baseline), done after {chat_secs:.1} s",
        cr / raw
    );
    println!(
        "rebuild both:   {} events in {both:.1} s = {total:.0} events/s; ratio to baseline {:.2} (target ≥ 0.50: {})",
        we + ce,
        total / raw,
        if total / raw >= 0.5 { "met" } else { "not met" }
    );
    Ok(())
}
