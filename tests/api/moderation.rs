//! Moderation and room notes through the HTTP API: batched screening by the
//! HTTP classifier (a local stub speaking the OpenAI moderation wire format)
//! and by the default word list, automatic mutes after three flags, reports,
//! moderator review, manual mutes, and notes sealed at rest.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use mathia_tests::TestApp;
use serde_json::{Value, json};
use uuid::Uuid;

use super::chat::{id, invite_and_join, room, say, send};

/// What the stub classifier saw: each batch's texts, in order.
#[derive(Clone, Default)]
struct Seen {
    batches: Arc<Mutex<Vec<Vec<String>>>>,
}

/// `POST /v1/moderations` as OpenAI-compatible servers answer it: one result
/// per input; a text containing "toxic" is flagged as harassment.
async fn moderations(
    State(seen): State<Seen>,
    headers: HeaderMap,
    Json(req): Json<Value>,
) -> (axum::http::StatusCode, Json<Value>) {
    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some("Bearer stub-key")
        || req["model"] != "stub-moderation"
    {
        return (
            axum::http::StatusCode::UNAUTHORIZED,
            Json(json!({"error": {"message": "bad key or model"}})),
        );
    }
    let texts: Vec<String> = req["input"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|t| t.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let results: Vec<Value> = texts
        .iter()
        .map(|t| {
            let bad = t.contains("toxic");
            json!({
                "flagged": bad,
                "categories": {"harassment": bad, "violence": false},
                "category_scores": {"harassment": if bad { 0.97 } else { 0.01 }, "violence": 0.002},
            })
        })
        .collect();
    seen.batches.lock().unwrap().push(texts);
    (
        axum::http::StatusCode::OK,
        Json(json!({"id": "modr-1", "model": "stub-moderation", "results": results})),
    )
}

async fn stub_classifier() -> (String, Seen) {
    let seen = Seen::default();
    let app = axum::Router::new()
        .route("/v1/moderations", axum::routing::post(moderations))
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, seen)
}

/// Poll `path` until `done` holds of its body (the screener works in the background).
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_classifier_screens_in_batches_and_three_flags_mute_the_sender() {
    let (url, seen) = stub_classifier().await;
    let app = TestApp::spawn_with(mathia::Roles::ALL, |c| {
        c.moderation_classifier = "http".into();
        c.moderation_url = Some(url);
        c.moderation_model = "stub-moderation".into();
        c.moderation_api_key = Some("stub-key".into());
        c.moderation_batch = 10;
        c.moderation_flush_ms = 1500;
        c.mute_after_flags = 3;
        c.mute_minutes = 30;
    })
    .await;
    let (_, alice) = app.user("alice@example.com").await;
    let (bob_id, bob) = app.user("bob@example.com").await;
    let (_, stranger) = app.user("eve@example.com").await;
    let r = room(&app, &alice, "Lamu", "private").await;
    invite_and_join(&app, &alice, r, bob_id, &bob).await;

    // 12 messages, three of them toxic: a full batch of 10, then 2 flushed by
    // time; the third toxic one is in the late batch.
    let mut toxic = vec![];
    for i in 0..12 {
        let text = if [1, 5, 11].contains(&i) {
            format!("you are toxic number {i}")
        } else {
            format!("see you at the jetty {i}")
        };
        let (m, _) = say(&app, &bob, r, &text).await;
        if text.contains("toxic") {
            toxic.push(m);
        }
    }
    let flags = format!("/v1/rooms/{r}/flags");
    let page = eventually(&app, &flags, &alice, |b| {
        b["items"].as_array().unwrap().len() == 3
    })
    .await;
    let mut flagged: Vec<Uuid> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| id(&f["message"]["message_id"]))
        .collect();
    flagged.sort();
    toxic.sort();
    assert_eq!(flagged, toxic);
    let first = &page["items"][0];
    assert_eq!(first["classifier_label"], "harassment");
    assert_eq!(first["classifier_score"], 0.97);
    assert_eq!(first["sender"], json!(bob_id));
    assert!(first["message"]["body"].as_str().unwrap().contains("toxic"));

    let batches = seen.batches.lock().unwrap().clone();
    let sizes: Vec<usize> = batches.iter().map(Vec::len).collect();
    assert_eq!(
        sizes,
        [10, 2],
        "batches of at most 10, the rest flushed by time"
    );
    let mut all: Vec<String> = batches.concat();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 12, "every message screened exactly once");

    // The third flag muted Bob: his next message is refused, with when it ends.
    let muted = send(&app, &bob, r, json!({"body": "hello?"})).await;
    muted.assert_problem(403, "muted");
    let until: chrono::DateTime<chrono::Utc> =
        serde_json::from_value(muted.body["muted_until"].clone()).expect("muted_until");
    let left = until - chrono::Utc::now();
    assert!(left > chrono::Duration::minutes(29) && left <= chrono::Duration::minutes(30));
    let mutes = app.get(&format!("/v1/rooms/{r}/mutes"), Some(&alice)).await;
    assert_eq!(mutes.body[0]["user_id"], json!(bob_id));
    assert_eq!(mutes.body[0]["reason"], "flags");

    // Only moderators review; strangers learn nothing.
    app.get(&flags, Some(&bob))
        .await
        .assert_problem(403, "forbidden");
    app.get(&flags, Some(&stranger))
        .await
        .assert_problem(404, "room_not_found");
    let events = app.count("events").await;
    app.call(
        "DELETE",
        &format!("{flags}/{}", toxic[0]),
        Some(&stranger),
        None,
        &[],
    )
    .await
    .assert_problem(404, "room_not_found");
    assert_eq!(app.count("events").await, events);

    // A moderator clears one flag after review, then lifts the mute.
    let r1 = app
        .call(
            "DELETE",
            &format!("{flags}/{}", toxic[0]),
            Some(&alice),
            None,
            &[],
        )
        .await;
    assert_eq!(r1.status, 200, "{}", r1.body);
    app.call(
        "DELETE",
        &format!("{flags}/{}", toxic[0]),
        Some(&alice),
        None,
        &[],
    )
    .await
    .assert_problem(404, "flag_not_found");
    let unmute = app
        .call(
            "DELETE",
            &format!("/v1/rooms/{r}/members/{bob_id}/mute"),
            Some(&alice),
            None,
            &[],
        )
        .await;
    assert_eq!(unmute.status, 200, "{}", unmute.body);
    say(&app, &bob, r, "sorry, all good now").await;
    let page = eventually(&app, &flags, &alice, |b| {
        b["items"].as_array().unwrap().len() == 2
    })
    .await;
    assert!(page["next"].is_null());
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reports_wait_for_a_moderator_and_the_word_list_screens_by_default() {
    let app = TestApp::spawn_with(mathia::Roles::ALL, |c| {
        c.moderation_flush_ms = 100;
    })
    .await;
    let (_, alice) = app.user("alice@example.com").await;
    let (bob_id, bob) = app.user("bob@example.com").await;
    let (carol_id, carol) = app.user("carol@example.com").await;
    let (dan_id, dan) = app.user("dan@example.com").await;
    let (_, stranger) = app.user("eve@example.com").await;
    let r = room(&app, &alice, "Lamu", "private").await;
    for (u, t) in [(bob_id, &bob), (carol_id, &carol), (dan_id, &dan)] {
        invite_and_join(&app, &alice, r, u, t).await;
    }
    let (m, _) = say(&app, &bob, r, "the ferry is at seven").await;
    let reports = format!("/v1/rooms/{r}/messages/{m}/reports");

    // Bad reports are refused and write nothing.
    let events = app.count("events").await;
    app.post(&reports, Some(&carol), &json!({"reason": "ugly"}), &[])
        .await
        .assert_problem(422, "invalid_input");
    app.post(&reports, Some(&bob), &json!({"reason": "spam"}), &[])
        .await
        .assert_problem(422, "own_message");
    app.post(&reports, Some(&stranger), &json!({"reason": "spam"}), &[])
        .await
        .assert_problem(404, "room_not_found");
    app.post(
        &format!("/v1/rooms/{r}/messages/{}/reports", Uuid::now_v7()),
        Some(&carol),
        &json!({"reason": "spam"}),
        &[],
    )
    .await
    .assert_problem(404, "message_not_found");
    assert_eq!(app.count("events").await, events);

    // Three reports are three reasons for review, not a mute.
    for (t, reason) in [(&carol, "spam"), (&dan, "harassment"), (&alice, "other")] {
        let rep = app
            .post(&reports, Some(t), &json!({"reason": reason}), &[])
            .await;
        assert_eq!(rep.status, 201, "{}", rep.body);
    }
    app.post(&reports, Some(&carol), &json!({"reason": "spam"}), &[])
        .await
        .assert_problem(409, "already_reported");
    let flags = format!("/v1/rooms/{r}/flags");
    let page = eventually(&app, &flags, &alice, |b| b["items"][0]["reports"] == 3).await;
    assert_eq!(
        page["items"][0]["report_reasons"],
        json!(["spam", "harassment", "other"])
    );
    assert!(page["items"][0]["classifier_label"].is_null());
    say(&app, &bob, r, "still allowed to talk").await;

    // The default word list flags a scam without any outside service.
    let (scam, _) = say(&app, &dan, r, "Join my CASINO for free money").await;
    let page = eventually(&app, &format!("{flags}?source=classifier"), &alice, |b| {
        b["items"].as_array().unwrap().len() == 1
    })
    .await;
    assert_eq!(page["items"][0]["message"]["message_id"], json!(scam));
    assert_eq!(page["items"][0]["classifier_label"], "spam");
    app.get(&format!("{flags}?source=nope"), Some(&alice))
        .await
        .assert_problem(422, "invalid_input");

    // Paging: one flag per page, then the end.
    let p1 = app.get(&format!("{flags}?limit=1"), Some(&alice)).await;
    assert_eq!(p1.body["items"][0]["message"]["message_id"], json!(scam));
    let next = p1.body["next"].as_str().expect("a next page").to_owned();
    let p2 = app
        .get(&format!("{flags}?limit=1&cursor={next}"), Some(&alice))
        .await;
    assert_eq!(p2.body["items"][0]["message"]["message_id"], json!(m));
    assert!(p2.body["next"].is_null());

    // Manual mutes: moderators only, over lower roles, for a bounded time.
    let mute = |who: Uuid| format!("/v1/rooms/{r}/members/{who}/mute");
    app.call(
        "PUT",
        &mute(dan_id),
        Some(&carol),
        Some(&json!({"minutes": 5})),
        &[],
    )
    .await
    .assert_problem(403, "forbidden");
    app.call(
        "PUT",
        &mute(dan_id),
        Some(&alice),
        Some(&json!({"minutes": 0})),
        &[],
    )
    .await
    .assert_problem(422, "invalid_input");
    let ok = app
        .call(
            "PUT",
            &mute(dan_id),
            Some(&alice),
            Some(&json!({"minutes": 5})),
            &[],
        )
        .await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    send(&app, &dan, r, json!({"body": "can I talk?"}))
        .await
        .assert_problem(403, "muted");

    // Operators see every room's flags; others may not.
    app.get("/v1/admin/flags", Some(&alice))
        .await
        .assert_problem(403, "forbidden");
    let (_, admin) = app.admin().await;
    let all = app.get("/v1/admin/flags", Some(&admin)).await;
    assert_eq!(all.status, 200, "{}", all.body);
    assert_eq!(all.body["items"].as_array().unwrap().len(), 2);

    // An edit is screened like a post: harmless first, a scam after the edit.
    let (sly, _) = say(&app, &carol, r, "what a view from the dhow").await;
    let edited = app
        .call(
            "PATCH",
            &format!("/v1/rooms/{r}/messages/{sly}"),
            Some(&carol),
            Some(&json!({"body": "what a view, now visit my casino"})),
            &[],
        )
        .await;
    assert_eq!(edited.status, 200, "{}", edited.body);
    let page = eventually(&app, &format!("{flags}?source=classifier"), &alice, |b| {
        b["items"].as_array().unwrap().len() == 2
    })
    .await;
    assert_eq!(page["items"][0]["message"]["message_id"], json!(sly));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn notes_are_sealed_and_high_priority_ones_follow_their_author() {
    let app = TestApp::spawn().await;
    let (_, alice) = app.user("alice@example.com").await;
    let (bob_id, bob) = app.user("bob@example.com").await;
    let (_, stranger) = app.user("eve@example.com").await;
    let lamu = room(&app, &alice, "Lamu", "private").await;
    let work = room(&app, &alice, "Work", "private").await;
    invite_and_join(&app, &alice, lamu, bob_id, &bob).await;
    invite_and_join(&app, &alice, work, bob_id, &bob).await;

    let pin = |room: Uuid, token: &str, body: Value| {
        let path = format!("/v1/rooms/{room}/notes");
        let token = token.to_owned();
        let app = &app;
        async move { app.post(&path, Some(&token), &body, &[]).await }
    };
    let secret = "Ferry from Mokowe at seven, jetty fee in cash";
    let high = pin(lamu, &alice, json!({"body": secret, "priority": "high"})).await;
    assert_eq!(high.status, 201, "{}", high.body);
    let high_id = id(&high.body["note_id"]);
    let normal = pin(lamu, &bob, json!({"body": "bring sunscreen"})).await;
    assert_eq!(normal.status, 201, "{}", normal.body);
    let normal_id = id(&normal.body["note_id"]);
    let bad = pin(lamu, &alice, json!({"body": "x".repeat(4097)})).await;
    bad.assert_problem(422, "invalid_input");
    pin(lamu, &alice, json!({"body": "ok", "priority": "urgent"}))
        .await
        .assert_problem(400, "malformed_request");
    let events = app.count("events").await;
    pin(lamu, &stranger, json!({"body": "let me in"}))
        .await
        .assert_problem(404, "room_not_found");
    assert_eq!(app.count("events").await, events);
    app.settle("chat").await;

    // In its own room, the note shows to every member, high priority first.
    let notes = app
        .get(&format!("/v1/rooms/{lamu}/notes"), Some(&bob))
        .await;
    assert_eq!(notes.status, 200, "{}", notes.body);
    let items = notes.body["items"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    assert_eq!(items[0]["note_id"], json!(high_id));
    assert_eq!(items[0]["body"], secret);
    assert_eq!(items[0]["from_other_room"], false);
    assert_eq!(items[1]["body"], "bring sunscreen");
    // In the author's other rooms, only to the author.
    let mine = app
        .get(&format!("/v1/rooms/{work}/notes"), Some(&alice))
        .await;
    assert_eq!(mine.body["items"].as_array().unwrap().len(), 1);
    assert_eq!(mine.body["items"][0]["note_id"], json!(high_id));
    assert_eq!(mine.body["items"][0]["from_other_room"], true);
    assert_eq!(mine.body["items"][0]["room_id"], json!(lamu));
    let theirs = app
        .get(&format!("/v1/rooms/{work}/notes"), Some(&bob))
        .await;
    assert_eq!(theirs.body["items"], json!([]));
    app.get(&format!("/v1/rooms/{lamu}/notes"), Some(&stranger))
        .await
        .assert_problem(404, "room_not_found");

    // Nothing rests in clear.
    let clear: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE payload::text LIKE '%Mokowe%'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    let clear_rm: i64 =
        sqlx::query_scalar("SELECT count(*) FROM proj_chat_notes WHERE body::text LIKE '%Mokowe%'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!((clear, clear_rm), (0, 0));

    // Edits: the author or a moderator; another member may not.
    let edit = |note: Uuid| format!("/v1/rooms/{lamu}/notes/{note}");
    app.call(
        "PATCH",
        &edit(high_id),
        Some(&bob),
        Some(&json!({"body": "mine now"})),
        &[],
    )
    .await
    .assert_problem(403, "forbidden");
    let e = app
        .call(
            "PATCH",
            &edit(normal_id),
            Some(&alice),
            Some(&json!({"body": "bring SPF 50", "priority": "low"})),
            &[],
        )
        .await;
    assert_eq!(e.status, 200, "{}", e.body);
    app.call(
        "PATCH",
        &edit(Uuid::now_v7()),
        Some(&alice),
        Some(&json!({"body": "?"})),
        &[],
    )
    .await
    .assert_problem(404, "note_not_found");
    app.call(
        "PATCH",
        &edit(high_id),
        Some(&stranger),
        Some(&json!({"body": "?"})),
        &[],
    )
    .await
    .assert_problem(404, "room_not_found");
    app.settle("chat").await;
    let notes = app
        .get(&format!("/v1/rooms/{lamu}/notes"), Some(&bob))
        .await;
    assert_eq!(notes.body["items"][1]["body"], "bring SPF 50");
    assert_eq!(notes.body["items"][1]["priority"], "low");

    // Unpinning destroys the note's key: the sealed text in the log opens for no one.
    let keys_before = app.count("chat_message_keys").await;
    let u = app
        .call("DELETE", &edit(high_id), Some(&alice), None, &[])
        .await;
    assert_eq!(u.status, 200, "{}", u.body);
    assert_eq!(app.count("chat_message_keys").await, keys_before - 1);
    let left: i64 =
        sqlx::query_scalar("SELECT count(*) FROM chat_message_keys WHERE message_id = $1")
            .bind(high_id)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(left, 0);
    app.settle("chat").await;
    let mine = app
        .get(&format!("/v1/rooms/{work}/notes"), Some(&alice))
        .await;
    assert_eq!(mine.body["items"], json!([]));
    app.stop().await;
}
