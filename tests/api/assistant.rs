//! The @mathia assistant against real services: it acts as the user through
//! the user's own commands, never moves money, keeps dialog state for
//! follow-ups, is rate limited, and streams a model's answer (a local stub of
//! the OpenAI streaming API) before committing one message.

use std::time::Duration;

use axum::response::IntoResponse;
use mathia_tests::TestApp;
use serde_json::{Value, json};

use super::chat::{id, invite_and_join, room, say};
use super::realtime::{connect, next_of, subscribe};

const ASSISTANT: &str = "6d617468-6961-0000-0000-000000000001";

/// The assistant's answer to message `asked`, once it is in the timeline.
async fn answer_to(app: &TestApp, token: &str, room: uuid::Uuid, asked: uuid::Uuid) -> Value {
    for _ in 0..600 {
        let page = app
            .get(&format!("/v1/rooms/{room}/messages?limit=200"), Some(token))
            .await;
        if let Some(m) = page.body["items"]
            .as_array()
            .and_then(|items| items.iter().find(|m| m["quote"] == json!(asked)))
        {
            assert_eq!(m["sender"], ASSISTANT, "{m}");
            return m.clone();
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the assistant never answered");
}

async fn ask(app: &TestApp, token: &str, room: uuid::Uuid, text: &str) -> String {
    let (m, _) = say(app, token, room, text).await;
    answer_to(app, token, room, m).await["body"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_assistant_acts_as_the_user_follows_up_and_never_moves_money() {
    let app = TestApp::spawn_with(mathia::Roles::ALL, |c| {
        c.assistant_per_hour = 8;
        c.fx_rates = "USD/KES=129.25".into();
    })
    .await;
    let parties = app.alice_and_bob(10_000).await;
    let (alice, bob) = (parties.alice.clone(), parties.bob.clone());
    let r = room(&app, &alice, "Lamu", "private").await;
    invite_and_join(&app, &alice, r, parties.bob_id, &bob).await;

    let said = ask(&app, &alice, r, "@mathia remind me to call John in 10 mins").await;
    assert!(said.contains("remind you to call John"), "{said}");
    // The reply shows in the chat model; the reminder it set is another model's.
    app.settle("reminders").await;
    let mine = app.get("/v1/reminders", Some(&alice)).await;
    let list = mine.body["items"].as_array().unwrap();
    assert_eq!(list.len(), 1, "{}", mine.body);
    assert_eq!(list[0]["content"], "call John");
    let theirs = app.get("/v1/reminders", Some(&bob)).await;
    assert_eq!(
        theirs.body["items"],
        json!([]),
        "made with Alice's authority only"
    );

    // A follow-up fills the missing time.
    let asked = ask(&app, &alice, r, "@mathia remind me to water the plants").await;
    assert!(asked.starts_with("When should I remind you"), "{asked}");
    let done = ask(&app, &alice, r, "@mathia in 2 hours").await;
    assert!(done.contains("water the plants"), "{done}");

    let balance = ask(&app, &alice, r, "@mathia what's my balance?").await;
    assert!(balance.contains("KES"), "{balance}");
    let converted = ask(&app, &alice, r, "@mathia convert 100 USD to KES").await;
    assert!(converted.contains("12925.00 KES"), "{converted}");

    // A trip, then an activity on it, both as Alice.
    let trip = ask(
        &app,
        &alice,
        r,
        "@mathia plan a trip to Lamu from 2026-12-20 to 2026-12-24",
    )
    .await;
    assert!(trip.contains("Created \"Trip to Lamu\""), "{trip}");
    app.settle("itinerary").await;
    let added = ask(
        &app,
        &alice,
        r,
        "@mathia add snorkelling to my trip to Lamu on the 21st at 10am",
    )
    .await;
    assert!(added.contains("Added \"snorkelling\""), "{added}");
    let items: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = 'ItemAdded'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(items, 1);

    // Money is only proposed.
    let debits = |app: &TestApp| {
        let pool = app.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM events WHERE event_type = 'Debited'")
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    let before = debits(&app).await;
    let proposal = ask(&app, &alice, r, "@mathia send 500 KES to bob").await;
    assert!(proposal.starts_with("I can't move money"), "{proposal}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(debits(&app).await, before);

    // The ninth request this hour is over the limit of eight.
    let limited = ask(&app, &alice, r, "@mathia help").await;
    assert!(limited.contains("the limit"), "{limited}");
    app.stop().await;
}

/// `POST /v1/chat/completions` with `stream: true`, as OpenAI-compatible servers answer it.
async fn completions(axum::Json(req): axum::Json<Value>) -> axum::response::Response {
    assert_eq!(req["stream"], true);
    assert_eq!(req["model"], "stub-model");
    let mut body = String::new();
    for delta in ["The team ", "agreed on ", "the 7 am ferry."] {
        let chunk = json!({"id": "c1", "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": {"content": delta}, "finish_reason": null}]});
        body.push_str(&format!("data: {chunk}\n\n"));
    }
    body.push_str("data: [DONE]\n\n");
    ([("content-type", "text/event-stream")], body).into_response()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_models_answer_streams_as_chunks_and_commits_one_message() {
    let stub = axum::Router::new().route("/v1/chat/completions", axum::routing::post(completions));
    let url = mathia_tests::serve_stub(stub).await;
    let app = TestApp::spawn_with(mathia::Roles::ALL, |c| {
        c.llm_url = Some(url);
        c.llm_model = "stub-model".into();
    })
    .await;
    let (_, alice) = app.user("alice@example.com").await;
    let (bob_id, bob) = app.user("bob@example.com").await;
    let r = room(&app, &alice, "Lamu", "private").await;
    invite_and_join(&app, &alice, r, bob_id, &bob).await;
    say(&app, &alice, r, "Shall we take the 7 am ferry?").await;
    say(&app, &bob, r, "Yes, 7 am works.").await;
    app.settle("chat").await;
    let mut ws = connect(&app, &bob).await;
    subscribe(&mut ws, "r", &format!("room:{r}"), None).await;

    let (asked, _) = say(&app, &alice, r, "@mathia summarise this room").await;
    let mut text = String::new();
    let mut seq = 0;
    loop {
        let c = next_of(&mut ws, "ai_stream_chunk").await;
        assert_eq!(c["seq"], seq, "in order");
        seq += 1;
        text.push_str(c["delta"].as_str().unwrap());
        if c["done"] == true {
            break;
        }
    }
    assert_eq!(text, "The team agreed on the 7 am ferry.");
    let answer = answer_to(&app, &bob, r, asked).await;
    assert_eq!(answer["body"], text, "only the final text is committed");
    let from_assistant: i64 =
        sqlx::query_scalar("SELECT count(*) FROM proj_chat_messages WHERE sender = $1::uuid")
            .bind(ASSISTANT)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(from_assistant, 1);
    let _ = id;
    app.stop().await;
}
