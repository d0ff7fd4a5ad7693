//! `loadgen --chat`: the chat benchmark (issue 3).
//!
//! One run, against the same fresh database and backend as the spine benchmark:
//! 1. **Rooms**: 100 public rooms of 10 members each, through the API (the owner
//!    creates, nine others join), from the 1,000 funded users of the spine setup.
//! 2. **Store**: `--chat-store` messages (default 1,000,000) seeded straight into
//!    the read model and the keystore, see [`seed`].
//! 3. **Baseline**: the spine's transfer saturation phase (run by `main`, after
//!    the seed, so both write phases face the same store).
//! 4. **Send**: closed-loop message sends from `--clients` clients, random members
//!    into random rooms, short texts of several words; committed messages/s, the
//!    answer's p50/p99, and visibility (request sent → the `chat` projector's
//!    checkpoint has passed the message's position), and the ratio to transfers/s.
//! 5. **Timeline**: `GET /v1/rooms/{id}/messages` pages (default limit 50) from
//!    `--chat-read-clients` clients: the latest page, `from_message` and `at`
//!    anchors in either direction, and `prev`/`next` cursors of earlier answers.
//!    Closed loop first (the read saturation), then open loop at half that rate
//!    (latency at a stated load, timed from each request's scheduled start).
//! 6. **Search**: `GET /v1/search/messages` with one or two terms, whole words or
//!    prefixes, drawn from the same vocabulary as the texts; closed loop, then
//!    half rate, as the timeline.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use chrono::{DateTime, SecondsFormat, Utc};
use commands::crypto::{self, Key};
use serde_json::json;
use sqlx::{Connection, PgConnection, Row};
use uuid::Uuid;

use super::{
    Client, Load, Reader, Sample, Wallet, caught_up, paced_read_phase, read_phase, report_reads,
    verdict, write_phase,
};

/// Rooms of the benchmark.
const ROOMS: usize = 100;
/// Members per room (the owner included).
const MEMBERS: usize = 10;
/// Targets of issue 3.
const SEND_RATIO_TARGET: f64 = 0.7;
const TIMELINE_P99_TARGET_MS: f64 = 10.0;
const SEARCH_P99_TARGET_MS: f64 = 50.0;
/// Readers an open-loop read phase may have in flight at once.
const PACED_READERS: usize = 64;
/// Days the seeded messages span (their `sent_at`), ending a minute ago.
const SEED_DAYS: i64 = 30;
/// Messages generated per COPY chunk.
const CHUNK: usize = 10_000;

/// Words of the generated texts, roughly most frequent first: a word's index
/// picks how often it is drawn (see [`text`]).
const VOCABULARY: &str = "the to i you a and is it we in for of on at be that this
    are have will my me so what with just can do not see going no yes ok there all tomorrow
    get now today time they your here up if out how ferry when go like one know meet think
    about morning tonight back good was but did lunch dinner trip then need still sure thanks
    come let let's later bus train from where leave hotel beach room night week weekend
    booked ticket tickets price cheap money pay paid send sent wallet shillings plan plans
    airport flight early late bring take call phone text sunday monday friday saturday
    water food coffee tea breakfast market town island boat dhow old fort museum walk
    weather rain sunny hot cold swim snorkel reef dive guide tour safari park lion elephant
    mombasa nairobi lamu malindi kilifi watamu diani shela zanzibar arusha kilimanjaro
    mountain climb hike camp tent photos pictures video camera charger battery power
    passport visa booking confirm confirmed cancel cancelled refund deposit receipt
    birthday party music dance friends family kids mum dad brother sister cousin
    please sorry great awesome nice cool amazing perfect fine okay maybe probably
    definitely already almost never always sometimes everyone someone anyone nothing
    something everything street road car taxi matatu boda driver parking traffic
    restaurant menu table seats reservation bill tip change cash card mpesa number
    address location map pin share link group chat message reply later soon minutes
    hours days months noon evening afternoon sunrise sunset stars moon holiday vacation";

fn vocabulary() -> Vec<&'static str> {
    VOCABULARY.split_whitespace().collect()
}

/// A word drawn with a skew towards the front of the vocabulary (Zipf-like).
fn word(vocab: &[&'static str]) -> &'static str {
    let u: f64 = rand::random();
    vocab[((vocab.len() as f64) * u.powf(2.5)) as usize % vocab.len()]
}

/// A short chat text: 3 to 10 words.
fn text(vocab: &[&'static str]) -> String {
    let n = rand::random_range(3..=10);
    let mut out = String::new();
    for i in 0..n {
        if i > 0 {
            out.push(' ');
        }
        out.push_str(word(vocab));
    }
    if rand::random_range(0..4) == 0 {
        out.push('?');
    }
    out
}

/// A search query: one or two terms, each a whole word (of 2 or more letters,
/// the shortest term the API takes) or a prefix (≥ 3 characters).
fn query(vocab: &[&'static str]) -> String {
    let n = rand::random_range(1..=2);
    (0..n)
        .map(|_| {
            let w = loop {
                let w = word(vocab);
                // One searchable word ("let's" is two to the API, and "s" too short).
                if crypto::words(w).len() == 1 && w.chars().count() >= crypto::MIN_TERM {
                    break w;
                }
            };
            let chars: Vec<char> = w.chars().collect();
            if chars.len() > 3 && rand::random::<bool>() {
                chars[..rand::random_range(3..chars.len())].iter().collect()
            } else {
                w.to_owned()
            }
        })
        .collect::<Vec<String>>()
        .join(" ")
}

/// What the read phases draw from.
struct Room {
    id: Uuid,
    /// Indices into the wallets (their users are the members).
    members: Vec<usize>,
    /// Seeded messages: (id, sent at).
    seeded: Vec<(Uuid, DateTime<Utc>)>,
}

/// The rooms and the seeded store, ready for [`Chat::run`].
pub struct Chat {
    rooms: Arc<Vec<Room>>,
    /// Messages in the store when the measured phases start.
    stored: i64,
}

/// Create the rooms through the API, wait for the read model, then seed `store` messages.
pub async fn prepare(
    client: &Client,
    wallets: &[Wallet],
    database_url: &str,
    master: &Key,
    store: usize,
) -> anyhow::Result<Chat> {
    anyhow::ensure!(
        wallets.len() >= ROOMS * MEMBERS,
        "--chat needs --wallets ≥ {}",
        ROOMS * MEMBERS
    );
    eprintln!("setting up {ROOMS} rooms of {MEMBERS} members through the API…");
    let created = futures::future::join_all((0..ROOMS).map(|r| async move {
        let owner = r * MEMBERS;
        let (s, room) = client
            .post(
                "/v1/rooms",
                Some(&wallets[owner].token),
                &json!({"name": format!("Bench room {r}"), "topic": "load test", "visibility": "public"}),
                Some(&Uuid::now_v7().to_string()),
            )
            .await?;
        anyhow::ensure!(s == 201, "creating a room answered {s}: {room}");
        let id: Uuid = room["room_id"].as_str().context("room_id")?.parse()?;
        for m in owner + 1..owner + MEMBERS {
            let (s, b) = client
                .post(
                    &format!("/v1/rooms/{id}/join"),
                    Some(&wallets[m].token),
                    &json!({}),
                    Some(&Uuid::now_v7().to_string()),
                )
                .await?;
            anyhow::ensure!((200..300).contains(&s), "joining answered {s}: {b}");
        }
        anyhow::Ok(Room {
            id,
            members: (owner..owner + MEMBERS).collect(),
            seeded: vec![],
        })
    }))
    .await;
    let mut rooms: Vec<Room> = created.into_iter().collect::<anyhow::Result<_>>()?;
    let mut conn = PgConnection::connect(database_url).await?;
    caught_up(&mut conn, &["chat"]).await?;
    let started = Instant::now();
    eprintln!("seeding {store} messages into the read model and the keystore…");
    seed(&mut conn, database_url, master, wallets, &mut rooms, store).await?;
    // The seed reserved its positions at the head of the log: let every projector
    // walk past them before anything is measured.
    caught_up(&mut conn, &["chat", "wallet"]).await?;
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM proj_chat_messages")
        .fetch_one(&mut conn)
        .await?;
    eprintln!(
        "seeded in {:.0} s: {stored} messages in the store",
        started.elapsed().as_secs_f64()
    );
    Ok(Chat {
        rooms: Arc::new(rooms),
        stored,
    })
}

/// Lower-case hex, as COPY's text format takes `bytea` (`\\x…`).
fn hex(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    out.push_str("\\\\x");
    for b in bytes {
        out.push(DIGITS[(b >> 4) as usize] as char);
        out.push(DIGITS[(b & 15) as usize] as char);
    }
}

/// One chunk of COPY text for each table.
#[derive(Default)]
struct Chunk {
    messages: String,
    keys: String,
}

/// The tables the seed writes in bulk, whose indexes it rebuilds afterwards.
const BULK_TABLES: [&str; 2] = ["proj_chat_messages", "chat_message_keys"];

/// Seed `n` messages, spread evenly over the rooms, straight into the tables.
///
/// The rows are the ones the gateway, the handler and the `chat` projector would
/// have written for the same messages sent through the API, built with the same
/// functions:
/// - the message key is `handlers::keystore::new_message_key` under the room's
///   current (version 1) data key, unwrapped from `chat_room_keys` with the
///   master key, and goes into `chat_message_keys` as the handler's keystore op;
/// - the body is `crypto::seal` under that key with `field_aad(id, "body")`,
///   stored as `serde_json::to_value(&Sealed)`, like the projector's insert into
///   `proj_chat_messages` (main timeline, kind `text`, no attachment or quote,
///   3 % mentioning one other member);
/// - the blind index is `crypto::index_tokens` under the room's search key, in
///   the row's `search_tokens`, as `ChatProjector::tokens`;
/// - `proj_chat_unread` gains, per member, the messages of others (and those
///   mentioning them), `proj_chat_rooms.last_position` the room's last one, as
///   the projector's per-message updates add up to.
///
/// Positions: the seed reserves `n` positions at the head of the log the way an
/// append does (`UPDATE event_log_head … RETURNING`), so the seeded messages order
/// before everything sent later; there are no events behind them (the projectors
/// simply walk past the range). `sent_at` spreads evenly over the last
/// [`SEED_DAYS`] days in position order, message ids are UUIDv7 of the seed's time.
///
/// Bulk path: the two big tables' primary keys and indexes are dropped, the
/// rows go in by `COPY` (text format) over two connections while one thread
/// generates them, then every constraint and index is recreated from the
/// definitions read out of the catalog (`pg_get_constraintdef`,
/// `pg_get_indexdef`), and the tables are `VACUUM ANALYZE`d so the read phases
/// meet the steady state that autovacuum keeps in a live store.
async fn seed(
    conn: &mut PgConnection,
    database_url: &str,
    master: &Key,
    wallets: &[Wallet],
    rooms: &mut [Room],
    n: usize,
) -> anyhow::Result<()> {
    if n == 0 {
        return Ok(());
    }
    let keystore = handlers::keystore::Keystore::new(master.clone());
    let ids: Vec<Uuid> = rooms.iter().map(|r| r.id).collect();
    let rows = sqlx::query(
        "SELECT room_id, wrapped FROM chat_room_keys WHERE room_id = ANY($1) AND version = 1",
    )
    .bind(&ids)
    .fetch_all(&mut *conn)
    .await?;
    let mut room_keys: HashMap<Uuid, (Key, Key)> = HashMap::new();
    for r in rows {
        let room: Uuid = r.get("room_id");
        let w: Vec<u8> = r.get("wrapped");
        let key = keystore
            .open_room_key(room, 1, &w)
            .context("a room key does not open with the master key")?;
        let search = crypto::search_key(&key);
        room_keys.insert(room, (key, search));
    }
    anyhow::ensure!(room_keys.len() == rooms.len(), "a room has no key");
    let last: i64 =
        sqlx::query_scalar("UPDATE event_log_head SET position = position + $1 RETURNING position")
            .bind(n as i64)
            .fetch_one(&mut *conn)
            .await?;
    let first = last - n as i64 + 1;

    // Constraints and indexes of the bulk tables, to drop now and recreate after.
    let constraints: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT t.relname::text, c.conname::text, pg_get_constraintdef(c.oid) FROM pg_constraint c
         JOIN pg_class t ON t.oid = c.conrelid
         WHERE t.relname = ANY($1) AND c.contype IN ('p', 'u') AND t.relnamespace = current_schema()::regnamespace",
    )
    .bind(&BULK_TABLES[..])
    .fetch_all(&mut *conn)
    .await?;
    let indexes: Vec<(String, String)> = sqlx::query_as(
        "SELECT i.indexname::text, i.indexdef FROM pg_indexes i
         WHERE i.tablename = ANY($1) AND i.schemaname = current_schema()
           AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conname = i.indexname)",
    )
    .bind(&BULK_TABLES[..])
    .fetch_all(&mut *conn)
    .await?;
    for (name, _) in &indexes {
        sqlx::query(sqlx::AssertSqlSafe(format!("DROP INDEX \"{name}\"")))
            .execute(&mut *conn)
            .await?;
    }
    for (table, name, _) in &constraints {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "ALTER TABLE {table} DROP CONSTRAINT \"{name}\""
        )))
        .execute(&mut *conn)
        .await?;
    }

    // Generation on a thread of its own; two COPY streams take the chunks.
    let vocab = vocabulary();
    let plan: Vec<(Uuid, Vec<Uuid>)> = rooms
        .iter()
        .map(|r| (r.id, r.members.iter().map(|m| wallets[*m].user).collect()))
        .collect();
    let end = Utc::now() - chrono::Duration::minutes(1);
    let span_ms = SEED_DAYS * 86_400_000;
    let start = end - chrono::Duration::milliseconds(span_ms);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Chunk>(4);
    let generator = tokio::task::spawn_blocking(move || {
        // Per room: seeded (id, sent at); per (room, member): (unread, mentions).
        let mut seeded: Vec<Vec<(Uuid, DateTime<Utc>)>> = vec![vec![]; plan.len()];
        let mut unread: Vec<Vec<(i32, i32)>> =
            plan.iter().map(|p| vec![(0, 0); p.1.len()]).collect();
        let mut last_position = vec![0i64; plan.len()];
        let mut chunk = Chunk::default();
        for i in 0..n {
            let r = i % plan.len();
            let (room, members) = &plan[r];
            let (room_key, search_key) = &room_keys[room];
            let position = first + i as i64;
            let sent_at = start + chrono::Duration::milliseconds(span_ms * i as i64 / n as i64);
            let id = Uuid::now_v7();
            let s = rand::random_range(0..members.len());
            let sender = members[s];
            let mentioned = (rand::random_range(0..100) < 3)
                .then(|| (s + rand::random_range(1..members.len())) % members.len());
            let body = text(&vocab);
            let (message_key, wrapped) = handlers::keystore::new_message_key(room_key, id);
            let sealed = crypto::seal(
                &message_key,
                &crypto::field_aad(id, "body"),
                body.as_bytes(),
            );
            let sealed = serde_json::to_value(&sealed)
                .unwrap_or_default()
                .to_string();
            let mentions = match mentioned {
                Some(m) => format!("{{{}}}", members[m]),
                None => "{}".to_owned(),
            };
            let at = sent_at.to_rfc3339_opts(SecondsFormat::Micros, true);
            let tokens = crypto::index_tokens(search_key, &body);
            let tokens = if tokens.is_empty() {
                "\\N".to_owned()
            } else {
                let t: Vec<String> = tokens.iter().map(i64::to_string).collect();
                format!("{{{}}}", t.join(","))
            };
            let m = &mut chunk.messages;
            m.push_str(&format!(
                "{id}\t{room}\t{position}\t\\N\t{sender}\ttext\t{sealed}\t\\N\t\\N\t{mentions}\tf\t\\N\t{at}\t{tokens}\n"
            ));
            let k = &mut chunk.keys;
            k.push_str(&format!("{id}\t{room}\t1\t"));
            hex(k, &wrapped);
            k.push('\n');
            for (j, count) in unread[r].iter_mut().enumerate() {
                if j != s {
                    count.0 += 1;
                    count.1 += (mentioned == Some(j)) as i32;
                }
            }
            seeded[r].push((id, sent_at));
            last_position[r] = position;
            if (i + 1) % CHUNK == 0 || i + 1 == n {
                if tx.blocking_send(std::mem::take(&mut chunk)).is_err() {
                    break;
                }
            }
        }
        (seeded, unread, last_position)
    });
    let mut streams = vec![];
    for _ in 0..2 {
        streams.push(PgConnection::connect(database_url).await?);
    }
    let [c_messages, c_keys] = &mut streams[..] else {
        unreachable!("two connections");
    };
    let mut messages = c_messages
        .copy_in_raw(
            "COPY proj_chat_messages (message_id, room_id, position, thread_root, sender, kind, body, attachment,
                quote, mentions, mentions_assistant, client_message_id, sent_at, search_tokens) FROM STDIN",
        )
        .await?;
    let mut keys = c_keys
        .copy_in_raw(
            "COPY chat_message_keys (message_id, room_id, key_version, wrapped) FROM STDIN",
        )
        .await?;
    let mut done = 0usize;
    let mut reported = Instant::now();
    while let Some(chunk) = rx.recv().await {
        messages.send(chunk.messages.into_bytes()).await?;
        keys.send(chunk.keys.into_bytes()).await?;
        done += CHUNK;
        if reported.elapsed() > Duration::from_secs(10) {
            eprintln!("  {} messages…", done.min(n));
            reported = Instant::now();
        }
    }
    let (seeded, unread, last_position) = generator.await?;
    messages.finish().await?;
    keys.finish().await?;

    // What the projector's per-message updates add up to.
    let (mut u_users, mut u_rooms, mut u_unread, mut u_mentions) = (vec![], vec![], vec![], vec![]);
    let (mut l_rooms, mut l_positions) = (vec![], vec![]);
    for (r, room) in rooms.iter_mut().enumerate() {
        for (j, m) in room.members.iter().enumerate() {
            u_users.push(wallets[*m].user);
            u_rooms.push(room.id);
            u_unread.push(unread[r][j].0);
            u_mentions.push(unread[r][j].1);
        }
        if !seeded[r].is_empty() {
            l_rooms.push(room.id);
            l_positions.push(last_position[r]);
        }
        room.seeded = seeded[r].clone();
    }
    sqlx::query(
        "UPDATE proj_chat_unread u SET unread = u.unread + x.n, mentions = u.mentions + x.m
         FROM UNNEST($1::uuid[], $2::uuid[], $3::int[], $4::int[]) AS x(user_id, room_id, n, m)
         WHERE u.user_id = x.user_id AND u.room_id = x.room_id AND u.thread_root = $5",
    )
    .bind(&u_users)
    .bind(&u_rooms)
    .bind(&u_unread)
    .bind(&u_mentions)
    .bind(projections::chat::MAIN)
    .execute(&mut *conn)
    .await?;
    sqlx::query(
        "UPDATE proj_chat_rooms r SET last_position = x.p
         FROM UNNEST($1::uuid[], $2::bigint[]) AS x(room_id, p) WHERE r.room_id = x.room_id",
    )
    .bind(&l_rooms)
    .bind(&l_positions)
    .execute(&mut *conn)
    .await?;

    eprintln!("  {n} messages copied; rebuilding indexes…");
    sqlx::query("SET maintenance_work_mem = '1GB'")
        .execute(&mut *conn)
        .await?;
    for (table, name, def) in &constraints {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "ALTER TABLE {table} ADD CONSTRAINT \"{name}\" {def}"
        )))
        .execute(&mut *conn)
        .await?;
    }
    for (_, def) in &indexes {
        sqlx::query(sqlx::AssertSqlSafe(def.clone()))
            .execute(&mut *conn)
            .await?;
    }
    for table in BULK_TABLES
        .iter()
        .chain(&["proj_chat_unread", "proj_chat_rooms"])
    {
        sqlx::query(sqlx::AssertSqlSafe(format!("VACUUM ANALYZE {table}")))
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

impl Chat {
    /// The measured chat phases; `transfers` is the same run's saturation rate.
    pub async fn run(
        &self,
        client: &Arc<Client>,
        wallets: &Arc<Vec<Wallet>>,
        database_url: &str,
        transfers: f64,
        load: &Load,
    ) -> anyhow::Result<()> {
        let sent = self.send(client, wallets, database_url, load).await?;
        println!(
            "ratio        messages/s ÷ transfers/s = {:.2} (target ≥ {SEND_RATIO_TARGET}: {})",
            sent / transfers,
            verdict(sent / transfers >= SEND_RATIO_TARGET)
        );
        let mut conn = PgConnection::connect(database_url).await?;
        let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM proj_chat_messages")
            .fetch_one(&mut conn)
            .await?;
        println!(
            "store        {stored} messages ({} seeded before the run, the rest sent through the API)",
            self.stored
        );
        let settled = settle(&mut conn).await?;
        println!(
            "settled      every projector's checkpoint still for {} ms, {:.1} s after the send phase",
            SETTLED.as_millis(),
            settled.as_secs_f64()
        );
        eprintln!(
            "timeline and search: {} requests each from {} clients…",
            load.reads, load.read_clients
        );
        let timeline = || Timeline {
            client: client.clone(),
            wallets: wallets.clone(),
            rooms: self.rooms.clone(),
            last: None,
        };
        let search = || Search {
            client: client.clone(),
            wallets: wallets.clone(),
            rooms: self.rooms.clone(),
            vocab: vocabulary(),
        };
        read_twice(
            "timeline",
            TIMELINE_P99_TARGET_MS,
            "items/page",
            load,
            timeline,
        )
        .await?;
        read_twice("search", SEARCH_P99_TARGET_MS, "hits/page", load, search).await?;
        Ok(())
    }

    /// Saturate message sends; returns committed messages/s.
    async fn send(
        &self,
        client: &Arc<Client>,
        wallets: &Arc<Vec<Wallet>>,
        database_url: &str,
        load: &Load,
    ) -> anyhow::Result<f64> {
        let mut conn = PgConnection::connect(database_url).await?;
        let before: i64 = sqlx::query_scalar("SELECT count(*) FROM proj_chat_messages")
            .fetch_one(&mut conn)
            .await?;
        eprintln!(
            "chat send: {} clients for {} s…",
            load.clients, load.seconds
        );
        let (client, wallets, rooms) = (client.clone(), wallets.clone(), self.rooms.clone());
        let vocab = Arc::new(vocabulary());
        let (rate, answered) = write_phase(
            "chat send",
            "messages",
            "chat",
            database_url,
            load.clients,
            load.seconds,
            move |phase, pending| {
                let (client, wallets, rooms, vocab) = (
                    client.clone(),
                    wallets.clone(),
                    rooms.clone(),
                    vocab.clone(),
                );
                async move {
                    let room = &rooms[rand::random_range(0..rooms.len())];
                    let member = room.members[rand::random_range(0..room.members.len())];
                    let body = json!({
                        "body": text(&vocab),
                        "client_message_id": Uuid::now_v7().simple().to_string(),
                    });
                    let path = format!("/v1/rooms/{}/messages", room.id);
                    phase
                        .post(
                            &client,
                            &path,
                            &wallets[member].token,
                            &body,
                            None,
                            &pending,
                        )
                        .await;
                }
            },
        )
        .await?;
        let after: i64 = sqlx::query_scalar("SELECT count(*) FROM proj_chat_messages")
            .fetch_one(&mut conn)
            .await?;
        println!(
            "  in the timeline: {} of {} answered messages",
            after - before,
            answered
        );
        Ok(rate)
    }
}

/// How long every projector's checkpoint must stand still before the read phases.
const SETTLED: Duration = Duration::from_millis(500);

/// Waits (at most 60 s) until no projector's checkpoint has moved for
/// [`SETTLED`], so that the read phases measure reads and not the send phase's
/// tail still being projected (screening, feeds, unread counts) beside them.
async fn settle(conn: &mut PgConnection) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut last = None;
    loop {
        let now: Vec<(String, i64)> =
            sqlx::query_as("SELECT model, position FROM proj_checkpoints ORDER BY model")
                .fetch_all(&mut *conn)
                .await?;
        if last.as_ref() == Some(&now) || started.elapsed() > Duration::from_secs(60) {
            return Ok(started.elapsed());
        }
        last = Some(now);
        tokio::time::sleep(SETTLED).await;
    }
}

/// Closed loop first: the read saturation of this machine (its latency is mostly
/// queueing once the clients outnumber the cores). Then open loop at half that
/// rate, the load at which the spine states its latency targets.
async fn read_twice<R: Reader>(
    name: &str,
    target_ms: f64,
    unit: &str,
    load: &Load,
    reader: impl Fn() -> R,
) -> anyhow::Result<()> {
    let saturated = read_phase(load.reads, load.read_clients, &reader).await?;
    report_reads(name, &saturated, target_ms, unit);
    let rate = saturated.rate() / 2.0;
    eprintln!("{name} at half rate: {rate:.0}/s, open loop…");
    let half = paced_read_phase(load.reads, rate, PACED_READERS, &reader).await?;
    report_reads(&format!("  half ({rate:.0}/s)"), &half, target_ms, unit);
    Ok(())
}

/// A timeline reader: a member of a random room, carrying a cursor of its last page.
struct Timeline {
    client: Arc<Client>,
    wallets: Arc<Vec<Wallet>>,
    rooms: Arc<Vec<Room>>,
    last: Option<(usize, String)>,
}

impl Reader for Timeline {
    async fn read(&mut self) -> anyhow::Result<Sample> {
        timeline_page(&self.rooms, &self.wallets, &self.client, &mut self.last).await
    }
}

/// A searcher: a member of a random room, searching all their rooms.
struct Search {
    client: Arc<Client>,
    wallets: Arc<Vec<Wallet>>,
    rooms: Arc<Vec<Room>>,
    vocab: Vec<&'static str>,
}

impl Reader for Search {
    async fn read(&mut self) -> anyhow::Result<Sample> {
        search_page(&self.rooms, &self.wallets, &self.client, &self.vocab).await
    }
}

/// One timeline page: the latest, from a seeded message, at a date (either
/// direction), or the `prev`/`next` cursor of this client's previous page.
async fn timeline_page(
    rooms: &[Room],
    wallets: &[Wallet],
    client: &Client,
    last: &mut Option<(usize, String)>,
) -> anyhow::Result<Sample> {
    let mut r = rand::random_range(0..rooms.len());
    let dir = if rand::random::<bool>() {
        "forward"
    } else {
        "backward"
    };
    let (kind, query) = match rand::random_range(0..4) {
        1 if !rooms[r].seeded.is_empty() => {
            let (m, _) = rooms[r].seeded[rand::random_range(0..rooms[r].seeded.len())];
            ("from_message", format!("?from_message={m}&dir={dir}"))
        }
        2 if !rooms[r].seeded.is_empty() => {
            let (_, at) = rooms[r].seeded[rand::random_range(0..rooms[r].seeded.len())];
            let at = at - chrono::Duration::milliseconds(rand::random_range(0..1000));
            let at = at.to_rfc3339_opts(SecondsFormat::Millis, true);
            ("at", format!("?at={at}&dir={dir}"))
        }
        3 if last.is_some() => {
            // A cursor is good in the room it came from.
            let (room, c) = last.take().unwrap_or_default();
            r = room;
            ("cursor", format!("?cursor={c}"))
        }
        _ => ("latest", String::new()),
    };
    let room = &rooms[r];
    let token = &wallets[room.members[rand::random_range(0..room.members.len())]].token;
    let (page, took) = client
        .timed_read(&format!("/v1/rooms/{}/messages{query}", room.id), token)
        .await?;
    let items = page.items.len();
    let cursor = if rand::random::<bool>() {
        page.prev.clone()
    } else {
        page.next.clone()
    };
    *last = cursor.or(page.prev).map(|c| (r, c));
    Ok((kind, took, items))
}

/// One search over all the caller's rooms.
async fn search_page(
    rooms: &[Room],
    wallets: &[Wallet],
    client: &Client,
    vocab: &[&'static str],
) -> anyhow::Result<Sample> {
    let room = &rooms[rand::random_range(0..rooms.len())];
    let token = &wallets[room.members[rand::random_range(0..room.members.len())]].token;
    let q = query(vocab);
    let kind = if q.contains(' ') {
        "two terms"
    } else {
        "one term"
    };
    let (page, took) = client
        .timed_read(
            &format!("/v1/search/messages?q={}", q.replace(' ', "%20")),
            token,
        )
        .await?;
    let items = page.items.len();
    Ok((kind, took, items))
}
