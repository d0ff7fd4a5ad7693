//! Outbound webhooks against real services, with local axum receivers:
//! signed deliveries, retries on the configured schedule, dead letters and
//! redrive, owner-only access, and a secret that rests nowhere in clear.

use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use mathia::Roles;
use mathia_tests::TestApp;
use serde_json::{Value, json};
use uuid::Uuid;

use super::chat::id;

/// What a receiver was sent.
#[derive(Debug, Clone)]
struct Hit {
    at: Instant,
    headers: HeaderMap,
    body: Vec<u8>,
}

/// How the receiver answers: 0 → 500 for the first `fail_first` requests then 200;
/// 1 → always 503; 2 → hang past the timeout; 3 → always 200.
#[derive(Clone, Default)]
struct Receiver {
    hits: Arc<Mutex<Vec<Hit>>>,
    mode: Arc<AtomicU8>,
    fail_first: Arc<AtomicUsize>,
}

async fn receive(
    State(r): State<Receiver>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> StatusCode {
    let n = {
        let mut hits = r.hits.lock().unwrap();
        hits.push(Hit {
            at: Instant::now(),
            headers,
            body: body.to_vec(),
        });
        hits.len()
    };
    match r.mode.load(Ordering::SeqCst) {
        0 if n <= r.fail_first.load(Ordering::SeqCst) => StatusCode::INTERNAL_SERVER_ERROR,
        1 => StatusCode::SERVICE_UNAVAILABLE,
        2 => {
            tokio::time::sleep(Duration::from_secs(3)).await;
            StatusCode::OK
        }
        _ => StatusCode::OK,
    }
}

async fn receiver(mode: u8, fail_first: usize) -> (String, Receiver) {
    let r = Receiver::default();
    r.mode.store(mode, Ordering::SeqCst);
    r.fail_first.store(fail_first, Ordering::SeqCst);
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(receive))
        .with_state(r.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, r)
}

async fn wait_hits(r: &Receiver, n: usize, within: Duration) -> Vec<Hit> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        let hits = r.hits.lock().unwrap().clone();
        if hits.len() >= n {
            return hits;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "the receiver got {} of {n} requests",
        r.hits.lock().unwrap().len()
    );
}

/// Poll `path` until `done` holds of its body.
async fn eventually(
    app: &TestApp,
    path: &str,
    token: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    for _ in 0..400 {
        let r = app.get(path, Some(token)).await;
        assert_eq!(r.status, 200, "{path}: {}", r.body);
        if done(&r.body) {
            return r.body;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{path} never reached the expected state");
}

fn header<'a>(h: &'a Hit, name: &str) -> &'a str {
    h.headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
}

async fn set_reminder(app: &TestApp, token: &str, content: &str) {
    let r = app
        .post(
            "/v1/reminders",
            Some(token),
            &json!({"content": content, "in": "1h"}),
            &[],
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_receiver_failing_twice_gets_three_signed_attempts_on_schedule_and_one_success() {
    let app = TestApp::spawn_with(Roles::ALL, |c| {
        c.webhook_schedule = "300ms,600ms,2s".into();
        c.webhook_jitter = 0.1;
        c.webhook_poll_ms = 10;
    })
    .await;
    let (alice_id, alice) = app.user("alice@example.com").await;
    let (_, eve) = app.user("eve@example.com").await;
    let (url, rx) = receiver(0, 2).await;

    let r = app
        .post(
            "/v1/webhooks",
            Some(&alice),
            &json!({"url": url, "filter": ["reminder.*", "notify.*"]}),
            &[],
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let hook = id(&r.body["webhook_id"]);
    let secret = r.body["secret"]
        .as_str()
        .expect("the secret, once")
        .to_owned();
    assert!(secret.starts_with("whsec_") && secret.len() > 40);
    let pos = r.header("mathia-position").unwrap().to_owned();

    // Never shown again.
    let got = app
        .get(
            &format!("/v1/webhooks/{hook}?after_position={pos}"),
            Some(&alice),
        )
        .await;
    assert_eq!(got.status, 200, "{}", got.body);
    assert!(got.body.get("secret").is_none());
    assert_eq!(got.body["filter"], json!(["reminder.*", "notify.*"]));
    let list = app.get("/v1/webhooks", Some(&alice)).await;
    assert_eq!(list.body["items"].as_array().unwrap().len(), 1);
    assert!(!list.body.to_string().contains(&secret));

    // Eve's own event is not Alice's business; Alice's is delivered.
    set_reminder(&app, &eve, "eve's secret plan").await;
    set_reminder(&app, &alice, "Call John").await;
    let hits = wait_hits(&rx, 3, Duration::from_secs(15)).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let hits_after = rx.hits.lock().unwrap().clone();
    assert_eq!(
        hits_after.len(),
        3,
        "two failures and one success, nothing more"
    );

    // Spacing: 300 ms then 600 ms (±10 % jitter, plus polling slack).
    let gap1 = hits[1].at - hits[0].at;
    let gap2 = hits[2].at - hits[1].at;
    assert!(
        gap1 >= Duration::from_millis(265) && gap1 < Duration::from_millis(700),
        "{gap1:?}"
    );
    assert!(
        gap2 >= Duration::from_millis(535) && gap2 < Duration::from_millis(1100),
        "{gap2:?}"
    );

    // One delivery id across its attempts; each attempt signed.
    let delivery = header(&hits[0], "mathia-webhook-id").to_owned();
    for h in &hits {
        assert_eq!(header(h, "mathia-webhook-id"), delivery);
        let ts: i64 = header(h, "mathia-webhook-timestamp")
            .parse()
            .expect("timestamp");
        let sig = header(h, "mathia-signature");
        assert_eq!(sig, commands::webhook::sign(secret.as_bytes(), ts, &h.body));
        assert_ne!(sig, commands::webhook::sign(b"whsec_wrong", ts, &h.body));
        assert_ne!(
            sig,
            commands::webhook::sign(secret.as_bytes(), ts + 1, &h.body)
        );
    }
    let body: Value = serde_json::from_slice(&hits[2].body).unwrap();
    assert_eq!(body["type"], "reminder.ReminderSet", "{body}");
    assert_eq!(body["data"]["owner"], json!(alice_id));
    assert_eq!(body["data"]["content"], "Call John");
    assert!(body["occurred_at"].is_string() && body["id"].is_string());
    assert!(
        !hits
            .iter()
            .any(|h| String::from_utf8_lossy(&h.body).contains("eve's secret plan"))
    );

    let d = eventually(
        &app,
        &format!("/v1/webhooks/{hook}/deliveries"),
        &alice,
        |b| b["items"][0]["status"] == "delivered",
    )
    .await;
    assert_eq!(d["items"].as_array().unwrap().len(), 1, "{d}");
    assert_eq!(d["items"][0]["attempts"], 3);
    assert_eq!(d["items"][0]["last_status"], 200);
    assert_eq!(d["items"][0]["delivery_id"], json!(delivery));
    assert_eq!(d["items"][0]["event_id"], body["id"]);

    // A stranger sees nothing and changes nothing.
    for (m, p) in [
        ("GET", format!("/v1/webhooks/{hook}")),
        ("PATCH", format!("/v1/webhooks/{hook}")),
        ("DELETE", format!("/v1/webhooks/{hook}")),
        ("GET", format!("/v1/webhooks/{hook}/deliveries")),
        ("GET", format!("/v1/webhooks/{hook}/dead-letters")),
        ("POST", format!("/v1/webhooks/{hook}/dead-letters/redrive")),
        (
            "POST",
            format!("/v1/webhooks/{hook}/dead-letters/{delivery}/redrive"),
        ),
    ] {
        let body = json!({"enabled": false});
        let r = app
            .call(m, &p, Some(&eve), (m == "PATCH").then_some(&body), &[])
            .await;
        assert_eq!(r.status, 404, "{m} {p}: {}", r.body);
    }
    assert!(
        app.get("/v1/webhooks", Some(&eve)).await.body["items"]
            .as_array()
            .unwrap()
            .is_empty()
    );

    // The secret rests in no event, no saved answer, no command; its keystore row is sealed.
    let hex = secret.trim_start_matches("whsec_").to_owned();
    for q in [
        "SELECT count(*) FROM events WHERE payload::text LIKE '%' || $1 || '%'",
        "SELECT count(*) FROM command_ledger WHERE answer::text LIKE '%' || $1 || '%'",
        "SELECT count(*) FROM webhook_secrets WHERE position(convert_to($1, 'UTF8') in sealed) > 0",
        "SELECT count(*) FROM webhook_deliveries WHERE body::text LIKE '%' || $1 || '%'",
    ] {
        let n: i64 = sqlx::query_scalar(q)
            .bind(&hex)
            .fetch_one(&app.pool)
            .await
            .unwrap();
        assert_eq!(n, 0, "{q}");
    }
    let js = async_nats::jetstream::new(app.nats.clone());
    let mut commands = js.get_stream(app.subjects.commands_stream()).await.unwrap();
    let last = commands.info().await.unwrap().state.last_sequence;
    for seq in 1..=last {
        if let Ok(m) = commands.get_raw_message(seq).await {
            assert!(
                !String::from_utf8_lossy(&m.payload).contains(&hex),
                "COMMANDS #{seq}"
            );
        }
    }

    // Deleting destroys the secret and the endpoint is gone.
    let r = app
        .call(
            "DELETE",
            &format!("/v1/webhooks/{hook}"),
            Some(&alice),
            None,
            &[],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(app.count("webhook_secrets").await, 0);
    let pos = r.header("mathia-position").unwrap().to_owned();
    let r = app
        .get(
            &format!("/v1/webhooks/{hook}?after_position={pos}"),
            Some(&alice),
        )
        .await;
    r.assert_problem(404, "webhook_not_found");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_endpoint_that_times_out_is_dead_lettered_and_redrive_delivers_it_once_it_works() {
    let app = TestApp::spawn_with(Roles::ALL, |c| {
        c.webhook_schedule = "100ms,200ms".into();
        c.webhook_jitter = 0.0;
        c.webhook_poll_ms = 10;
        c.webhook_timeout_ms = 300;
    })
    .await;
    let (_, alice) = app.user("alice@example.com").await;
    let (url, rx) = receiver(2, 0).await;
    let r = app
        .post(
            "/v1/webhooks",
            Some(&alice),
            &json!({"url": url, "filter": ["reminder.ReminderSet"],
            "description": "flaky"}),
            &[],
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let hook = id(&r.body["webhook_id"]);
    // Read our write: under a loaded machine the endpoint may not be projected yet.
    let registered = r.body["position"].as_i64().unwrap();
    set_reminder(&app, &alice, "Pay rent").await;

    let dead = eventually(
        &app,
        &format!("/v1/webhooks/{hook}/dead-letters?after_position={registered}"),
        &alice,
        |b| !b["items"].as_array().unwrap().is_empty(),
    )
    .await;
    let item = &dead["items"][0];
    assert_eq!(item["status"], "dead");
    assert_eq!(item["attempts"], 3, "the first try and one per wait");
    assert_eq!(item["last_error"], "timeout");
    assert!(item["next_attempt_at"].is_null() && item["dead_at"].is_string());
    assert_eq!(rx.hits.lock().unwrap().len(), 3);
    let delivery = id(&item["delivery_id"]);

    // Now it answers 503: still dead until redriven; then it works.
    rx.mode.store(3, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        rx.hits.lock().unwrap().len(),
        3,
        "a dead letter is not retried"
    );
    let r = app
        .post(
            &format!("/v1/webhooks/{hook}/dead-letters/{delivery}/redrive"),
            Some(&alice),
            &json!({}),
            &[],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let d = eventually(
        &app,
        &format!("/v1/webhooks/{hook}/deliveries"),
        &alice,
        |b| b["items"][0]["status"] == "delivered",
    )
    .await;
    assert_eq!(d["items"][0]["attempts"], 1, "a fresh schedule");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rx.hits.lock().unwrap().len(), 4, "delivered once");
    let dl = app
        .get(&format!("/v1/webhooks/{hook}/dead-letters"), Some(&alice))
        .await;
    assert!(dl.body["items"].as_array().unwrap().is_empty());
    // Not a dead letter any more.
    app.post(
        &format!("/v1/webhooks/{hook}/dead-letters/{delivery}/redrive"),
        Some(&alice),
        &json!({}),
        &[],
    )
    .await
    .assert_problem(404, "dead_letter_not_found");

    // Always 503 → dead; redrive all brings it back once the receiver works.
    rx.mode.store(1, Ordering::SeqCst);
    set_reminder(&app, &alice, "Water plants").await;
    eventually(
        &app,
        &format!("/v1/webhooks/{hook}/dead-letters"),
        &alice,
        |b| b["items"].as_array().unwrap().len() == 1,
    )
    .await;
    let before = rx.hits.lock().unwrap().len();
    rx.mode.store(3, Ordering::SeqCst);
    let r = app
        .post(
            &format!("/v1/webhooks/{hook}/dead-letters/redrive"),
            Some(&alice),
            &json!({}),
            &[],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["redriven"], "all");
    eventually(
        &app,
        &format!("/v1/webhooks/{hook}/deliveries?status=delivered"),
        &alice,
        |b| b["items"].as_array().unwrap().len() == 2,
    )
    .await;
    assert_eq!(rx.hits.lock().unwrap().len(), before + 1);

    // Disabled: nothing is queued for it.
    let r = app
        .call(
            "PATCH",
            &format!("/v1/webhooks/{hook}"),
            Some(&alice),
            Some(&json!({"enabled": false})),
            &[],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    set_reminder(&app, &alice, "Ignored").await;
    app.settle("webhooks").await;
    let all = app
        .get(&format!("/v1/webhooks/{hook}/deliveries"), Some(&alice))
        .await;
    assert_eq!(
        all.body["items"].as_array().unwrap().len(),
        2,
        "{}",
        all.body
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_webhook_input_is_refused_and_writes_nothing() {
    let app = TestApp::spawn().await;
    let (_, alice) = app.user("alice@example.com").await;
    let events = app.count("events").await;
    for (body, field) in [
        (
            json!({"url": "ftp://example.com/x", "filter": ["notify.*"]}),
            "url",
        ),
        (json!({"url": "https://", "filter": ["notify.*"]}), "url"),
        (
            json!({"url": "https://example.com/x", "filter": []}),
            "filter",
        ),
        (
            json!({"url": "https://example.com/x", "filter": ["accounts.*"]}),
            "filter",
        ),
        (
            json!({"url": "https://example.com/x", "filter": ["wallet"]}),
            "filter",
        ),
        (
            json!({"url": "https://example.com/x", "filter": ["notify.*"], "description": "x".repeat(201)}),
            "description",
        ),
    ] {
        let r = app.post("/v1/webhooks", Some(&alice), &body, &[]).await;
        r.assert_problem(422, "invalid_input");
        assert_eq!(r.body["errors"][0]["field"], field, "{}", r.body);
    }
    let r = app
        .post(
            "/v1/webhooks",
            Some(&alice),
            &json!({"url": "https://example.com/x", "filter": ["notify.*"], "secret": "mine"}),
            &[],
        )
        .await;
    assert!((400..500).contains(&r.status), "{}", r.body);
    let r = app
        .http
        .post(format!("{}/v1/webhooks", app.base))
        .bearer_auth(&alice)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let r = app
        .post(
            "/v1/webhooks",
            None,
            &json!({"url": "https://example.com/x", "filter": ["notify.*"]}),
            &[],
        )
        .await;
    assert_eq!(r.status, 401);
    let missing = Uuid::now_v7();
    app.call(
        "PATCH",
        &format!("/v1/webhooks/{missing}"),
        Some(&alice),
        Some(&json!({"filter": ["nope"]})),
        &[],
    )
    .await
    .assert_problem(422, "invalid_input");
    app.call(
        "PATCH",
        &format!("/v1/webhooks/{missing}"),
        Some(&alice),
        Some(&json!({"enabled": false})),
        &[],
    )
    .await
    .assert_problem(404, "webhook_not_found");
    assert_eq!(app.count("events").await, events);
    assert_eq!(app.count("webhook_secrets").await, 0);

    // A retry with the same Idempotency-Key answers the same endpoint, without the secret.
    let body = json!({"url": "https://example.com/x", "filter": ["notify.*"]});
    let first = app
        .post(
            "/v1/webhooks",
            Some(&alice),
            &body,
            &[("idempotency-key", "hook-1")],
        )
        .await;
    assert_eq!(first.status, 201, "{}", first.body);
    assert!(first.body["secret"].is_string());
    let again = app
        .post(
            "/v1/webhooks",
            Some(&alice),
            &body,
            &[("idempotency-key", "hook-1")],
        )
        .await;
    assert_eq!(again.status, 201, "{}", again.body);
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(again.body["webhook_id"], first.body["webhook_id"]);
    assert!(
        again.body.get("secret").is_none(),
        "shown once: {}",
        again.body
    );
    assert_eq!(app.count("webhook_secrets").await, 1);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_projection_rebuild_fires_no_delivery_again() {
    let app = TestApp::spawn_with(Roles::ALL, |c| {
        c.webhook_schedule = "100ms".into();
        c.webhook_poll_ms = 10;
    })
    .await;
    let (_, alice) = app.user("alice@example.com").await;
    let (url, rx) = receiver(3, 0).await;
    let r = app
        .post(
            "/v1/webhooks",
            Some(&alice),
            &json!({"url": url, "filter": ["reminder.*"]}),
            &[],
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let hook = id(&r.body["webhook_id"]);
    set_reminder(&app, &alice, "Once").await;
    wait_hits(&rx, 1, Duration::from_secs(10)).await;

    // Rebuild projector `webhooks` from 0 (its endpoints from scratch); other
    // read models have checkpoints of their own and queue nothing.
    sqlx::query("DELETE FROM proj_webhooks")
        .execute(&app.pool)
        .await
        .unwrap();
    sqlx::query("UPDATE proj_checkpoints SET position = 0 WHERE model = 'webhooks'")
        .execute(&app.pool)
        .await
        .unwrap();
    app.settle("webhooks").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(rx.hits.lock().unwrap().len(), 1, "nothing fired again");
    assert_eq!(app.count("webhook_deliveries").await, 1);
    let got = app.get(&format!("/v1/webhooks/{hook}"), Some(&alice)).await;
    assert_eq!(got.status, 200, "the endpoint is rebuilt: {}", got.body);

    // While the projector is behind its high-water mark (mid-rebuild), a due
    // delivery waits; once it is past the mark again, it goes.
    let head = handlers::store::head_position(&app.pool).await.unwrap();
    sqlx::query("UPDATE webhook_high_water SET position = $1")
        .bind(head + 1_000_000)
        .execute(&app.pool)
        .await
        .unwrap();
    sqlx::query("UPDATE webhook_deliveries SET status = 'pending', next_attempt_at = now()")
        .execute(&app.pool)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        rx.hits.lock().unwrap().len(),
        1,
        "no delivery during a rebuild"
    );
    sqlx::query("UPDATE webhook_high_water SET position = $1")
        .bind(head)
        .execute(&app.pool)
        .await
        .unwrap();
    wait_hits(&rx, 2, Duration::from_secs(5)).await;
    app.stop().await;
}
