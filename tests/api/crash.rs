//! Invariant 1 (no lost event) and 2 (no duplicate effect) under crashes: the
//! handlers, the relay and the projector are killed mid-stream and restarted,
//! the EVENTS stream is purged behind a stopped projector, and the read model
//! must still equal what the event store says.

use std::time::Duration;

use futures::future::join_all;
use mathia_tests::{Reply, TestApp, only};
use serde_json::json;

/// Compare the wallet read model with the event store, row for row.
async fn assert_read_model_matches_the_log(app: &TestApp) {
    app.settle("wallet").await;
    let mismatches: i64 = sqlx::query_scalar(
        "WITH truth AS (
            SELECT DISTINCT ON (stream_id) split_part(stream_id, '.', 3)::uuid AS id, version,
                   coalesce((payload->>'balance_after')::bigint, 0) AS posted
            FROM events WHERE domain = 'wallet' ORDER BY stream_id, version DESC)
         SELECT count(*) FROM truth t FULL JOIN proj_wallet_accounts a ON a.account_id = t.id
         WHERE a.account_id IS NULL OR t.id IS NULL OR a.posted <> t.posted OR a.version <> t.version",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(mismatches, 0, "balances differ from the event store");
    let legs: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE event_type IN ('Debited', 'Credited')",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(
        app.count("proj_wallet_entries").await,
        legs,
        "every leg once in the history"
    );
    let sum: i64 =
        sqlx::query_scalar("SELECT coalesce(sum(posted), 0)::bigint FROM proj_wallet_accounts")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(sum, 0, "Σ = 0");
    let doubled: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT payload->>'transfer_id' FROM events WHERE event_type IN ('Debited','Credited')
         GROUP BY 1 HAVING count(*) <> 2) x",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(doubled, 0, "every transfer has exactly two legs");
}

/// Wait for a possibly-202 answer to be decided.
async fn decided(app: &TestApp, token: &str, r: Reply) -> Reply {
    if r.status != 202 {
        return r;
    }
    let id = r.body["command_id"].as_str().unwrap().to_owned();
    for _ in 0..400 {
        let p = app.get(&format!("/v1/commands/{id}"), Some(token)).await;
        if p.status != 202 {
            return p;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("command {id} was never decided");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_handlers_relay_and_projector_mid_stream_loses_and_duplicates_nothing() {
    let app = TestApp::spawn_with(only(true, false, false, false), |_| {}).await;
    let handlers = app.start(only(false, true, false, false));
    let relay = app.start(only(false, false, true, false));
    let projector = app.start(only(false, false, false, true));
    let (_, admin) = app.admin().await;
    let mut users = vec![];
    for i in 0..4 {
        let (id, token) = app.user(&format!("u{i}@test.local")).await;
        let wallet = app.funded_wallet(&token, &admin, 100_000).await;
        users.push((id, token, wallet));
    }
    let burst = {
        let users = users.clone();
        let app = &app;
        async move {
            join_all((0..400).map(|i| {
                let (_, token, from) = users[i % 4].clone();
                let to = users[(i + 1) % 4].0;
                async move {
                    tokio::time::sleep(Duration::from_millis((i as u64 % 50) * 20)).await;
                    let key = format!("burst-{i}");
                    let r = app
                        .post("/v1/transfers", Some(&token), &json!({"from_wallet": from, "to_user": to, "amount": 7, "currency": "KES"}), &[("idempotency-key", &key)])
                        .await;
                    decided(app, &token, r).await
                }
            }))
            .await
        }
    };
    // Kill each role twice at staggered moments of the burst, restarting it at once.
    let chaos = async {
        let (mut h, mut r, mut p) = (handlers, relay, projector);
        for round in 0..6 {
            tokio::time::sleep(Duration::from_millis(120)).await;
            match round % 3 {
                0 => {
                    app.crash(h).await;
                    h = app.start(only(false, true, false, false));
                }
                1 => {
                    app.crash(r).await;
                    r = app.start(only(false, false, true, false));
                }
                _ => {
                    app.crash(p).await;
                    p = app.start(only(false, false, false, true));
                }
            }
        }
    };
    let (answers, ()) = tokio::join!(burst, chaos);
    let ok = answers
        .iter()
        .filter(|r| r.status == 201 || r.status == 200)
        .count();
    assert_eq!(
        ok,
        400,
        "every transfer is decided and accepted: {:?}",
        answers.iter().find(|r| r.status >= 300)
    );
    assert_read_model_matches_the_log(&app).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projector_catches_up_from_the_store_when_the_stream_lost_what_it_missed() {
    let app = TestApp::spawn_with(only(true, true, true, false), |_| {}).await;
    let (_, admin) = app.admin().await;
    let (_, alice) = app.user("alice@test.local").await;
    let wallet = app.funded_wallet(&alice, &admin, 0).await;
    for _ in 0..20 {
        let r = app
            .post(
                &format!("/v1/wallets/{wallet}/deposits"),
                Some(&admin),
                &json!({"amount": 5, "currency": "KES"}),
                &[],
            )
            .await;
        assert_eq!(r.status, 201);
    }
    // The relay published everything; now the stream forgets it all.
    let head = handlers::store::head_position(&app.pool).await.unwrap();
    for _ in 0..100 {
        let published: i64 = sqlx::query_scalar("SELECT position FROM relay_checkpoint")
            .fetch_one(&app.pool)
            .await
            .unwrap();
        if published >= head {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let js = async_nats::jetstream::new(app.nats.clone());
    js.get_stream(app.subjects.events_stream())
        .await
        .unwrap()
        .purge()
        .await
        .unwrap();
    app.start(only(false, false, false, true));
    assert_read_model_matches_the_log(&app).await;
    let w = app
        .get(&format!("/v1/wallets/{wallet}"), Some(&alice))
        .await;
    assert_eq!(w.body["balance"]["posted"], 100);
    app.stop().await;
}

/// Two instances of every role (one gateway) share the work without breaking
/// an invariant: competing handlers, a relay leader and a standby, two
/// instances of the wallet projector on one checkpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_of_every_role_cooperate() {
    let app = TestApp::spawn().await;
    app.start(only(false, true, true, true));
    let (_, admin) = app.admin().await;
    let mut users = vec![];
    for i in 0..3 {
        let (id, token) = app.user(&format!("u{i}@test.local")).await;
        let wallet = app.funded_wallet(&token, &admin, 10_000).await;
        users.push((id, token, wallet));
    }
    let answers = join_all((0..300).map(|i| {
        let (_, token, from) = users[i % 3].clone();
        let to = users[(i + 1) % 3].0;
        let app = &app;
        async move {
            let r = app
                .post(
                    "/v1/transfers",
                    Some(&token),
                    &json!({"from_wallet": from, "to_user": to, "amount": 3, "currency": "KES"}),
                    &[],
                )
                .await;
            decided(app, &token, r).await
        }
    }))
    .await;
    assert!(
        answers.iter().all(|r| r.status == 201),
        "{:?}",
        answers.iter().find(|r| r.status != 201)
    );
    assert_read_model_matches_the_log(&app).await;
    app.stop().await;
}
