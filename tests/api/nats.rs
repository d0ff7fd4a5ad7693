//! What the README promises an operator with the `nats` CLI is really there.
//! The CLI is not installable here, so this speaks the same JetStream API
//! requests it sends (`$JS.API.STREAM.INFO.<S>`, `$JS.API.CONSUMER.INFO.<S>.<C>`).

use mathia_tests::TestApp;
use serde_json::{Value, json};

async fn api(app: &TestApp, subject: String) -> Value {
    let reply = app
        .nats
        .request(subject, "".into())
        .await
        .expect("JetStream API answers");
    serde_json::from_slice(&reply.payload).expect("JSON")
}

/// `$JS.API.CONSUMER.INFO`, waiting for the role to have created the consumer
/// (each role creates its own when it starts).
async fn consumer_info(app: &TestApp, stream: &str, name: &str) -> Value {
    for _ in 0..400 {
        let info = api(app, format!("$JS.API.CONSUMER.INFO.{stream}.{name}")).await;
        if info["config"].is_object() {
            return info;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    panic!("consumer {name} on {stream} never appeared");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_consumers_subjects_and_headers_are_what_the_readme_lists() {
    let app = TestApp::spawn().await;
    let p = app.subjects.prefix().to_owned();
    let (commands, events) = (app.subjects.commands_stream(), app.subjects.events_stream());

    // nats stream info COMMANDS / EVENTS
    let info = api(&app, format!("$JS.API.STREAM.INFO.{commands}")).await;
    assert_eq!(
        info["type"],
        "io.nats.jetstream.api.v1.stream_info_response"
    );
    assert_eq!(info["config"]["subjects"], json!([format!("{p}.cmd.>")]));
    assert_eq!(info["config"]["retention"], "workqueue");
    assert_eq!(info["config"]["storage"], "file");
    assert_eq!(info["config"]["duplicate_window"], 120_000_000_000u64);
    let info = api(&app, format!("$JS.API.STREAM.INFO.{events}")).await;
    assert_eq!(info["config"]["subjects"], json!([format!("{p}.evt.>")]));
    assert_eq!(info["config"]["retention"], "limits");

    // nats consumer info COMMANDS handlers / EVENTS proj-wallet
    let handlers = consumer_info(&app, &commands, "handlers").await;
    assert_eq!(handlers["config"]["durable_name"], "handlers");
    assert_eq!(handlers["config"]["ack_policy"], "explicit");
    let projector = consumer_info(&app, &events, "proj-wallet").await;
    // Invoices are part of the wallet model (a payment's legs and its invoice row move together).
    assert_eq!(
        projector["config"]["filter_subjects"],
        json!([format!("{p}.evt.wallet.>"), format!("{p}.evt.invoice.>")])
    );
    for chat in ["proj-chat", "proj-screen"] {
        let c = consumer_info(&app, &events, chat).await;
        assert_eq!(
            c["config"]["filter_subject"],
            format!("{p}.evt.chat.>"),
            "{chat}"
        );
        assert_eq!(c["config"]["ack_policy"], "all", "{chat}");
    }

    // nats sub 'evt.wallet.>' sees an event with the documented subject and headers.
    let mut sub = app
        .nats
        .subscribe(format!("{p}.evt.wallet.>"))
        .await
        .unwrap();
    let (_, alice) = app.user("alice@test.local").await;
    let opened = app
        .post(
            "/v1/wallets",
            Some(&alice),
            &json!({"currency": "KES"}),
            &[],
        )
        .await;
    assert_eq!(opened.status, 201);
    let wallet = opened.body["wallet_id"].as_str().unwrap();
    let msg = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        futures::StreamExt::next(&mut sub),
    )
    .await
    .expect("an event within 10 s")
    .unwrap();
    assert_eq!(
        msg.subject.as_str(),
        format!("{p}.evt.wallet.account.{wallet}.AccountOpened")
    );
    let h = msg.headers.expect("headers");
    let body: Value = serde_json::from_slice(&msg.payload).unwrap();
    assert_eq!(
        h.get("Nats-Msg-Id").unwrap().as_str(),
        body["event_id"].as_str().unwrap()
    );
    assert_eq!(
        h.get("Mathia-Position").unwrap().as_str(),
        body["position"].to_string()
    );
    assert_eq!(
        h.get("Mathia-Event-Type").unwrap().as_str(),
        "AccountOpened"
    );
    assert_eq!(h.get("Mathia-Stream-Version").unwrap().as_str(), "1");
    assert!(h.get("X-Request-Id").is_some());

    // nats stream get EVENTS 1
    let got = app
        .nats
        .request(
            format!("$JS.API.STREAM.MSG.GET.{events}"),
            serde_json::to_vec(&json!({"seq": 1})).unwrap().into(),
        )
        .await
        .unwrap();
    let got: Value = serde_json::from_slice(&got.payload).unwrap();
    assert_eq!(got["message"]["seq"], 1);
    app.stop().await;
}

/// `GET /v1/admin/status` (and `mathia status`) shows every reader, and a
/// projector that stopped while events kept coming is reported stuck.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_a_stopped_projector_as_stuck() {
    let app = TestApp::spawn_with(mathia_tests::only(true, true, true, false), |_| {}).await;
    let (_, admin) = app.admin().await;
    let (_, alice) = app.user("alice@test.local").await;
    app.get("/v1/admin/status", Some(&alice))
        .await
        .assert_problem(403, "forbidden");
    let open = |currency: &'static str| {
        let (app, alice) = (&app, alice.clone());
        async move {
            let r = app
                .post(
                    "/v1/wallets",
                    Some(&alice),
                    &json!({ "currency": currency }),
                    &[],
                )
                .await;
            assert_eq!(r.status, 201, "{}", r.body);
        }
    };
    // The projector ran (its checkpoint exists) and then stopped; events keep coming.
    open("KES").await;
    let projector = app.start(mathia_tests::only(false, false, false, true));
    app.settle("wallet").await;
    app.crash(projector).await;
    open("USD").await;
    let status = app
        .get("/v1/admin/status?stuck_after_secs=0", Some(&admin))
        .await;
    assert_eq!(status.status, 503, "{}", status.body);
    let wallet = status.body["projectors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "wallet")
        .unwrap()
        .clone();
    assert_eq!(wallet["stuck"], true);
    assert!(wallet["lag_events"].as_i64().unwrap() >= 1);
    assert!(
        status.body["stuck"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s.as_str().unwrap().contains("projector wallet")),
        "{}",
        status.body
    );
    let streams: Vec<&str> = status.body["streams"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        streams,
        vec![
            app.subjects.commands_stream().as_str(),
            app.subjects.events_stream().as_str()
        ]
    );
    // Restarted, it catches up and the status is healthy again.
    app.start(mathia_tests::only(false, false, false, true));
    app.settle("wallet").await;
    let status = app.get("/v1/admin/status", Some(&admin)).await;
    assert_eq!(status.status, 200, "{}", status.body);
    app.stop().await;
}
