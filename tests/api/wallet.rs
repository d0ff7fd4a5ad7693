//! Invariants 2, 4, 5 and 6 on the wallet, through the HTTP API.

use futures::future::join_all;
use mathia_tests::{Parties, TestApp, only};
use serde_json::json;

/// Σ over every ledger account, from the event store (each account's last balance_after).
async fn ledger_sum(app: &TestApp) -> i64 {
    sqlx::query_scalar::<_, Option<i64>>(
        "SELECT sum(b)::bigint FROM (
            SELECT DISTINCT ON (stream_id) (payload->>'balance_after')::bigint AS b
            FROM events WHERE event_type IN ('Debited', 'Credited') ORDER BY stream_id, version DESC) s",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap()
    .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_spends_from_one_wallet_never_overdraw_it_and_money_is_conserved() {
    let app = TestApp::spawn().await;
    // A second handlers instance competes for the same commands (invariant 4 across processes).
    app.start(only(false, true, false, false));
    let Parties {
        alice,
        bob_id,
        from,
        ..
    } = app.alice_and_bob(10_000).await;
    // 200 transfers of 70 race on a balance of 10,000: at most 142 can succeed.
    let replies = join_all((0..200).map(|i| {
        let app = &app;
        let alice = alice.clone();
        async move {
            app.post(
                "/v1/transfers",
                Some(&alice),
                &json!({"from_wallet": from, "to_user": bob_id, "amount": 70, "currency": "KES"}),
                &[("idempotency-key", &format!("spend-{i}"))],
            )
            .await
        }
    }))
    .await;
    let ok = replies.iter().filter(|r| r.status == 201).count();
    let refused = replies
        .iter()
        .filter(|r| r.status == 422 && r.body["code"] == "insufficient_funds")
        .count();
    assert_eq!(
        ok + refused,
        200,
        "unexpected answers: {:?}",
        replies.iter().find(|r| r.status != 201 && r.status != 422)
    );
    assert_eq!(ok, 142, "exactly floor(10000/70) spends fit");
    for r in replies.iter().filter(|r| r.status == 201) {
        assert!(r.body["balance"]["posted"].as_i64().unwrap() >= 0);
    }
    app.settle("wallet").await;
    let balance: i64 =
        sqlx::query_scalar("SELECT posted FROM proj_wallet_accounts WHERE account_id = $1")
            .bind(from)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(balance, 10_000 - 142 * 70);
    assert_eq!(ledger_sum(&app).await, 0, "Σ over all accounts must be 0");
    let read_model_sum: i64 =
        sqlx::query_scalar("SELECT sum(posted)::bigint FROM proj_wallet_accounts")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(read_model_sum, 0);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_same_idempotency_key_sent_20_times_at_once_moves_money_once_and_answers_the_same() {
    let app = TestApp::spawn().await;
    let Parties {
        alice,
        bob,
        bob_id,
        from,
        ..
    } = app.alice_and_bob(1_000).await;
    let body = json!({"from_wallet": from, "to_user": bob_id, "amount": 300, "currency": "KES", "reference": "rent"});
    let replies = join_all((0..20).map(|_| {
        app.post(
            "/v1/transfers",
            Some(&alice),
            &body,
            &[("idempotency-key", "rent-2026-11")],
        )
    }))
    .await;
    for r in &replies {
        assert_eq!(r.status, 201, "{}", r.body);
        assert_eq!(r.body, replies[0].body, "every answer is the first answer");
    }
    let transfers: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE event_type = 'Debited' AND stream_id = $1",
    )
    .bind(format!("wallet.account.{from}"))
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(transfers, 1);
    // Later, outside any JetStream window: the ledger still answers the same.
    let again = app
        .post(
            "/v1/transfers",
            Some(&alice),
            &body,
            &[("idempotency-key", "rent-2026-11")],
        )
        .await;
    assert_eq!((again.status, &again.body), (201, &replies[0].body));
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    // Same key, another body: refused, nothing moves.
    let mut other = body.clone();
    other["amount"] = json!(301);
    let r = app
        .post(
            "/v1/transfers",
            Some(&alice),
            &other,
            &[("idempotency-key", "rent-2026-11")],
        )
        .await;
    r.assert_problem(422, "idempotency_key_reused");
    // The key is scoped to the principal: Bob's "rent-2026-11" is another command.
    let r = app
        .post(
            "/v1/transfers",
            Some(&bob),
            &json!({"from_wallet": from, "to_user": bob_id, "amount": 1, "currency": "KES"}),
            &[("idempotency-key", "rent-2026-11")],
        )
        .await;
    r.assert_problem(404, "wallet_not_found");
    app.stop().await;
}

#[tokio::test]
async fn a_failed_transfer_stays_failed_for_its_key() {
    let app = TestApp::spawn().await;
    let Parties {
        admin,
        alice,
        bob_id,
        from,
        ..
    } = app.alice_and_bob(100).await;
    let body = json!({"from_wallet": from, "to_user": bob_id, "amount": 500, "currency": "KES"});
    let first = app
        .post(
            "/v1/transfers",
            Some(&alice),
            &body,
            &[("idempotency-key", "big")],
        )
        .await;
    first.assert_problem(422, "insufficient_funds");
    assert_eq!(first.body["available"], 100);
    // Funds arrive, but the same key keeps its first answer.
    let r = app
        .post(
            &format!("/v1/wallets/{from}/deposits"),
            Some(&admin),
            &json!({"amount": 1000, "currency": "KES"}),
            &[],
        )
        .await;
    assert_eq!(r.status, 201);
    let retry = app
        .post(
            "/v1/transfers",
            Some(&alice),
            &body,
            &[("idempotency-key", "big")],
        )
        .await;
    retry.assert_problem(422, "insufficient_funds");
    assert_eq!(retry.header("idempotent-replayed"), Some("true"));
    app.stop().await;
}

#[tokio::test]
async fn a_read_that_asks_for_the_writes_position_sees_the_write() {
    let app = TestApp::spawn().await;
    let Parties {
        alice,
        bob,
        bob_id,
        from,
        ..
    } = app.alice_and_bob(1_000).await;
    for i in 0..10 {
        let r = app
            .post(
                "/v1/transfers",
                Some(&alice),
                &json!({"from_wallet": from, "to_user": bob_id, "amount": 10, "currency": "KES"}),
                &[],
            )
            .await;
        assert_eq!(r.status, 201);
        let position = r.body["position"].as_i64().unwrap();
        assert_eq!(
            r.header("mathia-position"),
            Some(position.to_string().as_str())
        );
        let w = app
            .get(
                &format!("/v1/wallets/{from}?after_position={position}"),
                Some(&alice),
            )
            .await;
        assert_eq!(w.status, 200);
        assert_eq!(
            w.body["balance"]["posted"],
            1_000 - 10 * (i + 1),
            "the read reflects the write"
        );
        assert!(w.header("mathia-position").unwrap().parse::<i64>().unwrap() >= position);
    }
    let page = app
        .get(&format!("/v1/wallets/{from}/entries?limit=4"), Some(&alice))
        .await;
    assert_eq!(page.status, 200);
    assert_eq!(page.body["items"].as_array().unwrap().len(), 4);
    assert_eq!(page.body["items"][0]["amount"], -10);
    // Walk every page: 11 legs (1 deposit + 10 transfers), newest first, no repeats, then an explicit end.
    let mut versions = vec![];
    let mut cursor: Option<String> = None;
    loop {
        let q = cursor
            .as_ref()
            .map(|c| format!("&cursor={c}"))
            .unwrap_or_default();
        let p = app
            .get(
                &format!("/v1/wallets/{from}/entries?limit=4{q}"),
                Some(&alice),
            )
            .await;
        versions.extend(
            p.body["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["version"].as_i64().unwrap()),
        );
        match p.body["next"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(versions, (2..=12).rev().collect::<Vec<i64>>());
    // Someone else's wallet does not exist for you.
    app.get(&format!("/v1/wallets/{from}"), Some(&bob))
        .await
        .assert_problem(404, "not_found");
    app.get(&format!("/v1/wallets/{from}/entries"), Some(&bob))
        .await
        .assert_problem(404, "not_found");
    app.stop().await;
}

/// JetStream forgets duplicates after two minutes (here: the stream is deleted
/// outright); the ledger does not. A retry then reaches the handler, which
/// answers from the ledger and moves nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_jetstream_forgot_the_command_gets_the_first_answer_from_the_ledger() {
    let app = TestApp::spawn().await;
    let Parties {
        alice,
        bob_id,
        from,
        ..
    } = app.alice_and_bob(1_000).await;
    let body = json!({"from_wallet": from, "to_user": bob_id, "amount": 250, "currency": "KES"});
    let first = app
        .post(
            "/v1/transfers",
            Some(&alice),
            &body,
            &[("idempotency-key", "once")],
        )
        .await;
    assert_eq!(first.status, 201);
    let js = async_nats::jetstream::new(app.nats.clone());
    js.delete_stream(app.subjects.commands_stream())
        .await
        .unwrap();
    // The handlers put the stream back; until then the gateway answers 503.
    let mut retry = app
        .post(
            "/v1/transfers",
            Some(&alice),
            &body,
            &[("idempotency-key", "once")],
        )
        .await;
    for _ in 0..100 {
        if retry.status != 503 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        retry = app
            .post(
                "/v1/transfers",
                Some(&alice),
                &body,
                &[("idempotency-key", "once")],
            )
            .await;
    }
    assert_eq!((retry.status, &retry.body), (201, &first.body));
    assert_eq!(retry.header("idempotent-replayed"), Some("true"));
    let debits: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE event_type = 'Debited' AND stream_id = $1",
    )
    .bind(format!("wallet.account.{from}"))
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(debits, 1, "the retry moved nothing");
    app.stop().await;
}

/// `If-Match` makes a write conditional on the version a client read (the ETag).
#[tokio::test]
async fn a_write_with_a_stale_if_match_gets_412_and_moves_nothing() {
    let app = TestApp::spawn().await;
    let Parties {
        alice,
        bob_id,
        from,
        ..
    } = app.alice_and_bob(1_000).await;
    app.settle("wallet").await;
    let wallet = app.get(&format!("/v1/wallets/{from}"), Some(&alice)).await;
    let etag = wallet.header("etag").unwrap().to_owned();
    assert_eq!(etag, format!("\"{}\"", wallet.body["version"]));
    let pay = |amount: i64| json!({"from_wallet": from, "to_user": bob_id, "amount": amount, "currency": "KES"});
    let first = app
        .post(
            "/v1/transfers",
            Some(&alice),
            &pay(10),
            &[("if-match", &etag)],
        )
        .await;
    assert_eq!(first.status, 201, "{}", first.body);
    let new_etag = first.header("etag").unwrap().to_owned();
    assert_ne!(new_etag, etag);
    // Another device still holds the old ETag: refused, nothing moves.
    let stale = app
        .post(
            "/v1/transfers",
            Some(&alice),
            &pay(20),
            &[("if-match", &etag)],
        )
        .await;
    stale.assert_problem(412, "precondition_failed");
    assert_eq!(
        stale.body["current_version"].to_string(),
        new_etag.trim_matches('"')
    );
    let ok = app
        .post(
            "/v1/transfers",
            Some(&alice),
            &pay(20),
            &[("if-match", &new_etag)],
        )
        .await;
    assert_eq!(ok.status, 201);
    assert_eq!(ok.body["balance"]["posted"], 1_000 - 10 - 20);
    app.post(
        "/v1/transfers",
        Some(&alice),
        &pay(1),
        &[("if-match", "W/nonsense")],
    )
    .await
    .assert_problem(400, "malformed_request");
    app.stop().await;
}

/// The same flow with every background role on a thread of its own (`MATHIA_ROLE_THREADS`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_on_their_own_threads_serve_the_same_answers() {
    let app = TestApp::spawn_with(only(true, true, true, true), |c| c.role_threads = true).await;
    let Parties {
        alice,
        bob_id,
        from,
        ..
    } = app.alice_and_bob(500).await;
    let r = app
        .post(
            "/v1/transfers",
            Some(&alice),
            &json!({"from_wallet": from, "to_user": bob_id, "amount": 120, "currency": "KES"}),
            &[],
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let position = r.body["position"].as_i64().unwrap();
    let w = app
        .get(
            &format!("/v1/wallets/{from}?after_position={position}"),
            Some(&alice),
        )
        .await;
    assert_eq!(w.body["balance"]["posted"], 380);
    app.stop().await;
}
