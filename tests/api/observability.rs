//! Observability: the `/metrics` series the README names, one trace across
//! gateway → COMMANDS → handler → relay → EVENTS, and an audit log without secrets.

use std::collections::BTreeMap;
use std::time::Duration;

use events::trace::{self, TraceContext};
use futures::StreamExt;
use mathia::Roles;
use mathia_tests::TestApp;
use serde_json::{Value, json};
use uuid::Uuid;

/// One sample of the Prometheus text format: name, labels, value.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

fn parse_metrics(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels = labels
                .split("\",")
                .filter(|kv| !kv.is_empty())
                .filter_map(|kv| {
                    let (k, v) = kv.split_once('=')?;
                    Some((k.to_owned(), v.trim_matches('"').to_owned()))
                })
                .collect();
            Some(Sample {
                name: name.to_owned(),
                labels,
                value: value.parse().ok()?,
            })
        })
        .collect()
}

fn find<'a>(samples: &'a [Sample], name: &str, labels: &[(&str, &str)]) -> Vec<&'a Sample> {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .collect()
}

async fn scrape(app: &TestApp) -> Vec<Sample> {
    let res = app
        .http
        .get(format!("{}/metrics", app.base))
        .send()
        .await
        .expect("scrape");
    assert_eq!(res.status(), 200);
    parse_metrics(&res.text().await.expect("text"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_exposes_every_named_series_with_sane_values_after_traffic() {
    let app = TestApp::spawn_with(Roles::ALL, |c| c.metrics_sample_ms = 100).await;
    let p = app.alice_and_bob(10_000).await;
    // One accepted and one rejected transfer.
    let ok = app
        .post(
            "/v1/transfers",
            Some(&p.alice),
            &json!({"from_wallet": p.from, "to_user": p.bob_id, "amount": 700, "currency": "KES"}),
            &[],
        )
        .await;
    assert_eq!(ok.status, 201, "{}", ok.body);
    let too_much = app
        .post(
            "/v1/transfers",
            Some(&p.alice),
            &json!({"from_wallet": p.from, "to_user": p.bob_id, "amount": 1_000_000, "currency": "KES"}),
            &[],
        )
        .await;
    too_much.assert_problem(422, "insufficient_funds");
    let _ws = super::realtime::connect(&app, &p.bob).await;
    app.settle("wallet").await;
    let head = handlers::store::head_position(&app.pool).await.unwrap();
    assert!(head >= 5, "head {head}");

    // The sampler runs every 100 ms: wait until it has seen the settled state.
    let events = app.subjects.events_stream();
    let commands = app.subjects.commands_stream();
    let mut samples = Vec::new();
    for _ in 0..100 {
        samples = scrape(&app).await;
        let lag = find(
            &samples,
            "mathia_projector_lag_events",
            &[("projector", "wallet")],
        );
        let log_head = find(&samples, "mathia_log_head", &[]);
        if lag.first().is_some_and(|s| s.value == 0.0)
            && log_head.first().is_some_and(|s| s.value >= head as f64)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // HTTP latency by route.
    let http = find(
        &samples,
        "mathia_http_request_seconds_count",
        &[
            ("method", "POST"),
            ("route", "/v1/wallets"),
            ("status", "201"),
        ],
    );
    assert_eq!(http.len(), 1, "{http:?}");
    assert!(http[0].value >= 2.0, "two wallets opened: {http:?}");
    let refused = find(
        &samples,
        "mathia_http_request_seconds_count",
        &[("route", "/v1/transfers"), ("status", "422")],
    );
    assert_eq!(refused.first().map(|s| s.value), Some(1.0));
    let http_sum = find(
        &samples,
        "mathia_http_request_seconds_sum",
        &[("route", "/v1/transfers")],
    );
    assert!(
        http_sum.iter().all(|s| s.value > 0.0 && s.value < 30.0),
        "{http_sum:?}"
    );

    // Commands by type and outcome, counted and timed.
    for outcome in ["accepted", "rejected"] {
        let n = find(&samples, "mathia_commands_total", &[("outcome", outcome)]);
        assert!(
            n.iter().map(|s| s.value).sum::<f64>() >= 1.0,
            "{outcome}: {n:?}"
        );
        let timed = find(
            &samples,
            "mathia_command_seconds_count",
            &[("outcome", outcome)],
        );
        assert!(!timed.is_empty(), "mathia_command_seconds {outcome}");
        for s in find(
            &samples,
            "mathia_command_seconds_sum",
            &[("outcome", outcome)],
        ) {
            assert!(s.value >= 0.0 && s.value < 30.0, "{s:?}");
            assert!(s.labels.contains_key("command"), "{s:?}");
        }
    }
    let rejected_transfer = find(
        &samples,
        "mathia_commands_total",
        &[("outcome", "rejected")],
    );
    assert!(
        rejected_transfer
            .iter()
            .any(|s| s.labels["command"].to_lowercase().contains("transfer")),
        "{rejected_transfer:?}"
    );

    // Events/s: the relay's counter (its rate) has every event; projectors count theirs.
    let relayed = find(&samples, "mathia_relay_events_total", &[]);
    assert!(relayed[0].value >= head as f64, "{relayed:?} < head {head}");
    let projected = find(
        &samples,
        "mathia_projected_events_total",
        &[("projector", "wallet")],
    );
    assert!(projected[0].value >= 1.0);

    // Projector lag in events and seconds, a gauge per projector.
    for projector in ["wallet", "chat", "feed"] {
        let lag = find(
            &samples,
            "mathia_projector_lag_events",
            &[("projector", projector)],
        );
        assert_eq!(lag.len(), 1, "{projector}");
        assert!(
            lag[0].value >= 0.0 && lag[0].value <= head as f64,
            "{lag:?}"
        );
        let secs = find(
            &samples,
            "mathia_projector_lag_seconds",
            &[("projector", projector)],
        );
        assert!(secs[0].value >= 0.0 && secs[0].value < 60.0, "{secs:?}");
    }
    assert_eq!(
        find(
            &samples,
            "mathia_projector_lag_events",
            &[("projector", "wallet")]
        )[0]
        .value,
        0.0
    );

    // Consumer pending, per consumer (the handlers' is the handler backlog).
    let handlers = find(
        &samples,
        "mathia_consumer_pending",
        &[("stream", &commands), ("consumer", "handlers")],
    );
    assert_eq!(handlers.len(), 1, "{handlers:?}");
    assert!(handlers[0].value >= 0.0);
    let wallet = find(
        &samples,
        "mathia_consumer_pending",
        &[("stream", &events), ("consumer", "proj-wallet")],
    );
    assert_eq!(wallet.len(), 1);
    assert!(wallet[0].value >= 0.0 && wallet[0].value <= head as f64);

    // WebSocket connections: Bob's socket is open.
    let ws = find(&samples, "mathia_ws_connections", &[]);
    assert!(ws[0].value >= 1.0, "{ws:?}");
    app.stop().await;
}

fn traceparent_of(msg: &async_nats::Message) -> Option<TraceContext> {
    msg.headers
        .as_ref()?
        .get("traceparent")
        .and_then(|v| TraceContext::parse(v.as_str()))
}

/// The first message on `sub` within 10 s that `keep` accepts.
async fn first_matching(
    sub: &mut async_nats::Subscriber,
    keep: impl Fn(&async_nats::Message) -> bool,
) -> async_nats::Message {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let m = sub.next().await.expect("subscription open");
            if keep(&m) {
                return m;
            }
        }
    })
    .await
    .expect("a matching message within 10 s")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requests_trace_id_arrives_on_the_events_message_of_the_event_it_caused() {
    let app = TestApp::spawn().await;
    let p = app.subjects.prefix().to_owned();
    let (_, alice) = app.user("alice@test.local").await;
    let mut commands = app.nats.subscribe(format!("{p}.cmd.>")).await.unwrap();
    let mut events = app
        .nats
        .subscribe(format!("{p}.evt.wallet.>"))
        .await
        .unwrap();
    app.nats.flush().await.unwrap();

    // A caller with a trace of its own: we continue it.
    let caller = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let caller = TraceContext::parse(caller).unwrap();
    let r = app
        .post(
            "/v1/wallets",
            Some(&alice),
            &json!({"currency": "KES"}),
            &[("traceparent", &caller.to_string())],
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let gateway = TraceContext::parse(r.header("traceparent").expect("traceparent answered"))
        .expect("a valid traceparent");
    assert_eq!(
        gateway.trace_id, caller.trace_id,
        "the caller's trace goes on"
    );
    assert_ne!(
        gateway.span_id, caller.span_id,
        "the gateway's span is its own"
    );
    assert_eq!(
        r.header("x-request-id"),
        Some(caller.trace_uuid().to_string().as_str()),
        "the request id is the trace id"
    );
    let wallet: Uuid = r.body["wallet_id"].as_str().unwrap().parse().unwrap();

    // gateway → COMMANDS: the command carries the gateway's span as parent.
    let cmd = first_matching(&mut commands, |m| {
        traceparent_of(m).is_some_and(|t| t.trace_id == caller.trace_id)
    })
    .await;
    assert_eq!(traceparent_of(&cmd).unwrap().span_id, gateway.span_id);
    let envelope: Value = serde_json::from_slice(&cmd.payload).unwrap();
    let command_id: Uuid = envelope["command_id"].as_str().unwrap().parse().unwrap();
    assert_eq!(envelope["correlation_id"], caller.trace_uuid().to_string());

    // handler → store → relay → EVENTS: same trace, the handler's span as parent.
    let evt = first_matching(&mut events, |m| m.subject.contains(&wallet.to_string())).await;
    let on_event = traceparent_of(&evt).expect("EVENTS message has a traceparent");
    assert_eq!(on_event.trace_id, caller.trace_id);
    assert_eq!(on_event.span_id, trace::span_id_of(command_id));
    let body: Value = serde_json::from_slice(&evt.payload).unwrap();
    assert_eq!(body["correlation_id"], caller.trace_uuid().to_string());
    assert_eq!(body["causation_id"], command_id.to_string());

    // Without a traceparent (or with a malformed one) the gateway starts a trace, and it arrives too.
    for sent in [None, Some("00-not-a-trace-01")] {
        let headers: Vec<(&str, &str)> = sent.map(|s| ("traceparent", s)).into_iter().collect();
        let r = app
            .post(
                "/v1/wallets",
                Some(&alice),
                &json!({"currency": if sent.is_some() { "EUR" } else { "USD" }}),
                &headers,
            )
            .await;
        assert_eq!(r.status, 201, "{}", r.body);
        let fresh = TraceContext::parse(r.header("traceparent").unwrap()).unwrap();
        assert_ne!(fresh.trace_id, caller.trace_id);
        assert_eq!(
            r.header("x-request-id"),
            Some(fresh.trace_uuid().to_string().as_str())
        );
        let wallet = r.body["wallet_id"].as_str().unwrap().to_owned();
        let evt = first_matching(&mut events, |m| m.subject.contains(&wallet)).await;
        assert_eq!(traceparent_of(&evt).unwrap().trace_id, fresh.trace_id);
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_log_records_security_actions_and_never_a_secret() {
    let pay_secret = "pay-hook-secret-8d1f0c";
    let app = TestApp::spawn_with(Roles::ALL, |c| {
        c.payments_webhook_secret = Some(pay_secret.into());
    })
    .await;
    let (_, admin) = app.admin().await;
    let (_, alice) = app.user("alice@test.local").await;
    let password = "Str0ng&Secret!";
    let wrong = "Wr0ng&Guess?42";
    app.post(
        "/v1/auth/login",
        None,
        &json!({"email": "alice@test.local", "password": wrong}),
        &[],
    )
    .await
    .assert_problem(401, "unauthorized");
    let login = app
        .post(
            "/v1/auth/login",
            None,
            &json!({"email": "alice@test.local", "password": password}),
            &[],
        )
        .await;
    let refresh = login.body["refresh_token"].as_str().unwrap().to_owned();
    let access = login.body["access_token"].as_str().unwrap().to_owned();
    assert_eq!(
        app.get("/v1/admin/status", Some(&admin)).await.status / 100,
        2
    );

    let room = super::chat::room(&app, &alice, "ops", "private").await;
    super::keys::rotate_room_key(&app, &alice, room).await;
    let hook =
        super::keys::register_webhook(&app, &alice, "http://127.0.0.1:9/hook?token=q-s3cr3t").await;
    let hook_secret = hook["secret"].as_str().unwrap().to_owned();
    let hook_id = hook["webhook_id"].as_str().unwrap().to_owned();
    let deleted = app
        .call(
            "DELETE",
            &format!("/v1/webhooks/{hook_id}"),
            Some(&alice),
            None,
            &[],
        )
        .await;
    assert_eq!(deleted.status, 200, "{}", deleted.body);
    let gone = app
        .call(
            "DELETE",
            &format!("/v1/rooms/{room}"),
            Some(&alice),
            None,
            &[],
        )
        .await;
    assert_eq!(gone.status, 200, "{}", gone.body);
    let forged = "t=1700000000,v1=00deadbeef00";
    let res = app
        .http
        .post(format!("{}/v1/webhooks/payments/mpesa", app.base))
        .header("mathia-signature", forged)
        .body(r#"{"id":"e1"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    let out = app
        .post(
            "/v1/auth/logout",
            None,
            &json!({"refresh_token": refresh}),
            &[],
        )
        .await;
    assert_eq!(out.status, 204);

    let rows: Vec<(String, String)> =
        sqlx::query_as("SELECT action, row_to_json(a)::text FROM audit_log a ORDER BY id")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    let actions: Vec<&str> = rows.iter().map(|(a, _)| a.as_str()).collect();
    for want in [
        "account.registered",
        "admin.granted",
        "login.failed",
        "login.succeeded",
        "admin.status",
        "room.key_rotated",
        "webhook.registered",
        "webhook.deleted",
        "room.deleted",
        "payment_webhook.rejected",
        "logout",
    ] {
        assert!(actions.contains(&want), "{want} missing from {actions:?}");
    }
    let everything: String = rows.iter().map(|(_, r)| r.as_str()).collect();
    for secret in [
        password,
        wrong,
        &refresh,
        &access,
        &hook_secret,
        "q-s3cr3t",
        pay_secret,
        forged,
        app.config.jwt_secret.as_deref().unwrap(),
        app.config.master_key.as_deref().unwrap(),
    ] {
        assert!(
            !everything.contains(secret),
            "a secret reached the audit log"
        );
    }
    let rotation = rows
        .iter()
        .find(|(a, _)| a == "room.key_rotated")
        .map(|(_, r)| serde_json::from_str::<Value>(r).unwrap())
        .unwrap();
    assert_eq!(rotation["subject"], room.to_string());
    assert_eq!(rotation["detail"]["key_version"], 2);
    app.stop().await;
}

/// A `handlers` process (no gateway) serves its own `/metrics` and `/healthz`
/// on `MATHIA_METRICS_LISTEN`: command latency is recorded there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_without_the_gateway_serves_its_own_metrics_and_healthz() {
    let app = TestApp::spawn_with(mathia_tests::only(true, false, true, true), |_| {}).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut config = app.config.clone();
    config.metrics_listen = Some(format!("127.0.0.1:{port}"));
    let stop = tokio_util::sync::CancellationToken::new();
    let handlers = tokio::spawn(mathia::run(
        config,
        mathia_tests::only(false, true, false, false),
        None,
        stop.clone(),
    ));
    let (_, alice) = app.user("alice@test.local").await;
    let r = app
        .post(
            "/v1/wallets",
            Some(&alice),
            &json!({"currency": "KES"}),
            &[],
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let base = format!("http://127.0.0.1:{port}");
    let health = app
        .http
        .get(format!("{base}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let text = app
        .http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let samples = parse_metrics(&text);
    let decided = find(
        &samples,
        "mathia_command_seconds_count",
        &[("outcome", "accepted")],
    );
    assert!(
        decided.iter().map(|s| s.value).sum::<f64>() >= 1.0,
        "{decided:?}"
    );
    stop.cancel();
    handlers.await.unwrap().unwrap();
    app.stop().await;
}
