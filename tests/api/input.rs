//! Invariant 7: bad input gets a clear 4xx problem and writes nothing.

use mathia_tests::{Parties, TestApp, only};
use serde_json::json;

async fn writes(app: &TestApp) -> (i64, i64) {
    (app.count("events").await, app.count("command_ledger").await)
}

#[tokio::test]
async fn malformed_oversized_and_unauthorised_requests_get_problems_and_write_nothing() {
    let app = TestApp::spawn().await;
    let Parties {
        alice,
        bob,
        bob_id,
        from: wallet,
        ..
    } = app.alice_and_bob(1_000).await;
    let before = writes(&app).await;
    let url = format!("{}/v1/transfers", app.base);
    let send = |body: Vec<u8>, ctype: &'static str, token: Option<String>| {
        let mut req = app.http.post(&url).header("content-type", ctype).body(body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        async move {
            let res = req.send().await.unwrap();
            let status = res.status().as_u16();
            let ctype = res
                .headers()
                .get("content-type")
                .map(|v| v.to_str().unwrap().to_owned());
            let body: serde_json::Value = res.json().await.unwrap_or_default();
            (status, ctype, body)
        }
    };
    let tok = Some(alice.clone());
    type Case = (
        &'static str,
        Vec<u8>,
        &'static str,
        Option<String>,
        u16,
        &'static str,
    );
    let cases: Vec<Case> = vec![
        ("syntax", b"{\"from_wallet\":".to_vec(), "application/json", tok.clone(), 400, "malformed_request"),
        ("invalid utf-8", b"{\"reference\":\"\xff\xfe\"}".to_vec(), "application/json", tok.clone(), 400, "malformed_request"),
        ("nul", json!({"from_wallet": wallet, "to_user": bob_id, "amount": 1, "currency": "KES", "reference": "a\u{0}b"}).to_string().into_bytes(), "application/json", tok.clone(), 400, "malformed_request"),
        ("beyond i64", format!("{{\"from_wallet\":\"{wallet}\",\"to_user\":\"{bob_id}\",\"amount\":99999999999999999999999,\"currency\":\"KES\"}}").into_bytes(), "application/json", tok.clone(), 400, "malformed_request"),
        ("unknown field", json!({"from_wallet": wallet, "to_user": bob_id, "amount": 1, "currency": "KES", "sudo": true}).to_string().into_bytes(), "application/json", tok.clone(), 400, "malformed_request"),
        ("not json", b"amount=1".to_vec(), "application/x-www-form-urlencoded", tok.clone(), 415, "unsupported_media_type"),
        ("too large", json!({"reference": "x".repeat(100_000)}).to_string().into_bytes(), "application/json", tok.clone(), 413, "payload_too_large"),
        ("zero amount", json!({"from_wallet": wallet, "to_user": bob_id, "amount": 0, "currency": "KES"}).to_string().into_bytes(), "application/json", tok.clone(), 422, "invalid_input"),
        ("bad currency", json!({"from_wallet": wallet, "to_user": bob_id, "amount": 1, "currency": "XYZ"}).to_string().into_bytes(), "application/json", tok.clone(), 422, "invalid_input"),
        ("no token", json!({"from_wallet": wallet, "to_user": bob_id, "amount": 1, "currency": "KES"}).to_string().into_bytes(), "application/json", None, 401, "unauthorized"),
        ("forged token", json!({"from_wallet": wallet, "to_user": bob_id, "amount": 1, "currency": "KES"}).to_string().into_bytes(), "application/json", Some("eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.AAAA".into()), 401, "unauthorized"),
    ];
    for (what, body, ctype, token, status, code) in cases {
        let (got, content_type, problem) = send(body, ctype, token).await;
        assert_eq!(
            (got, problem["code"].as_str()),
            (status, Some(code)),
            "{what}: {problem}"
        );
        assert_eq!(
            content_type.as_deref(),
            Some("application/problem+json"),
            "{what}"
        );
    }
    // Someone else's wallet: not found, not "forbidden" (existence is private).
    app.post(
        "/v1/transfers",
        Some(&bob),
        &json!({"from_wallet": wallet, "to_user": bob_id, "amount": 1, "currency": "KES"}),
        &[],
    )
    .await
    .assert_problem(404, "wallet_not_found");
    // Users cannot deposit.
    app.post(
        &format!("/v1/wallets/{wallet}/deposits"),
        Some(&alice),
        &json!({"amount": 1, "currency": "KES"}),
        &[],
    )
    .await
    .assert_problem(403, "forbidden");
    // A key that is not visible ASCII.
    app.post(
        "/v1/wallets",
        Some(&alice),
        &json!({"currency": "USD"}),
        &[("idempotency-key", &"k".repeat(256))],
    )
    .await
    .assert_problem(400, "malformed_request");
    // Bad path parameters and wrong methods are problems too.
    app.get("/v1/wallets/not-a-uuid", Some(&alice))
        .await
        .assert_problem(400, "malformed_request");
    let res = app
        .http
        .delete(format!("{}/v1/transfers", app.base))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 405);
    assert_eq!(res.headers()["content-type"], "application/problem+json");
    // Unknown routes and bad cursors are problems too.
    app.get("/v1/nope", Some(&alice))
        .await
        .assert_problem(404, "not_found");
    app.get(
        &format!("/v1/wallets/{wallet}/entries?cursor=garbage"),
        Some(&alice),
    )
    .await
    .assert_problem(400, "malformed_request");
    app.get(
        &format!("/v1/wallets/{wallet}/entries?limit=100000"),
        Some(&alice),
    )
    .await
    .assert_problem(422, "invalid_input");
    // The ownership rejection above is recorded in the ledger (a failed command stays failed);
    // nothing else was written, and no event at all.
    let after = writes(&app).await;
    assert_eq!(after.0, before.0, "no event was written");
    assert_eq!(
        after.1,
        before.1 + 1,
        "only the decided (rejected) transfer reached the ledger"
    );
    app.stop().await;
}

#[tokio::test]
async fn over_the_rate_limit_the_answer_is_429_naming_the_limit_and_when_it_resets() {
    let app = TestApp::spawn_with(only(true, true, true, true), |c| {
        c.rate_limit_api_per_min = 5;
        c.rate_limit_anon_per_min = 3;
    })
    .await;
    let (_, alice) = app.user("alice@test.local").await; // 2 anonymous requests
    let mut statuses = vec![];
    for _ in 0..7 {
        statuses.push(app.get("/v1/me", Some(&alice)).await);
    }
    assert!(statuses[..5].iter().all(|r| r.status == 200));
    let limited = &statuses[5];
    limited.assert_problem(429, "rate_limited");
    assert_eq!(limited.body["limit"], "api_per_principal");
    let retry: u64 = limited.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry));
    let anon = app
        .post(
            "/v1/auth/login",
            None,
            &json!({"email": "x@y.z", "password": "nope"}),
            &[],
        )
        .await;
    assert_eq!(anon.status, 401);
    let anon = app
        .post(
            "/v1/auth/login",
            None,
            &json!({"email": "x@y.z", "password": "nope"}),
            &[],
        )
        .await;
    anon.assert_problem(429, "rate_limited");
    assert_eq!(anon.body["limit"], "anonymous_per_ip");
    app.stop().await;
}
