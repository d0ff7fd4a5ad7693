//! What the README promises an operator with the `nats` CLI is really there.
//! The CLI is not installable here, so this speaks the same JetStream API
//! requests it sends (`$JS.API.STREAM.NAMES`, `$JS.API.STREAM.INFO.<S>`,
//! `$JS.API.CONSUMER.NAMES.<S>`, `$JS.API.CONSUMER.INFO.<S>.<C>`,
//! `$JS.API.STREAM.MSG.GET.<S>`, and `$JS.API.STREAM.CREATE.<S>` /
//! `$JS.API.CONSUMER.CREATE.<S>.<C>` as `nats stream|consumer add --config` do),
//! and it reads the README's table itself, so the doc and the test cannot drift.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use base64::Engine as _;
use futures::StreamExt;
use mathia_tests::TestApp;
use serde_json::{Value, json};

async fn api(app: &TestApp, subject: String) -> Value {
    api_with(app, subject, json!({})).await
}

async fn api_with(app: &TestApp, subject: String, body: Value) -> Value {
    let reply = app
        .nats
        .request(subject, serde_json::to_vec(&body).unwrap().into())
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
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("consumer {name} on {stream} never appeared");
}

/// What the README's NATS section promises.
#[derive(Debug, Default)]
struct Promised {
    /// Stream → its row's text.
    streams: BTreeMap<String, String>,
    /// (stream, consumer) → its row's text.
    consumers: BTreeMap<(String, String), String>,
    /// Every `nats sub '<pattern>'`.
    subs: Vec<String>,
    /// Headers promised on EVENTS and on COMMANDS messages.
    event_headers: BTreeSet<String>,
    command_headers: BTreeSet<String>,
}

fn backticked(text: &str) -> Vec<String> {
    text.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

fn readme() -> Promised {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md");
    let section = text
        .split("\n## ")
        .find(|s| s.starts_with("NATS: streams, consumers, subjects, headers"))
        .expect("the README's NATS section");
    let mut p = Promised::default();
    for line in section.lines().filter(|l| l.starts_with("| ")) {
        let cells: Vec<&str> = line
            .split(" | ")
            .map(|c| c.trim_matches(['|', ' ']))
            .collect();
        let [what, row, commands] = cells[..] else {
            continue;
        };
        for cmd in backticked(commands) {
            let words: Vec<&str> = cmd.split_whitespace().collect();
            match (what, &words[..]) {
                ("stream", ["nats", "stream", "info", s]) => {
                    p.streams.insert(s.to_string(), row.to_owned());
                }
                ("consumer", ["nats", "consumer", "info", s, c]) => {
                    p.consumers
                        .insert((s.to_string(), c.to_string()), row.to_owned());
                }
                ("subject", ["nats", "sub", pattern]) => {
                    p.subs.push(pattern.trim_matches('\'').to_owned())
                }
                ("subject", ["nats", "stream", "view", s]) => {
                    assert!(p.streams.contains_key(*s) || *s == "COMMANDS", "{cmd}")
                }
                _ => panic!("README row with a command this test does not know: {line}"),
            }
        }
    }
    let headers = section
        .split("Headers on `EVENTS` messages:")
        .nth(1)
        .expect("the README's headers paragraph");
    let (on_events, rest) = headers
        .split_once("On `COMMANDS`:")
        .expect("COMMANDS headers");
    let on_commands = rest.split("\n\n").next().unwrap();
    p.event_headers = backticked(on_events).into_iter().collect();
    p.command_headers = backticked(on_commands).into_iter().collect();
    p
}

/// Under the test's prefix: `evt.wallet.>` → `t123.evt.wallet.>`, `<uuid>` → `*`.
fn prefixed(app: &TestApp, pattern: &str) -> String {
    let tokens: Vec<&str> = pattern
        .split('.')
        .map(|t| if t.starts_with('<') { "*" } else { t })
        .collect();
    format!("{}.{}", app.subjects.prefix(), tokens.join("."))
}

fn stream_name(app: &TestApp, documented: &str) -> String {
    match documented {
        "COMMANDS" => app.subjects.commands_stream(),
        "EVENTS" => app.subjects.events_stream(),
        other => panic!("a stream the code does not name: {other}"),
    }
}

fn header_names(msg: &async_nats::Message) -> BTreeSet<String> {
    msg.headers
        .as_ref()
        .map(|h| h.iter().map(|(k, _)| k.to_string()).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_consumers_subjects_and_headers_are_what_the_readme_lists() {
    let promised = readme();
    assert_eq!(promised.streams.len(), 2, "{promised:?}");
    assert!(promised.consumers.len() >= 10, "{promised:?}");
    let app = TestApp::spawn().await;
    let p = app.subjects.prefix().to_owned();

    // nats sub '<every documented pattern>' (each must be a subject the server takes).
    let mut subs = Vec::new();
    for pattern in &promised.subs {
        subs.push((
            pattern.clone(),
            app.nats.subscribe(prefixed(&app, pattern)).await.unwrap(),
        ));
    }
    let mut commands_sub = app.nats.subscribe(format!("{p}.cmd.>")).await.unwrap();
    app.nats.flush().await.unwrap();

    // nats stream ls: exactly the documented streams exist under our prefix.
    let names = api_with(
        &app,
        "$JS.API.STREAM.NAMES".into(),
        json!({"subject": format!("{p}.>")}),
    )
    .await;
    let names: BTreeSet<String> = names["streams"]
        .as_array()
        .expect("stream names")
        .iter()
        .map(|n| n.as_str().unwrap().to_owned())
        .collect();
    let want: BTreeSet<String> = promised
        .streams
        .keys()
        .map(|s| stream_name(&app, s))
        .collect();
    assert_eq!(names, want);

    // nats stream info <S>: the facts each row states.
    for (documented, row) in &promised.streams {
        let info = api(
            &app,
            format!("$JS.API.STREAM.INFO.{}", stream_name(&app, documented)),
        )
        .await;
        assert_eq!(
            info["type"],
            "io.nats.jetstream.api.v1.stream_info_response"
        );
        let c = &info["config"];
        let subjects: Vec<String> = backticked(row)
            .iter()
            .filter(|t| t.ends_with(".>"))
            .map(|t| prefixed(&app, t))
            .collect();
        assert_eq!(c["subjects"], json!(subjects), "{documented}");
        let retention = if row.contains("work-queue retention") {
            "workqueue"
        } else {
            "limits"
        };
        assert!(row.contains(" retention"), "{row}");
        assert_eq!(c["retention"], retention, "{documented}");
        if row.contains("file storage") {
            assert_eq!(c["storage"], "file");
        }
        if row.contains("2 min duplicate window") {
            assert_eq!(c["duplicate_window"], 120_000_000_000u64, "{documented}");
        }
        let day = 86_400_000_000_000u64;
        if row.contains("24 h max age") {
            assert_eq!(c["max_age"], day, "{documented}");
        }
        if row.contains("7 days max age") {
            assert_eq!(c["max_age"], 7 * day, "{documented}");
        }
    }

    // nats consumer info <S> <C>: each documented consumer, with its filters and ack policy.
    for ((documented, name), row) in &promised.consumers {
        let stream = stream_name(&app, documented);
        let c = consumer_info(&app, &stream, name).await;
        let c = &c["config"];
        assert_eq!(c["durable_name"], name.as_str());
        let filters: BTreeSet<String> = backticked(row)
            .iter()
            .filter(|t| t.starts_with("evt.") || t.starts_with("cmd."))
            .map(|t| prefixed(&app, t))
            .collect();
        if !filters.is_empty() {
            let mut actual: BTreeSet<String> = c["filter_subjects"]
                .as_array()
                .map(|a| a.iter().map(|f| f.as_str().unwrap().to_owned()).collect())
                .unwrap_or_default();
            if let Some(f) = c["filter_subject"].as_str().filter(|f| !f.is_empty()) {
                actual.insert(f.to_owned());
            }
            assert_eq!(actual, filters, "filters of {name}");
        }
        let ack = if row.contains("explicit ack") {
            "explicit"
        } else {
            "all"
        };
        assert_eq!(c["ack_policy"], ack, "{name}");
        if row.contains("ack wait 10 s") {
            assert_eq!(c["ack_wait"], 10_000_000_000u64, "{name}");
        }
    }
    // nats consumer ls <S>: nothing undocumented.
    for documented in promised.streams.keys() {
        let stream = stream_name(&app, documented);
        let names = api(&app, format!("$JS.API.CONSUMER.NAMES.{stream}")).await;
        let names: BTreeSet<String> = names["consumers"]
            .as_array()
            .expect("consumer names")
            .iter()
            .map(|n| n.as_str().unwrap().to_owned())
            .collect();
        let want: BTreeSet<String> = promised
            .consumers
            .keys()
            .filter(|(s, _)| s == documented)
            .map(|(_, c)| c.clone())
            .collect();
        assert_eq!(names, want, "consumers of {documented}");
    }

    // Traffic on the documented subjects: a wallet, a room with a message, a webhook endpoint.
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
    let wallet = opened.body["wallet_id"].as_str().unwrap().to_owned();
    let room = super::chat::room(&app, &alice, "ops", "private").await;
    super::chat::say(&app, &alice, room, "hello").await;
    super::keys::register_webhook(&app, &alice, "http://127.0.0.1:9/hook").await;
    for (pattern, sub) in &mut subs {
        let must_see = [
            "evt.wallet.>",
            "evt.chat.room.<uuid>.>",
            "evt.webhook.>",
            "_outcome.>",
        ];
        if !must_see.contains(&pattern.as_str()) {
            continue;
        }
        let msg = tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await
            .unwrap_or_else(|_| panic!("nothing on {pattern} within 10 s"))
            .unwrap();
        let tokens: Vec<&str> = msg.subject.split('.').collect();
        assert_eq!(tokens[0], p);
        if tokens[1] == "evt" {
            // evt.<domain>.<aggregate>.<id>.<EventType>
            assert_eq!(tokens.len(), 6, "{}", msg.subject);
        }
    }

    // The wallet's event as `nats stream get EVENTS <seq>` shows it: headers exactly as documented.
    let events = app.subjects.events_stream();
    let last = api(&app, format!("$JS.API.STREAM.INFO.{events}")).await["state"]["last_seq"]
        .as_u64()
        .unwrap();
    let mut found = None;
    // nats stream get EVENTS <seq>
    for seq in 1..=last {
        let got = api_with(
            &app,
            format!("$JS.API.STREAM.MSG.GET.{events}"),
            json!({"seq": seq}),
        )
        .await;
        if got["message"]["subject"]
            .as_str()
            .is_some_and(|s| s.contains(&wallet))
        {
            found = Some(got);
            break;
        }
    }
    let got = found.expect("the wallet's event in EVENTS");
    let hdrs = base64::engine::general_purpose::STANDARD
        .decode(got["message"]["hdrs"].as_str().expect("headers"))
        .unwrap();
    let hdrs = String::from_utf8(hdrs).unwrap();
    let names: BTreeSet<String> = hdrs
        .lines()
        .skip(1) // NATS/1.0
        .filter_map(|l| l.split_once(':').map(|(k, _)| k.trim().to_owned()))
        .filter(|k| !k.is_empty())
        .collect();
    assert_eq!(names, promised.event_headers, "EVENTS headers");
    let body: Value = serde_json::from_slice(
        &base64::engine::general_purpose::STANDARD
            .decode(got["message"]["data"].as_str().unwrap())
            .unwrap(),
    )
    .unwrap();
    assert!(hdrs.contains(&format!(
        "Nats-Msg-Id: {}",
        body["event_id"].as_str().unwrap()
    )));
    assert!(hdrs.contains(&format!("Mathia-Position: {}", body["position"])));

    // A command as it crosses COMMANDS: headers exactly as documented.
    let cmd = tokio::time::timeout(Duration::from_secs(10), commands_sub.next())
        .await
        .expect("a command within 10 s")
        .unwrap();
    assert_eq!(
        header_names(&cmd),
        promised.command_headers,
        "COMMANDS headers"
    );
    app.stop().await;
}

/// The definitions in `deploy/nats/` are accepted as `nats stream add --config`
/// and `nats consumer add --config` send them, and give what the code creates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deploy_definitions_are_what_the_cli_accepts_and_the_code_creates() {
    let app = TestApp::spawn_with(mathia_tests::only(false, true, false, false), |_| {}).await;
    let p = app.subjects.prefix().to_owned();
    // The role has started once its consumer exists (the streams come first).
    consumer_info(&app, &app.subjects.commands_stream(), "handlers").await;
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/nats");
    let read = |f: &str| -> Value {
        serde_json::from_str(&std::fs::read_to_string(format!("{dir}/{f}")).unwrap()).unwrap()
    };
    // The same stream definitions, created from the files under a second prefix.
    let q = format!("{p}f");
    for (file, code_name, kind) in [
        (
            "COMMANDS.stream.json",
            app.subjects.commands_stream(),
            "cmd",
        ),
        ("EVENTS.stream.json", app.subjects.events_stream(), "evt"),
    ] {
        let mut def = read(file);
        let name = format!("{}_{}", q.to_uppercase(), def["name"].as_str().unwrap());
        def["name"] = name.clone().into();
        def["subjects"] = json!([format!("{q}.{kind}.>")]);
        let created = api_with(&app, format!("$JS.API.STREAM.CREATE.{name}"), def).await;
        assert!(created["error"].is_null(), "{file}: {created}");
        let ours = api(&app, format!("$JS.API.STREAM.INFO.{code_name}")).await;
        let (mut a, mut b) = (created["config"].clone(), ours["config"].clone());
        for c in [&mut a, &mut b] {
            c.as_object_mut().unwrap().remove("name");
            c.as_object_mut().unwrap().remove("subjects");
        }
        assert_eq!(a, b, "{file}: the file and the code disagree");
    }
    // The handlers consumer from its file (on the file-made work-queue stream: one
    // consumer per filter there), against the one the handlers role made.
    let mut def = read("COMMANDS.handlers.consumer.json");
    def["filter_subject"] = format!("{q}.cmd.>").into();
    let stream = format!("{}_COMMANDS", q.to_uppercase());
    let created = api_with(
        &app,
        format!("$JS.API.CONSUMER.CREATE.{stream}.handlers"),
        json!({"stream_name": stream, "config": def}),
    )
    .await;
    assert!(created["error"].is_null(), "{created}");
    let ours = consumer_info(&app, &app.subjects.commands_stream(), "handlers").await;
    let (mut a, mut b) = (created["config"].clone(), ours["config"].clone());
    for c in [&mut a, &mut b] {
        c.as_object_mut().unwrap().remove("filter_subject");
    }
    assert_eq!(a, b, "the handlers consumer: file and code disagree");
    // The projector template, as a projector would make it.
    let mut def = read("EVENTS.projector.consumer.json");
    def["durable_name"] = "proj-from-file".into();
    def["filter_subject"] = format!("{p}.evt.wallet.>").into();
    let events = app.subjects.events_stream();
    let created = api_with(
        &app,
        format!("$JS.API.CONSUMER.CREATE.{events}.proj-from-file"),
        json!({"stream_name": events, "config": def}),
    )
    .await;
    assert!(created["error"].is_null(), "{created}");
    let code =
        handlers::bus::projector_consumer_config(&app.subjects, "wallet", &["wallet"]).unwrap();
    assert_eq!(created["config"]["ack_policy"], "all");
    assert_eq!(created["config"]["filter_subject"], code.filter_subject);
    assert_eq!(
        created["config"]["ack_wait"].as_u64().unwrap(),
        code.ack_wait.as_nanos() as u64
    );
    for name in ["COMMANDS", "EVENTS"] {
        let _ = api(
            &app,
            format!("$JS.API.STREAM.DELETE.{}_{name}", q.to_uppercase()),
        )
        .await;
    }
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
    // `mathia status` prints the same picture as a table, with the handler backlog.
    let js = async_nats::jetstream::new(app.nats.clone());
    let gathered =
        projections::status::gather(&app.pool, &js, &app.subjects, Duration::from_secs(60))
            .await
            .unwrap();
    let table = mathia::render_status(&gathered);
    assert!(table.contains("handlers   backlog 0 commands"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("projector  wallet") && !l.contains("STUCK")),
        "{table}"
    );
    assert!(table.contains("consumer proj-wallet"), "{table}");
    app.stop().await;
}
