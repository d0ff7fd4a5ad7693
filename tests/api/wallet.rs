//! Invariants 2, 4, 5 and 6 on the wallet, through the HTTP API.

use futures::future::join_all;
use mathia_tests::{Parties, TestApp, only};
use serde_json::json;

/// Σ over every ledger account, from the event store (each account's last balance_after).
pub(crate) async fn ledger_sum(app: &TestApp) -> i64 {
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

/// TigerBeetle's transfer contract over HTTP: the id is the Idempotency-Key;
/// a retry answers `exists` with the first result; the same id with another
/// body is refused naming the field; a failed id stays failed.
#[tokio::test]
async fn a_wallet_transfer_id_is_spent_once_exists_on_retry_and_names_a_changed_field() {
    let app = TestApp::spawn().await;
    let Parties {
        alice,
        bob_id,
        from,
        ..
    } = app.alice_and_bob(1_000).await;
    let body = json!({"from_wallet": from, "to_user": bob_id, "amount": 300, "currency": "KES", "reference": "rent"});
    let key = [("idempotency-key", "t-1")];
    let first = app.post("/v1/transfers", Some(&alice), &body, &key).await;
    assert_eq!(first.status, 201, "{}", first.body);
    assert_eq!(first.header("mathia-result"), None);
    assert_eq!(first.body["balance"]["available"], 700);
    let again = app.post("/v1/transfers", Some(&alice), &body, &key).await;
    assert_eq!((again.status, &again.body), (201, &first.body));
    assert_eq!(again.header("mathia-result"), Some("exists"));
    let mut changed = body.clone();
    changed["amount"] = json!(301);
    let r = app
        .post("/v1/transfers", Some(&alice), &changed, &key)
        .await;
    r.assert_problem(422, "idempotency_key_reused");
    assert_eq!(
        (&r.body["field"], &r.body["original"]),
        (&json!("amount"), &json!(300))
    );
    let mut changed = body.clone();
    changed["reference"] = json!("rent, december");
    let r = app
        .post("/v1/transfers", Some(&alice), &changed, &key)
        .await;
    assert_eq!(r.body["field"], "reference", "{}", r.body);
    // A failed id stays failed, and a changed body on it is still named.
    let big = json!({"from_wallet": from, "to_user": bob_id, "amount": 5_000, "currency": "KES"});
    let key = [("idempotency-key", "t-2")];
    app.post("/v1/transfers", Some(&alice), &big, &key)
        .await
        .assert_problem(422, "insufficient_funds");
    let retry = app.post("/v1/transfers", Some(&alice), &big, &key).await;
    retry.assert_problem(422, "insufficient_funds");
    assert_eq!(retry.body["result"], "id_already_failed");
    assert_eq!(retry.header("mathia-result"), Some("id_already_failed"));
    let mut smaller = big.clone();
    smaller["amount"] = json!(5);
    let r = app
        .post("/v1/transfers", Some(&alice), &smaller, &key)
        .await;
    r.assert_problem(422, "idempotency_key_reused");
    assert_eq!(r.body["field"], "amount");
    app.stop().await;
}

async fn hold_events(app: &TestApp, hold: &str) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT payload->>'end' FROM events WHERE event_type = 'HoldReleased' AND payload->>'hold_id' = $1",
    )
    .bind(hold)
    .fetch_all(&app.pool)
    .await
    .unwrap()
}

/// Holds: available = posted − pending in every answer; a partial post moves
/// only what it captures; the payee voids; an expired hold is released once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wallet_holds_post_in_part_void_and_expire_exactly_once() {
    let app = TestApp::spawn().await;
    let Parties {
        alice,
        bob,
        bob_id,
        from,
        ..
    } = app.alice_and_bob(1_000).await;
    let hold = |amount: i64, timeout: i64| json!({"from_wallet": from, "to_user": bob_id, "amount": amount, "currency": "KES", "timeout_secs": timeout});
    let h1 = app
        .post("/v1/holds", Some(&alice), &hold(600, 3600), &[])
        .await;
    assert_eq!(h1.status, 201, "{}", h1.body);
    assert_eq!(h1.body["status"], "pending");
    assert_eq!(
        (
            &h1.body["balance"]["posted"],
            &h1.body["balance"]["pending"],
            &h1.body["balance"]["available"]
        ),
        (&json!(1000), &json!(600), &json!(400))
    );
    let h1_id = h1.body["hold_id"].as_str().unwrap().to_owned();
    let pos = h1.body["position"].as_i64().unwrap();
    // Held money cannot be spent again.
    app.post(
        "/v1/transfers",
        Some(&alice),
        &json!({"from_wallet": from, "to_user": bob_id, "amount": 401, "currency": "KES"}),
        &[],
    )
    .await
    .assert_problem(422, "insufficient_funds");
    let w = app
        .get(
            &format!("/v1/wallets/{from}?after_position={pos}"),
            Some(&alice),
        )
        .await;
    assert_eq!(w.body["balance"]["available"], 400, "{}", w.body);
    // The payer cannot void; the payee posts 250 of 600.
    app.post(
        &format!("/v1/holds/{h1_id}/void?after_position={pos}"),
        Some(&alice),
        &json!({}),
        &[],
    )
    .await
    .assert_problem(403, "forbidden");
    let posted = app
        .post(
            &format!("/v1/holds/{h1_id}/post?after_position={pos}"),
            Some(&bob),
            &json!({"amount": 250}),
            &[],
        )
        .await;
    assert_eq!(posted.status, 200, "{}", posted.body);
    assert_eq!(
        (&posted.body["posted"], &posted.body["released"]),
        (&json!(250), &json!(350))
    );
    assert_eq!(
        posted.body["balance"]["posted"], 250,
        "the payee sees their balance"
    );
    app.post(
        &format!("/v1/holds/{h1_id}/post"),
        Some(&bob),
        &json!({}),
        &[],
    )
    .await
    .assert_problem(409, "hold_already_posted");
    // A second hold, voided by the payee.
    let h2 = app
        .post("/v1/holds", Some(&alice), &hold(100, 3600), &[])
        .await;
    let h2_id = h2.body["hold_id"].as_str().unwrap().to_owned();
    let pos = h2.body["position"].as_i64().unwrap();
    let voided = app
        .post(
            &format!("/v1/holds/{h2_id}/void?after_position={pos}"),
            Some(&bob),
            &json!({}),
            &[],
        )
        .await;
    assert_eq!(
        (voided.status, &voided.body["status"]),
        (200, &json!("voided")),
        "{}",
        voided.body
    );
    // A third one times out after a second: the scheduler releases it, once.
    let h3 = app
        .post("/v1/holds", Some(&alice), &hold(700, 1), &[])
        .await;
    assert_eq!(h3.status, 201, "{}", h3.body);
    assert_eq!(h3.body["balance"]["available"], 50);
    let h3_id = h3.body["hold_id"].as_str().unwrap().to_owned();
    let mut status = json!(null);
    for _ in 0..100 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let v = app.get(&format!("/v1/holds/{h3_id}"), Some(&bob)).await;
        status = v.body["status"].clone();
        if status == "expired" {
            break;
        }
    }
    assert_eq!(status, "expired");
    // Give the scheduler time to fire again, if it were going to.
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    assert_eq!(hold_events(&app, &h3_id).await, vec!["expired".to_owned()]);
    assert_eq!(hold_events(&app, &h1_id).await, vec!["posted".to_owned()]);
    app.post(
        &format!("/v1/holds/{h3_id}/post"),
        Some(&bob),
        &json!({}),
        &[],
    )
    .await
    .assert_problem(409, "hold_already_expired");
    app.settle("wallet").await;
    let w = app.get(&format!("/v1/wallets/{from}"), Some(&alice)).await;
    assert_eq!(
        (
            &w.body["balance"]["posted"],
            &w.body["balance"]["pending"],
            &w.body["balance"]["available"]
        ),
        (&json!(750), &json!(0), &json!(750))
    );
    // Strangers do not see holds.
    let (_, eve) = app.user("eve@test.local").await;
    app.get(&format!("/v1/holds/{h1_id}"), Some(&eve))
        .await
        .assert_problem(404, "not_found");
    assert_eq!(ledger_sum(&app).await, 0);
    app.stop().await;
}

/// 500 concurrent spends (transfers, withdrawals, holds) against one balance and
/// one daily limit, with a second handlers instance competing: neither is ever
/// exceeded, and each refusal names the limit and what remains.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wallet_limits_hold_under_500_concurrent_spends() {
    let app = TestApp::spawn().await;
    app.start(only(false, true, false, false));
    let Parties {
        alice,
        bob_id,
        from,
        ..
    } = app.alice_and_bob(25_000).await;
    let dest = "mpesa:+254700000001";
    let r = app
        .call(
            "PUT",
            &format!("/v1/wallets/{from}/limits"),
            Some(&alice),
            Some(&json!({"daily_spend_limit": 21_000, "max_withdraw_amount": 5_000, "payout_allow_list": [dest]})),
            &[],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["limits"]["daily_remaining"], 21_000);
    // Refusals that name their limit.
    let w = |amount: i64, d: &str| json!({"amount": amount, "currency": "KES", "destination": d});
    let r = app
        .post(
            &format!("/v1/wallets/{from}/withdrawals"),
            Some(&alice),
            &w(5_001, dest),
            &[],
        )
        .await;
    r.assert_problem(422, "max_withdraw_amount_exceeded");
    assert_eq!(
        (&r.body["limit"], &r.body["remaining"]),
        (&json!("max_withdraw_amount"), &json!(5_000))
    );
    app.post(
        &format!("/v1/wallets/{from}/withdrawals"),
        Some(&alice),
        &w(10, "bank:other"),
        &[],
    )
    .await
    .assert_problem(422, "payout_destination_not_allowed");
    let replies = join_all((0..500).map(|i| {
        let (app, alice) = (&app, alice.clone());
        async move {
            let key = [("idempotency-key", format!("spend-{i}"))];
            let key = [(key[0].0, key[0].1.as_str())];
            match i % 3 {
                0 => app.post("/v1/transfers", Some(&alice),
                        &json!({"from_wallet": from, "to_user": bob_id, "amount": 70, "currency": "KES"}), &key).await,
                1 => app.post(&format!("/v1/wallets/{from}/withdrawals"), Some(&alice), &w(70, dest), &key).await,
                _ => app.post("/v1/holds", Some(&alice),
                        &json!({"from_wallet": from, "to_user": bob_id, "amount": 70, "currency": "KES"}), &key).await,
            }
        }
    }))
    .await;
    let ok = replies.iter().filter(|r| r.status == 201).count();
    let limited: Vec<_> = replies
        .iter()
        .filter(|r| r.status == 422 && r.body["code"] == "daily_spend_limit_exceeded")
        .collect();
    assert_eq!(
        ok + limited.len(),
        500,
        "unexpected answers: {:?}",
        replies
            .iter()
            .find(|r| r.status != 201 && r.status != 422)
            .map(|r| &r.body)
    );
    assert_eq!(ok, 300, "exactly 21000/70 spends fit the daily limit");
    for r in &limited {
        assert_eq!(r.body["limit"], "daily_spend_limit");
        assert!(r.body["remaining"].as_i64().unwrap() < 70);
    }
    for r in replies.iter().filter(|r| r.status == 201) {
        assert!(r.body["balance"]["available"].as_i64().unwrap() >= 0);
    }
    app.settle("wallet").await;
    let (posted, pending): (i64, i64) =
        sqlx::query_as("SELECT posted, pending FROM proj_wallet_accounts WHERE account_id = $1")
            .bind(from)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(
        25_000 - posted + pending,
        300 * 70,
        "what left plus what is held = the limit"
    );
    assert!(posted - pending >= 0);
    assert_eq!(ledger_sum(&app).await, 0);
    app.stop().await;
}

/// Fees go to sharded fee accounts and count against balance; linked legs
/// commit or fail as one.
#[tokio::test]
async fn wallet_fees_and_linked_legs_commit_or_fail_as_one() {
    let app = TestApp::spawn_with(mathia::Roles::ALL, |c| {
        c.wallet_fee_bps = 100;
        c.wallet_fee_fixed = 5;
    })
    .await;
    let Parties {
        admin,
        alice,
        bob_id,
        from,
        ..
    } = app.alice_and_bob(10_000).await;
    let (carol_id, carol) = app.user("carol@test.local").await;
    app.funded_wallet(&carol, &admin, 0).await;
    let r = app
        .post(
            "/v1/transfers",
            Some(&alice),
            &json!({"from_wallet": from, "to_user": bob_id, "amount": 1_000, "currency": "KES"}),
            &[],
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(
        (&r.body["fee"], &r.body["balance"]["posted"]),
        (&json!(15), &json!(8_985))
    );
    let leg = |to: uuid::Uuid, amount: i64| json!({"from_wallet": from, "to_user": to, "amount": amount, "currency": "KES"});
    // The second leg does not fit: neither moves.
    let r = app
        .post(
            "/v1/transfers/linked",
            Some(&alice),
            &json!({"legs": [leg(bob_id, 5_000), leg(carol_id, 4_000)]}),
            &[],
        )
        .await;
    r.assert_problem(422, "insufficient_funds");
    assert_eq!(r.body["leg"], 1);
    let r = app
        .post(
            "/v1/transfers/linked",
            Some(&alice),
            &json!({"legs": [leg(bob_id, 5_000), leg(carol_id, 3_985)]}),
            &[],
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["balance"]["posted"], 0);
    assert_eq!(r.body["legs"].as_array().unwrap().len(), 2);
    app.post(
        "/v1/transfers/linked",
        Some(&alice),
        &json!({"legs": []}),
        &[],
    )
    .await
    .assert_problem(422, "invalid_input");
    app.settle("wallet").await;
    let fees: i64 = sqlx::query_scalar(
        "SELECT coalesce(sum(posted), 0)::bigint FROM proj_wallet_accounts WHERE kind = 'system_fees'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(fees, 15);
    let balances: Vec<i64> = sqlx::query_scalar(
        "SELECT posted FROM proj_wallet_accounts WHERE kind = 'user' ORDER BY posted",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(balances, vec![0, 3_985, 6_000]);
    assert_eq!(ledger_sum(&app).await, 0);
    // The auditor's report: Σ debits = Σ credits per currency, from the log.
    app.get("/v1/admin/reconciliation", Some(&alice))
        .await
        .assert_problem(403, "forbidden");
    let report = app.get("/v1/admin/reconciliation", Some(&admin)).await;
    assert_eq!(report.status, 200, "{}", report.body);
    assert_eq!(report.body["balanced"], true, "{}", report.body);
    let kes = &report.body["currencies"][0];
    assert_eq!(
        (&kes["currency"], &kes["difference"], &kes["posted_sum"]),
        (&json!("KES"), &json!(0), &json!(0))
    );
    assert_eq!(
        (&kes["debits"], &kes["fees"], &kes["float"]),
        (&json!(20_000), &json!(15), &json!(-10_000))
    );
    let audited: i64 =
        sqlx::query_scalar("SELECT count(*) FROM audit_log WHERE action = 'admin.reconciliation'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(audited, 1);
    app.stop().await;
}

/// History filters (kind, counterparty, reference, time), the balance at a past
/// instant, and the auditors' journal in log order.
#[tokio::test]
async fn wallet_history_filters_point_in_time_balance_and_journal() {
    let app = TestApp::spawn().await;
    let Parties {
        admin,
        alice,
        bob_id,
        from,
        ..
    } = app.alice_and_bob(1_000).await;
    let bob_wallet = commands::wallet::user_wallet_id(bob_id, "KES".parse().unwrap());
    let pay = |amount: i64, reference: &str| json!({"from_wallet": from, "to_user": bob_id, "amount": amount, "currency": "KES", "reference": reference});
    assert_eq!(
        app.post("/v1/transfers", Some(&alice), &pay(100, "rent"), &[])
            .await
            .status,
        201
    );
    app.settle("wallet").await;
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let between = chrono::Utc::now();
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    assert_eq!(
        app.post("/v1/transfers", Some(&alice), &pay(200, "food"), &[])
            .await
            .status,
        201
    );
    let r = app
        .post(
            &format!("/v1/wallets/{from}/withdrawals"),
            Some(&alice),
            &json!({"amount": 50, "currency": "KES", "destination": "bank:1"}),
            &[],
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    app.settle("wallet").await;
    let entries = |q: String| {
        let alice = alice.clone();
        let app = &app;
        async move {
            let p = app
                .get(&format!("/v1/wallets/{from}/entries?{q}"), Some(&alice))
                .await;
            assert_eq!(p.status, 200, "{}", p.body);
            p.body["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["amount"].as_i64().unwrap())
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(entries("kind=transfer".into()).await, vec![-200, -100]);
    assert_eq!(entries("kind=deposit".into()).await, vec![1_000]);
    assert_eq!(
        entries(format!("counterparty={bob_wallet}")).await,
        vec![-200, -100]
    );
    assert_eq!(entries("reference=rent".into()).await, vec![-100]);
    let t = between
        .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
        .replace('+', "%2B");
    assert_eq!(entries(format!("from={t}")).await, vec![-50, -200]);
    assert_eq!(entries(format!("until={t}")).await, vec![-100, 1_000]);
    app.get(
        &format!("/v1/wallets/{from}/entries?kind=bogus"),
        Some(&alice),
    )
    .await
    .assert_problem(422, "invalid_input");
    let b = app
        .get(&format!("/v1/wallets/{from}/balance?at={t}"), Some(&alice))
        .await;
    assert_eq!(b.status, 200, "{}", b.body);
    assert_eq!(b.body["balance"]["posted"], 900);
    // The journal: every leg of every account, in log order, for admins only.
    app.get("/v1/admin/journal", Some(&alice))
        .await
        .assert_problem(403, "forbidden");
    let j = app.get("/v1/admin/journal?limit=3", Some(&admin)).await;
    assert_eq!(j.status, 200, "{}", j.body);
    let next = j.body["next"].as_i64().unwrap();
    let rest = app
        .get(
            &format!("/v1/admin/journal?after={next}&limit=1000"),
            Some(&admin),
        )
        .await;
    let all: Vec<i64> = j.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .chain(rest.body["items"].as_array().unwrap())
        .map(|l| l["amount"].as_i64().unwrap())
        .collect();
    assert_eq!(all.len(), 8, "4 movements, 2 legs each");
    assert_eq!(all.iter().sum::<i64>(), 0);
    app.stop().await;
}

/// Refunds: partial, several, concurrent, and together never above the original.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wallet_refunds_are_partial_multiple_and_never_exceed_the_original() {
    let app = TestApp::spawn().await;
    let Parties {
        alice,
        bob,
        bob_id,
        from,
        ..
    } = app.alice_and_bob(1_000).await;
    let r = app
        .post(
            "/v1/transfers",
            Some(&alice),
            &json!({"from_wallet": from, "to_user": bob_id, "amount": 300, "currency": "KES"}),
            &[],
        )
        .await;
    let t = r.body["transfer_id"].as_str().unwrap().to_owned();
    let pos = r.body["position"].as_i64().unwrap();
    let path = format!("/v1/transfers/{t}/refunds?after_position={pos}");
    // The payer cannot refund to themselves.
    app.post(&path, Some(&alice), &json!({"amount": 10}), &[])
        .await
        .assert_problem(404, "transfer_not_found");
    let first = app
        .post(
            &path,
            Some(&bob),
            &json!({"amount": 100, "reference": "returned one"}),
            &[],
        )
        .await;
    assert_eq!(first.status, 201, "{}", first.body);
    assert_eq!(
        (&first.body["kind"], &first.body["refundable_remaining"]),
        (&json!("refund"), &json!(200))
    );
    // Ten concurrent refunds of 50 on the 200 left: exactly four fit.
    let replies = join_all((0..10).map(|_| {
        let (app, path, bob) = (&app, &path, &bob);
        async move { app.post(path, Some(bob), &json!({"amount": 50}), &[]).await }
    }))
    .await;
    let ok = replies.iter().filter(|r| r.status == 201).count();
    assert!(
        replies
            .iter()
            .all(|r| r.status == 201 || r.body["code"] == "refund_exceeds_original")
    );
    assert_eq!(ok, 4);
    let over = app
        .post(&path, Some(&bob), &json!({"amount": 1}), &[])
        .await;
    over.assert_problem(422, "refund_exceeds_original");
    assert_eq!(over.body["remaining"], 0);
    app.settle("wallet").await;
    let w = app.get(&format!("/v1/wallets/{from}"), Some(&alice)).await;
    assert_eq!(w.body["balance"]["posted"], 1_000);
    let refunds = app
        .get(
            &format!("/v1/wallets/{from}/entries?kind=refund"),
            Some(&alice),
        )
        .await;
    assert_eq!(refunds.body["items"].as_array().unwrap().len(), 5);
    assert_eq!(ledger_sum(&app).await, 0);
    app.stop().await;
}

/// A dispute freezes the payee's wallet and moves the money aside; evidence is
/// kept; lost pays the payer back, and the wallet unfreezes; all as ledger moves.
#[tokio::test]
async fn wallet_disputes_freeze_collect_evidence_and_resolve_as_ledger_moves() {
    let app = TestApp::spawn().await;
    let Parties {
        admin,
        alice,
        bob,
        bob_id,
        from,
    } = app.alice_and_bob(1_000).await;
    let bob_wallet = commands::wallet::user_wallet_id(bob_id, "KES".parse().unwrap());
    let r = app
        .post(
            "/v1/transfers",
            Some(&alice),
            &json!({"from_wallet": from, "to_user": bob_id, "amount": 300, "currency": "KES"}),
            &[],
        )
        .await;
    let t = r.body["transfer_id"].as_str().unwrap().to_owned();
    let pos = r.body["position"].as_i64().unwrap();
    let open = json!({"transfer_id": t, "reason": "goods not delivered"});
    app.post(
        &format!("/v1/admin/disputes?after_position={pos}"),
        Some(&bob),
        &open,
        &[],
    )
    .await
    .assert_problem(403, "forbidden");
    let d = app
        .post(
            &format!("/v1/admin/disputes?after_position={pos}"),
            Some(&admin),
            &open,
            &[],
        )
        .await;
    assert_eq!(d.status, 201, "{}", d.body);
    assert_eq!(
        (&d.body["held"], &d.body["balance"]["posted"]),
        (&json!(300), &json!(0))
    );
    let id = d.body["dispute_id"].as_str().unwrap().to_owned();
    let pos = d.body["position"].as_i64().unwrap();
    // Frozen: nothing leaves Bob's wallet.
    app.post(
        &format!("/v1/wallets/{bob_wallet}/withdrawals"),
        Some(&bob),
        &json!({"amount": 1, "currency": "KES", "destination": "bank:1"}),
        &[],
    )
    .await
    .assert_problem(422, "account_frozen");
    let w = app
        .get(
            &format!("/v1/wallets/{bob_wallet}?after_position={pos}"),
            Some(&bob),
        )
        .await;
    assert_eq!(w.body["frozen"], true);
    let e = app
        .post(
            &format!("/v1/disputes/{id}/evidence?after_position={pos}"),
            Some(&bob),
            &json!({"evidence": "courier receipt 123"}),
            &[],
        )
        .await;
    assert_eq!(e.status, 200, "{}", e.body);
    app.post(
        &format!("/v1/disputes/{id}/evidence"),
        Some(&alice),
        &json!({"evidence": "x"}),
        &[],
    )
    .await
    .assert_problem(404, "dispute_not_found");
    let r = app
        .post(
            &format!("/v1/admin/disputes/{id}/resolve"),
            Some(&admin),
            &json!({"outcome": "lost"}),
            &[],
        )
        .await;
    assert_eq!(
        (r.status, &r.body["frozen"]),
        (200, &json!(false)),
        "{}",
        r.body
    );
    let pos = r.body["position"].as_i64().unwrap();
    let v = app
        .get(
            &format!("/v1/disputes/{id}?after_position={pos}"),
            Some(&alice),
        )
        .await;
    assert_eq!(v.status, 200, "{}", v.body);
    assert_eq!(
        (&v.body["status"], &v.body["evidence"][0]["evidence"]),
        (&json!("lost"), &json!("courier receipt 123"))
    );
    let a = app
        .get(
            &format!("/v1/wallets/{from}?after_position={pos}"),
            Some(&alice),
        )
        .await;
    assert_eq!(a.body["balance"]["posted"], 1_000);
    let w = app
        .get(&format!("/v1/wallets/{bob_wallet}"), Some(&bob))
        .await;
    assert_eq!(
        (&w.body["frozen"], &w.body["balance"]["posted"]),
        (&json!(false), &json!(0))
    );
    let report = app.get("/v1/admin/reconciliation", Some(&admin)).await;
    assert_eq!(report.body["balanced"], true, "{}", report.body);
    assert_eq!(ledger_sum(&app).await, 0);
    app.stop().await;
}

pub(crate) fn provider_signature(secret: &str, t: i64, body: &str) -> String {
    use hmac::{KeyInit as _, Mac};
    let mut mac = <hmac::Hmac<sha2::Sha256>>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{t}.{body}").as_bytes());
    let hex: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("t={t},v1={hex}")
}

/// Provider webhooks: a bad or stale signature is 401 and writes nothing; a
/// duplicate is 200 and credits nothing more; a late "pending" never undoes
/// "completed"; the deposit is credited exactly once.
#[tokio::test]
async fn wallet_deposit_webhooks_are_signed_deduplicated_monotonic_and_credit_once() {
    let secret = "whsec_test_secret";
    let app = TestApp::spawn_with(mathia::Roles::ALL, |c| {
        c.payments_webhook_secret = Some(secret.into())
    })
    .await;
    let Parties { alice, from, .. } = app.alice_and_bob(0).await;
    let event = |id: &str, kind: &str| {
        json!({"id": id, "type": kind, "payment_id": "ws_CO_1", "wallet_id": from, "amount": 1500, "currency": "KES"})
            .to_string()
    };
    let deliver = |body: String, signature: String| {
        let app = &app;
        async move {
            let res = app
                .http
                .post(format!("{}/v1/webhooks/payments/mpesa", app.base))
                .header("content-type", "application/json")
                .header("mathia-signature", signature)
                .body(body)
                .send()
                .await
                .unwrap();
            let status = res.status().as_u16();
            (
                status,
                res.json::<serde_json::Value>().await.unwrap_or_default(),
            )
        }
    };
    let now = chrono::Utc::now().timestamp();
    let completed = event("evt_2", "payment.completed");
    // Bad signature, stale timestamp: 401, nothing stored.
    let (s, b) = deliver(
        completed.clone(),
        provider_signature("wrong", now, &completed),
    )
    .await;
    assert_eq!((s, &b["code"]), (401, &json!("bad_signature")));
    let (s, b) = deliver(
        completed.clone(),
        provider_signature(secret, now - 301, &completed),
    )
    .await;
    assert_eq!((s, &b["code"]), (401, &json!("stale_signature")));
    let tampered = completed.replace("1500", "9500");
    let (s, _) = deliver(tampered, provider_signature(secret, now, &completed)).await;
    assert_eq!(s, 401);
    assert_eq!(app.count("payment_webhook_inbox").await, 0);
    // Completed arrives first, then three copies of it, then the late pending.
    let (s, b) = deliver(
        completed.clone(),
        provider_signature(secret, now, &completed),
    )
    .await;
    assert_eq!(
        (s, &b["status"], &b["duplicate"]),
        (200, &json!("completed"), &json!(false)),
        "{b}"
    );
    for _ in 0..3 {
        let (s, b) = deliver(
            completed.clone(),
            provider_signature(secret, now, &completed),
        )
        .await;
        assert_eq!((s, &b["duplicate"]), (200, &json!(true)));
    }
    let pending = event("evt_1", "payment.pending");
    let (s, b) = deliver(pending.clone(), provider_signature(secret, now, &pending)).await;
    assert_eq!(
        (s, &b["status"]),
        (200, &json!("completed")),
        "a late pending never undoes completed"
    );
    // Credited once.
    assert_eq!(app.posted_balance(&alice, from, 1500).await, 1500);
    let again = event("evt_3", "payment.completed");
    let (s, _) = deliver(again.clone(), provider_signature(secret, now, &again)).await;
    assert_eq!(s, 200, "another event id for the same completed payment");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    app.settle("wallet").await;
    let deposits: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM proj_wallet_entries WHERE account_id = $1 AND kind = 'deposit'",
    )
    .bind(from)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(deposits, 1, "the deposit is credited exactly once");
    assert_eq!(app.count("payment_webhook_inbox").await, 3);
    assert_eq!(ledger_sum(&app).await, 0);
    app.stop().await;
}

/// A local M-Pesa STK-push provider speaking the wire format the
/// `HttpPaymentGateway` uses: bearer key, decimal-string amount, an invoice per `api_ref`.
async fn stub_stk_push(
    axum::extract::State(seen): axum::extract::State<
        std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
    >,
    headers: axum::http::HeaderMap,
    axum::Json(body): axum::Json<serde_json::Value>,
) -> (axum::http::StatusCode, axum::Json<serde_json::Value>) {
    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some("Bearer key_test") {
        return (
            axum::http::StatusCode::UNAUTHORIZED,
            axum::Json(json!({"detail": "bad key"})),
        );
    }
    if body["phone_number"] == "254700000000" {
        return (
            axum::http::StatusCode::BAD_REQUEST,
            axum::Json(json!({"detail": "phone not registered for M-Pesa"})),
        );
    }
    seen.lock().unwrap().push(body.clone());
    let invoice = format!("INV-{}", &body["api_ref"].as_str().unwrap_or_default()[..8]);
    (
        axum::http::StatusCode::OK,
        axum::Json(json!({"invoice": {"invoice_id": invoice, "state": "PENDING"}})),
    )
}

/// A top-up goes out through the `PaymentGateway` to the provider (amount as a
/// decimal string), is pending until the signed webhook completes it, then credited once.
#[tokio::test]
async fn wallet_top_ups_go_through_the_payment_gateway_and_complete_by_webhook() {
    let seen: std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>> = Default::default();
    let stub = axum::Router::new()
        .route(
            "/api/v1/payment/mpesa-stk-push/",
            axum::routing::post(stub_stk_push),
        )
        .with_state(seen.clone());
    let url = mathia_tests::serve_stub(stub).await;
    let secret = "whsec_topups";
    let app = TestApp::spawn_with(mathia::Roles::ALL, |c| {
        c.payments_webhook_secret = Some(secret.into());
        c.payments_url = Some(url.clone());
        c.payments_api_key = Some("key_test".into());
    })
    .await;
    let Parties {
        alice, bob, from, ..
    } = app.alice_and_bob(0).await;
    app.settle("wallet").await;
    let topup = json!({"amount": 1_550, "currency": "KES", "phone_number": "254700000001"});
    let r = app
        .post(
            &format!("/v1/wallets/{from}/topups"),
            Some(&alice),
            &topup,
            &[("idempotency-key", "top-1")],
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["status"], "pending");
    let payment_id = r.body["payment_id"].as_str().unwrap().to_owned();
    assert_eq!(
        seen.lock().unwrap()[0]["amount"],
        "15.50",
        "minor units as a decimal string, no float"
    );
    // Same key: the provider answers the same payment.
    let again = app
        .post(
            &format!("/v1/wallets/{from}/topups"),
            Some(&alice),
            &topup,
            &[("idempotency-key", "top-1")],
        )
        .await;
    assert_eq!(again.body["payment_id"], payment_id.as_str());
    // Someone else's wallet, a refused phone: no payment.
    app.post(
        &format!("/v1/wallets/{from}/topups"),
        Some(&bob),
        &topup,
        &[],
    )
    .await
    .assert_problem(404, "not_found");
    let refused = json!({"amount": 100, "currency": "KES", "phone_number": "254700000000"});
    app.post(
        &format!("/v1/wallets/{from}/topups"),
        Some(&alice),
        &refused,
        &[],
    )
    .await
    .assert_problem(502, "provider_refused");
    // The provider's webhook completes it.
    let body = json!({"id": "evt_9", "type": "payment.completed", "payment_id": payment_id, "wallet_id": from,
                      "amount": 1_550, "currency": "KES"})
    .to_string();
    let now = chrono::Utc::now().timestamp();
    let res = app
        .http
        .post(format!("{}/v1/webhooks/payments/mpesa", app.base))
        .header("mathia-signature", provider_signature(secret, now, &body))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 200);
    assert_eq!(app.posted_balance(&alice, from, 1_550).await, 1_550);
    app.stop().await;
}
