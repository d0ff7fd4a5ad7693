//! Operations: rebuilding a read model into shadow tables under live writes and
//! swapping it in (`mathia replay`), resuming an interrupted rebuild, and poison
//! events parked so that only their stream waits (`mathia deadletters`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use mathia_tests::TestApp;
use projections::deadletter;
use projections::rebuild::{self, Options, Outcome};
use projections::screen::ScreenQueue;
use projections::wallet::WalletProjector;
use serde_json::json;
use uuid::Uuid;

/// A dry run against the live model: every table identical.
pub(crate) async fn assert_live_equals_a_fresh_rebuild(app: &TestApp) {
    let outcome = rebuild::rebuild(
        &app.pool,
        &WalletProjector,
        &Options {
            dry_run: true,
            ..Options::default()
        },
        |_| {},
    )
    .await
    .expect("dry run");
    let Outcome::DryRun { tables, .. } = &outcome else {
        panic!("a dry run answers DryRun: {outcome:?}");
    };
    assert_eq!(tables.len(), WalletProjector.tables().len());
    for t in tables {
        assert_eq!(
            (t.only_live, t.only_rebuilt),
            (0, 0),
            "{} differs from a fresh rebuild: {t:?}",
            t.table
        );
    }
    assert!(
        tables.iter().any(|t| t.live_rows > 0),
        "the comparison saw the rows"
    );
    // A dry run leaves nothing behind.
    let schemas: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'mathia_rebuild_%' OR nspname LIKE 'mathia_retired_%'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(schemas, 0, "dry run dropped its shadow");
}

async fn epoch(app: &TestApp, model: &str) -> i64 {
    sqlx::query_scalar("SELECT epoch FROM proj_checkpoints WHERE model = $1")
        .bind(model)
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

use projections::Projector as _;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rebuild_under_live_writes_swaps_in_a_model_equal_to_a_fresh_rebuild() {
    let app = Arc::new(TestApp::spawn().await);
    let (_, admin) = app.admin().await;
    let mut parties = vec![];
    for i in 0..6 {
        let (id, token) = app.user(&format!("r{i}@test.local")).await;
        let wallet = app.funded_wallet(&token, &admin, 1_000_000).await;
        parties.push((id, token, wallet));
    }
    // The readers' first lap reads every wallet: the newest must be in the model.
    app.settle("wallet").await;
    let parties = Arc::new(parties);
    let stop = Arc::new(AtomicBool::new(false));
    let transfers = Arc::new(AtomicU64::new(0));

    // Writers: transfers in a ring, all the time.
    let mut writers = vec![];
    for w in 0..4usize {
        let (app, parties, stop, transfers) = (
            app.clone(),
            parties.clone(),
            stop.clone(),
            transfers.clone(),
        );
        writers.push(tokio::spawn(async move {
            let mut i = w;
            while !stop.load(Ordering::Relaxed) {
                let (from, to) = (&parties[i % 6], &parties[(i + 1) % 6]);
                let r = app
                    .post(
                        "/v1/transfers",
                        Some(&from.1),
                        &json!({"from_wallet": from.2, "to_user": to.0, "amount": 3, "currency": "KES"}),
                        &[("idempotency-key", &Uuid::new_v4().to_string())],
                    )
                    .await;
                assert!(r.status < 300, "transfer: {} {}", r.status, r.body);
                transfers.fetch_add(1, Ordering::Relaxed);
                i += 4;
            }
        }));
    }
    // Readers: every read succeeds and sees a whole model — Σ = 0 (a batch never
    // ends between a transfer's two legs), and the row counts never go
    // backwards (a half-built table would have fewer rows).
    let reader = {
        let (pool, stop) = (app.pool.clone(), stop.clone());
        tokio::spawn(async move {
            let (mut reads, mut max_accounts, mut max_entries) = (0u64, 0i64, 0i64);
            while !stop.load(Ordering::Relaxed) {
                let (accounts, sum, entries): (i64, i64, i64) = sqlx::query_as(
                    "SELECT (SELECT count(*) FROM proj_wallet_accounts),
                            (SELECT coalesce(sum(posted), 0)::bigint FROM proj_wallet_accounts),
                            (SELECT count(*) FROM proj_wallet_entries)",
                )
                .fetch_one(&pool)
                .await
                .expect("a read never fails during a rebuild");
                assert_eq!(sum, 0, "Σ = 0 in every read");
                assert!(
                    accounts >= max_accounts,
                    "accounts went {max_accounts} → {accounts}"
                );
                assert!(
                    entries >= max_entries,
                    "entries went {max_entries} → {entries}"
                );
                (max_accounts, max_entries) = (accounts, entries);
                reads += 1;
            }
            reads
        })
    };
    let api_reader = {
        let (app, parties, stop) = (app.clone(), parties.clone(), stop.clone());
        tokio::spawn(async move {
            let mut reads = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let (_, token, wallet) = &parties[reads as usize % 6];
                let r = app.get(&format!("/v1/wallets/{wallet}"), Some(token)).await;
                assert_eq!(r.status, 200, "wallet read during a rebuild: {}", r.body);
                reads += 1;
            }
            reads
        })
    };

    while transfers.load(Ordering::Relaxed) < 100 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = epoch(&app, "wallet").await;
    let outcome = rebuild::rebuild(&app.pool, &WalletProjector, &Options::default(), |_| {})
        .await
        .expect("rebuild");
    let Outcome::Swapped {
        epoch: new_epoch,
        events,
        resumed,
        ..
    } = outcome
    else {
        panic!("a rebuild swaps: {outcome:?}");
    };
    assert!(events > 100, "it rebuilt from the log ({events} events)");
    assert!(!resumed);
    assert_eq!(new_epoch, before + 1, "a swap starts a new epoch");
    assert_eq!(epoch(&app, "wallet").await, new_epoch);
    // Writes keep flowing into the swapped-in tables.
    let after_swap = transfers.load(Ordering::Relaxed);
    while transfers.load(Ordering::Relaxed) < after_swap + 50 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.expect("writer");
    }
    assert!(reader.await.expect("reader") > 10, "the reader ran");
    assert!(
        api_reader.await.expect("api reader") > 10,
        "the API reader ran"
    );
    app.settle("wallet").await;
    let sum: i64 =
        sqlx::query_scalar("SELECT coalesce(sum(posted), 0)::bigint FROM proj_wallet_accounts")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(sum, 0, "Σ = 0");
    assert_live_equals_a_fresh_rebuild(&app).await;
    // The live model kept its indexes and constraints under their names.
    let indexes: Vec<String> = sqlx::query_scalar(
        "SELECT indexname FROM pg_indexes WHERE schemaname = current_schema() AND tablename = 'proj_wallet_entries' ORDER BY 1",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert!(
        indexes.iter().any(|i| i == "proj_wallet_entries_pkey"),
        "indexes keep their names: {indexes:?}"
    );
    Arc::into_inner(app).expect("sole owner").stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_rebuild_resumes_and_reactors_are_never_rebuilt() {
    let app = TestApp::spawn().await;
    let p = app.alice_and_bob(10_000).await;
    for _ in 0..20 {
        let r = app
            .post(
                "/v1/transfers",
                Some(&p.alice),
                &json!({"from_wallet": p.from, "to_user": p.bob_id, "amount": 5, "currency": "KES"}),
                &[("idempotency-key", &Uuid::new_v4().to_string())],
            )
            .await;
        assert!(r.status < 300, "{}", r.body);
    }
    app.settle("wallet").await;

    let paused = rebuild::rebuild(
        &app.pool,
        &WalletProjector,
        &Options {
            batch: Some(10),
            max_events: Some(10),
            ..Options::default()
        },
        |_| {},
    )
    .await
    .expect("first run");
    let Outcome::Paused { position, .. } = paused else {
        panic!("stops after 10 events: {paused:?}");
    };
    let head = handlers::store::head_position(&app.pool).await.unwrap();
    assert!(position > 0 && position < head, "{position} of {head}");
    let js = async_nats::jetstream::new(app.nats.clone());
    let status =
        projections::status::gather(&app.pool, &js, &app.subjects, Duration::from_secs(60))
            .await
            .unwrap();
    assert_eq!(status.rebuilds.len(), 1, "status shows the rebuild");
    assert_eq!(status.rebuilds[0].position, position);
    let live_before = app.count("proj_wallet_entries").await;

    let done = rebuild::rebuild(&app.pool, &WalletProjector, &Options::default(), |_| {})
        .await
        .expect("second run");
    let Outcome::Swapped {
        resumed, events, ..
    } = done
    else {
        panic!("the second run finishes: {done:?}");
    };
    assert!(resumed, "it resumed the interrupted rebuild");
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE domain = 'wallet'")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert!(
        (events as i64) < total,
        "the second run applied only what the first had not ({events} of {total})"
    );
    assert_eq!(app.count("proj_wallet_entries").await, live_before);
    assert_live_equals_a_fresh_rebuild(&app).await;

    let refused = rebuild::rebuild(&app.pool, &ScreenQueue, &Options::default(), |_| {}).await;
    let message = format!("{:#}", refused.expect_err("a reactor is refused"));
    assert!(message.contains("reactor"), "{message}");
    app.stop().await;
}

/// Append raw events to `stream` the way the store does (positions from the head row).
async fn append_raw(app: &TestApp, stream: &str, version: i64, payload: serde_json::Value) {
    let mut tx = app.pool.begin().await.unwrap();
    let position: i64 =
        sqlx::query_scalar("UPDATE event_log_head SET position = position + 1 RETURNING position")
            .fetch_one(&mut *tx)
            .await
            .unwrap();
    let event_type = payload["type"].as_str().unwrap().to_owned();
    sqlx::query(
        "INSERT INTO events (position, event_id, stream_id, version, domain, event_type, schema_version,
                             payload, occurred_at, correlation_id, causation_id, actor)
         VALUES ($1, $2, $3, $4, 'wallet', $5, 1, $6, now(), $2, $2, NULL)",
    )
    .bind(position)
    .bind(Uuid::new_v4())
    .bind(stream)
    .bind(version)
    .bind(event_type)
    .bind(payload)
    .execute(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_event_parks_only_its_stream_until_skipped() {
    let app = TestApp::spawn().await;
    let p = app.alice_and_bob(10_000).await;
    app.settle("wallet").await;
    let opened: serde_json::Value = sqlx::query_scalar(
        "SELECT payload FROM events WHERE event_type = 'AccountOpened' AND payload->>'owner_id' IS NOT NULL LIMIT 1",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();

    // A stream whose first event this projector cannot decode (a newer schema, say).
    let account = Uuid::new_v4();
    let stream = format!("wallet.account.{account}");
    append_raw(
        &app,
        &stream,
        1,
        json!({"type": "AccountRenamed", "account_id": account, "name": "x"}),
    )
    .await;
    app.settle("wallet").await;
    let letters = deadletter::list(&app.pool, Some("wallet"), false)
        .await
        .unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    let poison = letters[0].clone();
    assert_eq!(
        (poison.status.as_str(), poison.stream_id.as_str()),
        ("parked", stream.as_str())
    );
    assert!(
        poison
            .error
            .as_deref()
            .unwrap_or("")
            .contains("AccountRenamed"),
        "the error says why: {:?}",
        poison.error
    );

    // A later, valid event of the same stream waits behind it…
    let mut valid = opened.clone();
    valid["account_id"] = json!(account);
    append_raw(&app, &stream, 2, valid).await;
    // …while every other stream flows.
    let r = app
        .post(
            "/v1/transfers",
            Some(&p.alice),
            &json!({"from_wallet": p.from, "to_user": p.bob_id, "amount": 70, "currency": "KES"}),
            &[("idempotency-key", &Uuid::new_v4().to_string())],
        )
        .await;
    assert!(r.status < 300, "{}", r.body);
    app.settle("wallet").await;
    let bob: i64 = sqlx::query_scalar(
        "SELECT posted FROM proj_wallet_accounts WHERE owner_id = $1 AND kind = 'user'",
    )
    .bind(p.bob_id)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(bob, 70, "the other streams flowed past the poison event");
    let letters = deadletter::list(&app.pool, Some("wallet"), false)
        .await
        .unwrap();
    assert_eq!(
        letters
            .iter()
            .map(|d| d.status.as_str())
            .collect::<Vec<_>>(),
        ["parked", "waiting"]
    );
    assert_eq!(
        app.count(&format!(
            "proj_wallet_accounts WHERE account_id = '{account}'"
        ))
        .await,
        0
    );

    // Status says so, and exits non-zero (`stuck` non-empty).
    let js = async_nats::jetstream::new(app.nats.clone());
    let status =
        projections::status::gather(&app.pool, &js, &app.subjects, Duration::from_secs(60))
            .await
            .unwrap();
    let wallet = status
        .dead_letters
        .iter()
        .find(|d| d.model == "wallet")
        .expect("listed");
    assert_eq!((wallet.parked, wallet.waiting, wallet.streams), (1, 1, 1));
    assert!(
        status
            .stuck
            .iter()
            .any(|s| s.contains("wallet") && s.contains("parked"))
    );

    // Retrying what still cannot be applied changes nothing but the attempt count.
    let settled = deadletter::retry(&app.pool, &WalletProjector, poison.id)
        .await
        .unwrap();
    assert_eq!(settled.applied, 0);
    assert_eq!(settled.still_parked.expect("still parked").attempts, 2);
    // A waiting event cannot be settled before the parked one.
    let waiting = deadletter::list(&app.pool, Some("wallet"), false)
        .await
        .unwrap()[1]
        .id;
    assert!(
        deadletter::skip(&app.pool, &WalletProjector, waiting)
            .await
            .is_err()
    );

    // Skipping it applies the waiting event; the stream flows again.
    let settled = deadletter::skip(&app.pool, &WalletProjector, poison.id)
        .await
        .unwrap();
    assert_eq!((settled.applied, settled.skipped), (1, 1));
    assert!(settled.still_parked.is_none());
    assert_eq!(
        app.count(&format!(
            "proj_wallet_accounts WHERE account_id = '{account}'"
        ))
        .await,
        1
    );
    assert!(
        deadletter::list(&app.pool, Some("wallet"), false)
            .await
            .unwrap()
            .is_empty()
    );
    let all = deadletter::list(&app.pool, Some("wallet"), true)
        .await
        .unwrap();
    assert_eq!(all.len(), 1, "the skipped event stays on record");
    assert_eq!(all[0].status, "skipped");
    // A rebuild leaves the skipped event out, as the live model did.
    assert_live_equals_a_fresh_rebuild(&app).await;
    app.stop().await;
}

/// `mathia replay all` rebuilds every read model side by side: a dry run first
/// finds each equal to the live one (which was built batch by batch, where the
/// rebuild takes everything in one batch: the feed then finds the room of an
/// edit or reaction among the same batch's posts); then, through a pool of two
/// connections for five models, each is swapped in with a new epoch, no shadow
/// is left behind, and the reactors keep their generation.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replay_all_rebuilds_every_read_model_side_by_side() {
    let app = TestApp::spawn().await;
    let (_, admin) = app.admin().await;
    let (_, alice) = app.user("alice@test.local").await;
    let (bob_id, bob) = app.user("bob@test.local").await;
    let wallet = app.funded_wallet(&alice, &admin, 1_000).await;
    app.funded_wallet(&bob, &admin, 1_000).await;
    let r = app
        .post(
            "/v1/transfers",
            Some(&alice),
            &json!({"from_wallet": wallet, "to_user": bob_id, "amount": 5, "currency": "KES"}),
            &[("idempotency-key", &Uuid::new_v4().to_string())],
        )
        .await;
    assert!(r.status < 300, "transfer: {}", r.body);
    let room = crate::chat::room(&app, &bob, "R", "private").await;
    let (m, _) = crate::chat::say(&app, &bob, room, "side by side").await;
    let e = app
        .call(
            "PATCH",
            &format!("/v1/rooms/{room}/messages/{m}"),
            Some(&bob),
            Some(&json!({"body": "side by side, edited"})),
            &[],
        )
        .await;
    assert_eq!(e.status, 200, "{}", e.body);
    let react = app
        .call(
            "PUT",
            &format!("/v1/rooms/{room}/messages/{m}/reactions/ok"),
            Some(&bob),
            None,
            &[],
        )
        .await;
    assert_eq!(react.status, 200, "{}", react.body);
    for model in ["wallet", "chat", "feed"] {
        app.settle(model).await;
    }
    // The live feed holds the edit and the reaction on the room's topic.
    let on_room: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM proj_feed WHERE kind IN ('MessageEdited', 'ReactionAdded')
           AND payload->>'room_id' = $1",
    )
    .bind(room.to_string())
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(on_room, 2);
    // A dry run of every model finds nothing to change (exit code 0, not 1).
    let dry = Options {
        dry_run: true,
        ..Options::default()
    };
    let code = mathia::ops::replay(&app.config, &app.pool, "all", &dry, true)
        .await
        .expect("dry run of all");
    assert_eq!(code, 0);

    let models = mathia::ops::READ_MODELS;
    let mut before = vec![];
    for m in models.iter().chain(mathia::ops::REACTORS) {
        before.push(epoch(&app, m).await);
    }
    let small = handlers::infra::connect_pg(&app.config.database_url, 2)
        .await
        .unwrap();
    let code = mathia::ops::replay(&app.config, &small, "all", &Options::default(), true)
        .await
        .expect("replay all");
    assert_eq!(code, 0);
    for (i, m) in models.iter().chain(mathia::ops::REACTORS).enumerate() {
        let now = epoch(&app, m).await;
        if i < models.len() {
            assert!(now > before[i], "{m}: epoch {} → {now}", before[i]);
        } else {
            assert_eq!(now, before[i], "reactor {m} was not rebuilt");
        }
    }
    let leftovers: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'mathia_rebuild_%'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(leftovers, 0);
    // The swapped-in tables keep the live ones' storage parameters.
    let options: Option<Vec<String>> = sqlx::query_scalar(
        "SELECT reloptions FROM pg_class WHERE oid = 'proj_chat_unread'::regclass",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(options, Some(vec!["fillfactor=50".to_owned()]));
    assert_live_equals_a_fresh_rebuild(&app).await;
    let r = app
        .get(&format!("/v1/rooms/{room}/messages"), Some(&bob))
        .await;
    assert_eq!(
        r.body["items"][0]["body"], "side by side, edited",
        "{}",
        r.body
    );
    app.stop().await;
}
