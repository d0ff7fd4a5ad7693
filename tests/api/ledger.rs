//! The ledger's outer edges: conversions at a recorded rate, card top-ups
//! through a Stripe-style provider, and the reconciliation that matches
//! provider payments with the deposits they credited.

use mathia_tests::{Parties, TestApp};
use serde_json::json;

use crate::wallet::{ledger_sum, provider_signature};

/// A conversion is two legs, one per currency, through the currency desks, at
/// the configured rate recorded on each leg; the quote says what it will give;
/// a moved rate, an unknown pair, someone else's wallet move nothing.
#[tokio::test]
async fn conversions_move_two_legs_at_the_recorded_rate_and_each_currency_balances() {
    let app = TestApp::spawn_with(mathia::Roles::ALL, |c| {
        c.fx_rates = "USD/KES=129.25".into();
    })
    .await;
    let Parties {
        admin,
        alice,
        bob,
        from: kes,
        ..
    } = app.alice_and_bob(0).await;
    let r = app
        .post(
            "/v1/wallets",
            Some(&alice),
            &json!({"currency": "USD"}),
            &[],
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let usd = r.body["wallet_id"].as_str().unwrap().to_owned();
    let r = app
        .post(
            &format!("/v1/wallets/{usd}/deposits"),
            Some(&admin),
            &json!({"amount": 10_000, "currency": "USD"}),
            &[],
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);

    let q = app
        .get("/v1/fx/quote?from=USD&to=KES&amount=4000", Some(&alice))
        .await;
    assert_eq!(q.status, 200, "{}", q.body);
    assert_eq!(
        (&q.body["rate"], &q.body["rate_micros"], &q.body["bought"]),
        (&json!("129.25"), &json!(129_250_000), &json!(517_000))
    );
    app.get("/v1/fx/quote?from=USD&to=EUR&amount=1", Some(&alice))
        .await
        .assert_problem(422, "rate_unavailable");

    // The quote's rate is accepted; a retry with the same key answers the first result.
    let body = json!({"from_wallet": usd, "to_currency": "KES", "amount": 4_000, "quoted_rate_micros": 129_250_000});
    let r = app
        .post(
            "/v1/conversions",
            Some(&alice),
            &body,
            &[("idempotency-key", "fx-1")],
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(
        (
            &r.body["sold"]["amount"],
            &r.body["bought"]["amount"],
            &r.body["balance"]["posted"],
            &r.body["to_balance"]["posted"],
        ),
        (
            &json!(4_000),
            &json!(517_000),
            &json!(6_000),
            &json!(517_000)
        )
    );
    let again = app
        .post(
            "/v1/conversions",
            Some(&alice),
            &body,
            &[("idempotency-key", "fx-1")],
        )
        .await;
    assert_eq!(
        (again.status, &again.body["conversion_id"]),
        (201, &r.body["conversion_id"])
    );
    // A stale quote, a pair without a rate, Bob's wallet as the target: 4xx, nothing moves.
    app.post(
        "/v1/conversions",
        Some(&alice),
        &json!({"from_wallet": usd, "to_wallet": kes, "amount": 100, "quoted_rate_micros": 128_000_000}),
        &[],
    )
    .await
    .assert_problem(409, "rate_changed");
    app.post(
        "/v1/wallets",
        Some(&alice),
        &json!({"currency": "EUR"}),
        &[],
    )
    .await;
    app.post(
        "/v1/conversions",
        Some(&alice),
        &json!({"from_wallet": usd, "to_currency": "EUR", "amount": 100}),
        &[],
    )
    .await
    .assert_problem(422, "rate_unavailable");
    let bob_wallets = app.get("/v1/wallets", Some(&bob)).await;
    let bob_kes = bob_wallets.body["items"][0]["wallet_id"].clone();
    app.post(
        "/v1/conversions",
        Some(&alice),
        &json!({"from_wallet": usd, "to_wallet": bob_kes, "amount": 100}),
        &[],
    )
    .await
    .assert_problem(404, "not_found");
    app.post(
        "/v1/conversions",
        Some(&alice),
        &json!({"from_wallet": usd, "to_currency": "KES", "amount": 10_000_000}),
        &[],
    )
    .await
    .assert_problem(422, "insufficient_funds");

    // The history shows the rate; each currency balances through its desk.
    app.settle("wallet").await;
    let h = app
        .get(
            &format!("/v1/wallets/{kes}/entries?kind=conversion"),
            Some(&alice),
        )
        .await;
    assert_eq!(h.status, 200, "{}", h.body);
    let items = h.body["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{}", h.body);
    assert_eq!(
        (
            &items[0]["amount"],
            &items[0]["fx"]["rate_micros"],
            &items[0]["fx"]["sold"]
        ),
        (&json!(517_000), &json!(129_250_000), &json!(4_000))
    );
    let report = app.get("/v1/admin/reconciliation", Some(&admin)).await;
    assert_eq!(report.status, 200, "{}", report.body);
    assert_eq!(report.body["balanced"], true, "{}", report.body);
    let desk = |cur: &str| {
        report.body["currencies"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["currency"] == cur)
            .map(|c| {
                (
                    c["fx"].clone(),
                    c["difference"].clone(),
                    c["posted_sum"].clone(),
                )
            })
            .unwrap()
    };
    assert_eq!(desk("USD"), (json!(4_000), json!(0), json!(0)));
    assert_eq!(desk("KES"), (json!(-517_000), json!(0), json!(0)));
    assert_eq!(ledger_sum(&app).await, 0);
    app.stop().await;
}

/// `application/x-www-form-urlencoded` as the provider reads it.
fn form_decode(body: &str) -> std::collections::HashMap<String, String> {
    let unescape = |s: &str| {
        let bytes = s.replace('+', " ").into_bytes();
        let mut out = vec![];
        let mut i = 0;
        while i < bytes.len() {
            match (bytes[i], bytes.get(i + 1..i + 3)) {
                (b'%', Some(hex)) => {
                    out.push(u8::from_str_radix(std::str::from_utf8(hex).unwrap(), 16).unwrap());
                    i += 3;
                }
                (b, _) => {
                    out.push(b);
                    i += 1;
                }
            }
        }
        String::from_utf8(out).unwrap()
    };
    body.split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (unescape(k), unescape(v)))
        .collect()
}

type Seen = std::sync::Arc<std::sync::Mutex<Vec<(Option<String>, String)>>>;

/// A local card provider speaking Stripe's payment-intent wire format: a
/// form-encoded body, a bearer secret key, an idempotency key answering the
/// same intent, `{"error": {...}}` on refusal.
async fn stub_payment_intents(
    axum::extract::State(seen): axum::extract::State<Seen>,
    headers: axum::http::HeaderMap,
    body: String,
) -> (axum::http::StatusCode, axum::Json<serde_json::Value>) {
    if headers.get("content-type").and_then(|v| v.to_str().ok())
        != Some("application/x-www-form-urlencoded")
    {
        return (
            axum::http::StatusCode::BAD_REQUEST,
            axum::Json(
                json!({"error": {"type": "invalid_request_error", "message": "form bodies only"}}),
            ),
        );
    }
    let form = form_decode(&body);
    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some("Bearer sk_test_card") {
        return (
            axum::http::StatusCode::UNAUTHORIZED,
            axum::Json(
                json!({"error": {"type": "invalid_request_error", "message": "Invalid API Key provided"}}),
            ),
        );
    }
    if form.get("amount").map(String::as_str) == Some("13") {
        return (
            axum::http::StatusCode::BAD_REQUEST,
            axum::Json(
                json!({"error": {"type": "invalid_request_error", "code": "amount_too_small",
                                         "message": "Amount must be at least 50 cents"}}),
            ),
        );
    }
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    seen.lock()
        .unwrap()
        .push((key.clone(), serde_json::to_string(&form).unwrap()));
    let id = format!("pi_{}", &key.unwrap_or_default().replace('-', "")[..16]);
    (
        axum::http::StatusCode::OK,
        axum::Json(json!({
            "id": id, "object": "payment_intent", "amount": form["amount"].parse::<i64>().unwrap(),
            "currency": form["currency"], "status": "requires_payment_method",
            "client_secret": format!("{id}_secret_x1y2"), "metadata": {"wallet_id": form["metadata[wallet_id]"]},
        })),
    )
}

/// A card top-up creates a payment intent at the provider (form-encoded, minor
/// units, lower-case currency), hands the client secret to the payer only, and
/// the provider's own `payment_intent.succeeded` event, signed in its
/// `Stripe-Signature` header, credits the wallet once; the reconciliation then
/// matches the payment with its deposit.
#[tokio::test]
async fn card_top_ups_create_a_payment_intent_and_its_signed_event_credits_once() {
    let seen: Seen = Default::default();
    let stub = axum::Router::new()
        .route(
            "/v1/payment_intents",
            axum::routing::post(stub_payment_intents),
        )
        .with_state(seen.clone());
    let url = mathia_tests::serve_stub(stub).await;
    let secret = "whsec_cards";
    let app = TestApp::spawn_with(mathia::Roles::ALL, |c| {
        c.payments_webhook_secret = Some(secret.into());
        c.card_url = Some(url.clone());
        c.card_api_key = Some("sk_test_card".into());
    })
    .await;
    let Parties {
        admin, alice, from, ..
    } = app.alice_and_bob(0).await;
    app.settle("wallet").await;
    let path = format!("/v1/wallets/{from}/topups");
    let topup = json!({"amount": 2_500, "currency": "KES", "method": "card"});
    let r = app
        .post(
            &path,
            Some(&alice),
            &topup,
            &[("idempotency-key", "card-1")],
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(
        (&r.body["provider"], &r.body["status"]),
        (&json!("card"), &json!("pending"))
    );
    let payment_id = r.body["payment_id"].as_str().unwrap().to_owned();
    assert!(
        r.body["client_secret"]
            .as_str()
            .unwrap()
            .starts_with(&payment_id)
    );
    {
        let seen = seen.lock().unwrap();
        let form: serde_json::Value = serde_json::from_str(&seen[0].1).unwrap();
        assert_eq!(
            (
                &form["amount"],
                &form["currency"],
                &form["metadata[wallet_id]"]
            ),
            (&json!("2500"), &json!("kes"), &json!(from.to_string()))
        );
        assert!(
            seen[0].0.is_some(),
            "an idempotency key goes with every intent"
        );
    }
    // The same key: the same intent. A phone on a card top-up, a refused amount: 4xx/502.
    let again = app
        .post(
            &path,
            Some(&alice),
            &topup,
            &[("idempotency-key", "card-1")],
        )
        .await;
    assert_eq!(again.body["payment_id"], payment_id.as_str());
    app.post(
        &path,
        Some(&alice),
        &json!({"amount": 2_500, "currency": "KES", "method": "card", "phone_number": "254700000001"}),
        &[],
    )
    .await
    .assert_problem(422, "invalid_input");
    app.post(
        &path,
        Some(&alice),
        &json!({"amount": 13, "currency": "KES", "method": "card"}),
        &[],
    )
    .await
    .assert_problem(502, "provider_refused");

    // Stripe's event shape, signed with its header name, delivered twice.
    let event = json!({
        "id": "evt_3Q1", "object": "event", "type": "payment_intent.succeeded",
        "data": {"object": {"id": payment_id, "object": "payment_intent", "amount": 2_500,
                            "amount_received": 2_500, "currency": "kes", "status": "succeeded",
                            "metadata": {"wallet_id": from.to_string()}}}
    })
    .to_string();
    let now = chrono::Utc::now().timestamp();
    for _ in 0..2 {
        let res = app
            .http
            .post(format!("{}/v1/webhooks/payments/card", app.base))
            .header("stripe-signature", provider_signature(secret, now, &event))
            .body(event.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(res.status().as_u16(), 200);
    }
    assert_eq!(
        app.posted_balance(&alice, from, 2_500).await,
        2_500,
        "credited once, whatever the duplicates"
    );
    let report = app.get("/v1/admin/reconciliation", Some(&admin)).await;
    assert_eq!(
        (
            &report.body["balanced"],
            &report.body["providers"]["matched"]
        ),
        (&json!(true), &json!(1)),
        "{}",
        report.body
    );
    app.stop().await;
}

/// The reconciliation names every provider payment the ledger disagrees with:
/// completed and never credited (after the grace period), a deposit claiming a
/// provider payment that never completed; each run is kept, and the scheduler's
/// reconciler runs once per interval however often it looks.
#[tokio::test]
async fn reconciliation_finds_provider_payments_the_ledger_disagrees_with() {
    // The scheduler's own reconciler is off: this test drives one by hand.
    let app = TestApp::spawn_with(mathia::Roles::ALL, |c| c.reconcile_secs = 0).await;
    let Parties {
        admin, alice, from, ..
    } = app.alice_and_bob(1_000).await;
    app.settle("wallet").await;
    let clean = app.get("/v1/admin/reconciliation", Some(&admin)).await;
    assert_eq!(clean.body["balanced"], true, "{}", clean.body);
    app.get("/v1/admin/reconciliation", Some(&alice))
        .await
        .assert_problem(403, "forbidden");
    // A payment the provider completed an hour ago that the ledger never credited,
    // and one completed just now (its deposit may still be on its way).
    sqlx::query(
        "INSERT INTO payment_intents (provider, payment_id, wallet_id, amount, currency, status, rank, updated_at)
         VALUES ('mpesa', 'ws_lost', $1, 700, 'KES', 'completed', 2, now() - interval '1 hour'),
                ('mpesa', 'ws_fresh', $1, 300, 'KES', 'completed', 2, now())",
    )
    .bind(from)
    .execute(&app.pool)
    .await
    .unwrap();
    // An admin deposit whose reference claims a card payment nobody completed.
    let r = app
        .post(
            &format!("/v1/wallets/{from}/deposits"),
            Some(&admin),
            &json!({"amount": 50, "currency": "KES", "reference": "card:pi_never"}),
            &[],
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    app.settle("wallet").await;
    let report = app.get("/v1/admin/reconciliation", Some(&admin)).await;
    let p = &report.body["providers"];
    assert_eq!(report.body["balanced"], false, "{}", report.body);
    assert_eq!(
        (&p["in_flight"], &p["findings_count"]),
        (&json!(1), &json!(2)),
        "{p}"
    );
    let mut problems: Vec<(String, String)> = p["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["problem"].as_str().unwrap().into(),
                f["payment_id"].as_str().unwrap().into(),
            )
        })
        .collect();
    problems.sort();
    assert_eq!(
        problems,
        vec![
            ("no_completed_payment".to_owned(), "pi_never".to_owned()),
            ("not_credited".to_owned(), "ws_lost".to_owned()),
        ]
    );
    // The ledger itself still balances: the findings are about the providers.
    for c in report.body["currencies"].as_array().unwrap() {
        assert_eq!(c["difference"], 0);
    }
    // Runs are kept, newest first; the reconciler runs once per interval.
    let runs = app
        .get("/v1/admin/reconciliation/runs?limit=5", Some(&admin))
        .await;
    assert_eq!(runs.status, 200, "{}", runs.body);
    let items = runs.body["items"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    assert_eq!(
        (&items[0]["balanced"], &items[0]["findings"]),
        (&json!(false), &json!(2))
    );
    let reconciler = projections::reconcile::Reconciler {
        pool: app.pool.clone(),
        every: std::time::Duration::from_secs(3600),
    };
    sqlx::query("DELETE FROM reconciliation_runs")
        .execute(&app.pool)
        .await
        .unwrap();
    assert!(reconciler.run_if_due().await.unwrap());
    assert!(
        !reconciler.run_if_due().await.unwrap(),
        "not due again within the hour"
    );
    assert_eq!(app.count("reconciliation_runs").await, 1);
    app.stop().await;
}

/// Provider deliveries in a random order, duplicated, some with a second event
/// id for the same outcome, sent concurrently: every payment ends in its
/// terminal state, a completed one is credited exactly once and a failed one
/// never, Σ stays 0 and the reconciliation matches every completed payment.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn webhook_deliveries_in_any_order_with_duplicates_end_in_the_right_state() {
    use rand::seq::SliceRandom as _;
    use rand::{RngExt as _, SeedableRng as _};
    let secret = "whsec_order";
    let app = TestApp::spawn_with(mathia::Roles::ALL, |c| {
        c.payments_webhook_secret = Some(secret.into());
        c.reconcile_secs = 0;
    })
    .await;
    let Parties {
        admin, alice, from, ..
    } = app.alice_and_bob(0).await;
    let seed: u64 = rand::rng().random();
    eprintln!("seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let (mut deliveries, mut want) = (vec![], vec![]);
    let mut credited = 0i64;
    for p in 0..12 {
        let completes = rng.random_bool(0.6);
        let amount: i64 = rng.random_range(1..=5_000);
        let payment = format!("ws_{seed}_{p}");
        let terminal = if completes {
            "payment.completed"
        } else {
            "payment.failed"
        };
        let mut kinds = vec!["payment.pending", terminal];
        if rng.random_bool(0.5) {
            kinds.push(terminal); // the provider re-sends the outcome under a new event id
        }
        if rng.random_bool(0.5) {
            kinds.push("payment.pending"); // a late pending
        }
        for (k, kind) in kinds.iter().enumerate() {
            let body = json!({"id": format!("evt_{p}_{k}"), "type": kind, "payment_id": payment,
                              "wallet_id": from, "amount": amount, "currency": "KES"})
            .to_string();
            for _ in 0..rng.random_range(1..=3) {
                deliveries.push(body.clone());
            }
        }
        want.push((payment, if completes { "completed" } else { "failed" }));
        credited += if completes { amount } else { 0 };
    }
    deliveries.shuffle(&mut rng);
    let now = chrono::Utc::now().timestamp();
    for wave in deliveries.chunks(8) {
        let sent = futures::future::join_all(wave.iter().map(|body| {
            app.http
                .post(format!("{}/v1/webhooks/payments/mpesa", app.base))
                .header("mathia-signature", provider_signature(secret, now, body))
                .body(body.clone())
                .send()
        }))
        .await;
        for r in sent {
            assert_eq!(r.unwrap().status().as_u16(), 200, "seed {seed}");
        }
    }
    for (payment, status) in &want {
        let got: String =
            sqlx::query_scalar("SELECT status FROM payment_intents WHERE payment_id = $1")
                .bind(payment)
                .fetch_one(&app.pool)
                .await
                .unwrap();
        assert_eq!(&got, status, "{payment}, seed {seed}");
    }
    assert_eq!(
        app.posted_balance(&alice, from, credited).await,
        credited,
        "seed {seed}"
    );
    let completed = want.iter().filter(|(_, s)| *s == "completed").count() as i64;
    let deposits: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM proj_wallet_entries WHERE account_id = $1 AND kind = 'deposit'",
    )
    .bind(from)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(
        deposits, completed,
        "one deposit per completed payment, seed {seed}"
    );
    assert_eq!(ledger_sum(&app).await, 0);
    let report = app.get("/v1/admin/reconciliation", Some(&admin)).await;
    let p = &report.body["providers"];
    assert_eq!(
        (&report.body["balanced"], &p["matched"], &p["failed"]),
        (&json!(true), &json!(completed), &json!(12 - completed)),
        "seed {seed}: {}",
        report.body
    );
    app.stop().await;
}
