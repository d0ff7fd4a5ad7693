//! `loadgen --itinerary`: the itinerary benchmark (issue 5).
//!
//! One run, against the same fresh database and backend as the spine benchmark,
//! everything written through the API (the handlers decide it, the `itinerary`
//! projector builds the read model, so the rows are what the system writes):
//! 1. **Trips**: one itinerary per funded user (1,000); the first user gets
//!    `--itinerary-list` in all (default 10,000), created 64 at a time like all the setup; ten
//!    users get a second trip of [`DETAIL_ITEMS`] typed items (flights across
//!    zones and midnight, hotels, trains, buses, events, …, with prices,
//!    providers and booking references). Then the read tables are
//!    `VACUUM ANALYZE`d, as autovacuum keeps a live store.
//! 2. **Baseline**: the spine's transfer saturation phase (run by `main`).
//! 3. **Item writes**: closed-loop `POST /v1/itineraries/{id}/items` from
//!    `--clients` clients, each request a random user adding an item to their
//!    own trip; items/s, answer and visibility p50/p99 (request sent → the
//!    `itinerary` projector's checkpoint has passed the item's position), and
//!    the ratio to transfers/s.
//! 4. **Detail**: `GET /v1/itineraries/{id}` of the trips with 100 items, by
//!    their owners, from `--read-clients` clients (`--reads` requests after a
//!    tenth as many to warm up).
//! 5. **List**: `GET /v1/itineraries` ("my itineraries", 20 a page) of the user
//!    with 10,000: the first page, a page from a cursor anywhere in the list, and
//!    the `next` page of the client's previous answer.
//!
//! Issue 5's targets: detail and list p99 ≤ 10 ms each.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{NaiveDate, NaiveDateTime};
use futures::StreamExt as _;
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection};
use uuid::Uuid;

use super::{
    Client, Load, Reader, SETUP_IN_FLIGHT, Sample, Wallet, all_caught_up, read_phase, report_reads,
    verdict, write_phase,
};

/// Trips read by the detail phase, and the items in each.
const DETAIL_TRIPS: usize = 10;
const DETAIL_ITEMS: usize = 100;
/// Issue 5's target for both reads.
const READ_P99_TARGET_MS: f64 = 10.0;
/// Where the trips happen: no DST change in any of them in January.
const ZONES: [&str; 6] = [
    "Africa/Nairobi",
    "Europe/London",
    "Africa/Dar_es_Salaam",
    "Asia/Dubai",
    "America/New_York",
    "Africa/Lagos",
];
const FIRST_DAY: (i32, u32, u32) = (2027, 1, 5);
const DAYS: i64 = 20;

/// The trips of the run, ready for [`Itinerary::run`].
pub struct Itinerary {
    /// Each user's first trip (by wallet index): the item writes go there.
    trips: Arc<Vec<Uuid>>,
    /// The trips with [`DETAIL_ITEMS`] items: (owner's wallet index, trip).
    detail: Arc<Vec<(usize, Uuid)>>,
    /// Every trip of the list user (wallet 0).
    listed: Arc<Vec<Uuid>>,
}

fn create_body(n: usize) -> Value {
    let (y, m, d) = FIRST_DAY;
    let start = NaiveDate::from_ymd_opt(y, m, d).expect("a date");
    json!({
        "title": format!("Bench trip {n}"),
        "region": "East Africa",
        "start_date": start,
        "end_date": start + chrono::Duration::days(DAYS),
        "zone": ZONES[n % ZONES.len()],
        "budget": {"KES": 25_000_000, "USD": 400_000},
        "visibility": "private",
        "metadata": {"purpose": "load test", "n": n},
    })
}

fn local(t: NaiveDateTime) -> String {
    t.format("%Y-%m-%dT%H:%M:%S").to_string()
}

/// A typed reservation somewhere in the trip: flights land in another zone
/// (10 to 16 h later on the wall clock, so often on the next day), hotels span
/// nights, the rest take hours; with a price, a provider and a fresh booking
/// reference (so an add is an upsert lookup that creates).
fn item_body() -> Value {
    let (y, m, d) = FIRST_DAY;
    let first = NaiveDate::from_ymd_opt(y, m, d)
        .expect("a date")
        .and_hms_opt(0, 0, 0)
        .expect("midnight");
    let start = first + chrono::Duration::minutes(rand::random_range(0..DAYS * 24 * 60));
    let zone = ZONES[rand::random_range(0..ZONES.len())];
    let kinds = [
        "flight", "hotel", "bus", "train", "transfer", "event", "activity", "note",
    ];
    let kind = kinds[rand::random_range(0..kinds.len())];
    let (end, end_zone) = match kind {
        "flight" => (
            start + chrono::Duration::minutes(rand::random_range(600..=960)),
            ZONES[rand::random_range(0..ZONES.len())],
        ),
        "hotel" => (
            start + chrono::Duration::days(rand::random_range(1..=4)),
            zone,
        ),
        _ => (
            start + chrono::Duration::minutes(rand::random_range(30..=240)),
            zone,
        ),
    };
    let reference: String = (0..6)
        .map(|_| b"ABCDEFGHJKLMNPQRSTUVWXYZ23456789"[rand::random_range(0..32)] as char)
        .collect();
    let locations = match kind {
        "flight" => {
            json!([{"name": "Jomo Kenyatta International", "code": "NBO"}, {"name": "Heathrow", "code": "LHR"}])
        }
        _ => json!([{"name": "Old Town", "address": "Mombasa"}]),
    };
    json!({
        "kind": kind,
        "title": format!("{kind} {reference}"),
        "start": {"local": local(start), "zone": zone},
        "end": {"local": local(end), "zone": end_zone},
        "locations": locations,
        "booking_reference": reference,
        "provider": format!("{kind}-provider"),
        "status": if rand::random::<bool>() { "confirmed" } else { "pending" },
        "price": {"amount": rand::random_range(1_000..500_000), "currency": if rand::random::<bool>() { "KES" } else { "USD" }},
        "notes": "booked for the load test",
    })
}

/// Create one trip for `owner`; its id.
async fn create(client: &Client, owner: &Wallet, n: usize) -> anyhow::Result<Uuid> {
    let (s, b) = client
        .post(
            "/v1/itineraries",
            Some(&owner.token),
            &create_body(n),
            Some(&Uuid::now_v7().to_string()),
        )
        .await?;
    anyhow::ensure!(s == 201, "creating an itinerary answered {s}: {b}");
    Ok(b["itinerary_id"]
        .as_str()
        .context("itinerary_id")?
        .parse()?)
}

/// Create the trips and items through the API and wait for the read model.
pub async fn prepare(
    client: &Client,
    wallets: &[Wallet],
    database_url: &str,
    list: usize,
) -> anyhow::Result<Itinerary> {
    anyhow::ensure!(
        wallets.len() > DETAIL_TRIPS && list >= 1,
        "--itinerary needs more than {DETAIL_TRIPS} wallets and --itinerary-list ≥ 1"
    );
    let started = Instant::now();
    eprintln!("creating one itinerary per user ({})…", wallets.len());
    let trips: Vec<Uuid> = futures::stream::iter(wallets.iter().enumerate())
        .map(|(i, w)| create(client, w, i))
        .buffered(SETUP_IN_FLIGHT)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<_>>()?;

    eprintln!("creating {} more for the list user…", list - 1);
    let seeding = Instant::now();
    let mut listed: Vec<Uuid> = futures::stream::iter(1..list)
        .map(|n| create(client, &wallets[0], n))
        .buffer_unordered(SETUP_IN_FLIGHT)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<_>>()?;
    listed.push(trips[0]);
    eprintln!(
        "  {} itineraries in {:.1} s ({:.0}/s through the API, {SETUP_IN_FLIGHT} in flight)",
        list - 1,
        seeding.elapsed().as_secs_f64(),
        (list - 1) as f64 / seeding.elapsed().as_secs_f64()
    );

    eprintln!("adding {DETAIL_ITEMS} items to each of {DETAIL_TRIPS} trips…");
    let detail: Vec<(usize, Uuid)> = futures::future::join_all((1..=DETAIL_TRIPS).map(|w| {
        async move {
            let trip = create(client, &wallets[w], w).await?;
            // One after another: every add is decided on the trip's stream.
            for _ in 0..DETAIL_ITEMS {
                let (s, b) = client
                    .post(
                        &format!("/v1/itineraries/{trip}/items"),
                        Some(&wallets[w].token),
                        &item_body(),
                        Some(&Uuid::now_v7().to_string()),
                    )
                    .await?;
                anyhow::ensure!(s == 201, "adding an item answered {s}: {b}");
            }
            anyhow::Ok((w, trip))
        }
    }))
    .await
    .into_iter()
    .collect::<anyhow::Result<_>>()?;

    // Every projector past the seed (the feed and the trip-room queue read
    // these events too), or the baseline would share the machine with their backlog.
    let mut conn = PgConnection::connect(database_url).await?;
    all_caught_up(&mut conn).await?;
    for table in [
        "proj_itineraries",
        "proj_itinerary_members",
        "proj_itinerary_items",
    ] {
        sqlx::query(sqlx::AssertSqlSafe(format!("VACUUM ANALYZE {table}")))
            .execute(&mut conn)
            .await?;
    }
    let mine: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM proj_itinerary_members WHERE user_id = $1 AND state = 'active'",
    )
    .bind(wallets[0].user)
    .fetch_one(&mut conn)
    .await?;
    anyhow::ensure!(
        mine == list as i64,
        "the list user has {mine} itineraries, not {list}"
    );
    eprintln!("set up in {:.0} s", started.elapsed().as_secs_f64());
    Ok(Itinerary {
        trips: Arc::new(trips),
        detail: Arc::new(detail),
        listed: Arc::new(listed),
    })
}

impl Itinerary {
    /// The measured phases; `transfers` is the same run's saturation rate.
    pub async fn run(
        &self,
        client: &Arc<Client>,
        wallets: &Arc<Vec<Wallet>>,
        database_url: &str,
        transfers: f64,
        load: &Load,
    ) -> anyhow::Result<()> {
        eprintln!(
            "item writes: {} clients for {} s…",
            load.clients, load.seconds
        );
        let (c, w, trips) = (client.clone(), wallets.clone(), self.trips.clone());
        let (items, _) = write_phase(
            "item add",
            "items",
            "itinerary",
            database_url,
            load.clients,
            load.seconds,
            move |phase, pending| {
                let (client, wallets, trips) = (c.clone(), w.clone(), trips.clone());
                async move {
                    let i = rand::random_range(0..trips.len());
                    let key = Uuid::now_v7().to_string();
                    let path = format!("/v1/itineraries/{}/items", trips[i]);
                    phase
                        .post(
                            &client,
                            &path,
                            &wallets[i].token,
                            &item_body(),
                            Some(&key),
                            &pending,
                        )
                        .await;
                }
            },
        )
        .await?;
        println!(
            "ratio        item writes/s ÷ transfers/s = {:.2} (issue 5 sets no target)",
            items / transfers
        );

        // The reads meet the store at rest, not the projectors' backlog of the writes.
        let mut conn = PgConnection::connect(database_url).await?;
        all_caught_up(&mut conn).await?;
        let (trips, rows): (i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM proj_itineraries), (SELECT count(*) FROM proj_itinerary_items)",
        )
        .fetch_one(&mut conn)
        .await?;
        println!(
            "store        {trips} itineraries, {rows} items; {} of them the list user's",
            self.listed.len()
        );
        eprintln!(
            "detail and list: {} requests each from {} clients…",
            load.reads, load.read_clients
        );
        let detail = read_phase(load.reads, load.read_clients, || Detail {
            client: client.clone(),
            wallets: wallets.clone(),
            trips: self.detail.clone(),
        })
        .await?;
        report_reads("detail", &detail, READ_P99_TARGET_MS, "items/trip");
        let list = read_phase(load.reads, load.read_clients, || List {
            client: client.clone(),
            token: wallets[0].token.clone(),
            listed: self.listed.clone(),
            next: None,
        })
        .await?;
        report_reads("list", &list, READ_P99_TARGET_MS, "trips/page");
        let p99 = |s: &super::ReadStats| {
            s.by_kind
                .get("")
                .map_or(f64::INFINITY, |(h, _)| super::ms(h.value_at_quantile(0.99)))
        };
        println!(
            "targets      detail p99 ≤ {READ_P99_TARGET_MS} ms: {}; list p99 ≤ {READ_P99_TARGET_MS} ms: {}",
            verdict(p99(&detail) <= READ_P99_TARGET_MS),
            verdict(p99(&list) <= READ_P99_TARGET_MS)
        );
        Ok(())
    }
}

/// Reads a trip of 100 items as its owner.
struct Detail {
    client: Arc<Client>,
    wallets: Arc<Vec<Wallet>>,
    trips: Arc<Vec<(usize, Uuid)>>,
}

impl Reader for Detail {
    async fn read(&mut self) -> anyhow::Result<Sample> {
        let (owner, trip) = self.trips[rand::random_range(0..self.trips.len())];
        let (b, took) = self
            .client
            .timed_read(
                &format!("/v1/itineraries/{trip}"),
                &self.wallets[owner].token,
            )
            .await?;
        let items = b.items.len();
        anyhow::ensure!(
            items == DETAIL_ITEMS,
            "the trip has {items} items, not {DETAIL_ITEMS}"
        );
        Ok(("detail", took, items))
    }
}

/// Pages through the list user's itineraries, carrying the `next` of its last page.
struct List {
    client: Arc<Client>,
    token: String,
    listed: Arc<Vec<Uuid>>,
    next: Option<String>,
}

impl Reader for List {
    async fn read(&mut self) -> anyhow::Result<Sample> {
        let (kind, query) = match (rand::random_range(0..3), self.next.take()) {
            (0, _) => ("first page", String::new()),
            (1, Some(next)) => ("next", format!("?cursor={next}")),
            _ => {
                let from = self.listed[rand::random_range(0..self.listed.len())];
                let cursor = URL_SAFE_NO_PAD.encode(from.as_bytes());
                ("cursor", format!("?cursor={cursor}"))
            }
        };
        let (b, took) = self
            .client
            .timed_read(&format!("/v1/itineraries{query}"), &self.token)
            .await?;
        self.next = b.next;
        let items = b.items.len();
        Ok((kind, took, items))
    }
}
