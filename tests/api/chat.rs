//! Chat through the HTTP API: private existence, membership, messages sealed at
//! rest with crypto-shredding, timeline paging, threads, unread counts against
//! a recount, blind-index search, rebuild identity, quotas.

use std::collections::HashMap;
use std::sync::Arc;

use async_nats::jetstream;
use base64::Engine as _;
use mathia_tests::{Reply, TestApp, only};
use rand::{RngExt, SeedableRng};
use serde_json::{Value, json};
use uuid::Uuid;

pub(crate) fn id(v: &Value) -> Uuid {
    v.as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not a uuid: {v}"))
}

pub(crate) async fn room(app: &TestApp, token: &str, name: &str, visibility: &str) -> Uuid {
    let r = app
        .post(
            "/v1/rooms",
            Some(token),
            &json!({"name": name, "visibility": visibility}),
            &[],
        )
        .await;
    assert_eq!(r.status, 201, "create room: {}", r.body);
    id(&r.body["room_id"])
}

pub(crate) async fn send(app: &TestApp, token: &str, room: Uuid, body: Value) -> Reply {
    app.post(
        &format!("/v1/rooms/{room}/messages"),
        Some(token),
        &body,
        &[],
    )
    .await
}

pub(crate) async fn say(app: &TestApp, token: &str, room: Uuid, text: &str) -> (Uuid, i64) {
    let r = send(app, token, room, json!({"body": text})).await;
    assert_eq!(r.status, 201, "send: {}", r.body);
    (
        id(&r.body["message_id"]),
        r.body["position"].as_i64().unwrap(),
    )
}

pub(crate) async fn invite_and_join(
    app: &TestApp,
    owner: &str,
    room: Uuid,
    user: Uuid,
    token: &str,
) {
    let r = app
        .post(
            &format!("/v1/rooms/{room}/invites"),
            Some(owner),
            &json!({"user_id": user}),
            &[],
        )
        .await;
    assert_eq!(r.status, 201, "invite: {}", r.body);
    let r = app
        .post(
            &format!("/v1/rooms/{room}/join"),
            Some(token),
            &json!({}),
            &[],
        )
        .await;
    assert_eq!(r.status, 200, "join: {}", r.body);
}

async fn events_count(app: &TestApp) -> i64 {
    app.count("events").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stranger_gets_404_on_every_room_endpoint_and_writes_nothing() {
    let app = TestApp::spawn().await;
    let (_, alice) = app.user("alice@test.local").await;
    let (bob_id, bob) = app.user("bob@test.local").await;
    let (_, eve) = app.user("eve@test.local").await;
    let r = room(&app, &alice, "Plans", "private").await;
    invite_and_join(&app, &alice, r, bob_id, &bob).await;
    let (m, _) = say(&app, &bob, r, "hello alice").await;
    app.settle("chat").await;

    let before = events_count(&app).await;
    let never = Uuid::now_v7();
    for room_id in [r, never] {
        let paths_get = [
            format!("/v1/rooms/{room_id}"),
            format!("/v1/rooms/{room_id}/messages"),
            format!("/v1/rooms/{room_id}/members"),
            format!("/v1/rooms/{room_id}/threads"),
            format!("/v1/rooms/{room_id}/messages/{m}"),
            format!("/v1/rooms/{room_id}/messages/{m}/history"),
            format!("/v1/search/messages?q=hello&room_id={room_id}"),
        ];
        // A page with an anchor or a cursor is refused as the room, before the
        // anchor is looked up: a stranger never learns that `m` exists.
        let cursor = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode("t1:b:1000");
        let pages = [
            format!("/v1/rooms/{room_id}/messages?from_message={m}"),
            format!("/v1/rooms/{room_id}/messages?from_message={m}&dir=forward"),
            format!("/v1/rooms/{room_id}/messages?at=2020-01-01T00:00:00Z"),
            format!("/v1/rooms/{room_id}/messages?at=2020-01-01T00:00:00Z&dir=forward"),
            format!("/v1/rooms/{room_id}/messages?cursor={cursor}"),
            format!("/v1/rooms/{room_id}/messages?dir=forward"),
        ];
        for p in paths_get.iter().chain(&pages) {
            app.get(p, Some(&eve))
                .await
                .assert_problem(404, "room_not_found");
        }
        let writes: Vec<(&str, String, Value)> = vec![
            (
                "POST",
                format!("/v1/rooms/{room_id}/messages"),
                json!({"body": "hi"}),
            ),
            (
                "PATCH",
                format!("/v1/rooms/{room_id}"),
                json!({"name": "mine"}),
            ),
            ("POST", format!("/v1/rooms/{room_id}/join"), json!({})),
            ("POST", format!("/v1/rooms/{room_id}/leave"), json!({})),
            (
                "POST",
                format!("/v1/rooms/{room_id}/invites"),
                json!({"user_id": bob_id}),
            ),
            ("POST", format!("/v1/rooms/{room_id}/archive"), json!({})),
            ("DELETE", format!("/v1/rooms/{room_id}"), json!({})),
            (
                "DELETE",
                format!("/v1/rooms/{room_id}/messages/{m}"),
                json!({}),
            ),
            (
                "PATCH",
                format!("/v1/rooms/{room_id}/messages/{m}"),
                json!({"body": "x"}),
            ),
            (
                "PUT",
                format!("/v1/rooms/{room_id}/messages/{m}/reactions/ok"),
                json!({}),
            ),
            (
                "POST",
                format!("/v1/rooms/{room_id}/receipts"),
                json!({"message_id": m}),
            ),
            (
                "POST",
                format!("/v1/rooms/{room_id}/members/{bob_id}/kick"),
                json!({}),
            ),
        ];
        for (method, path, body) in &writes {
            let reply = app.call(method, path, Some(&eve), Some(body), &[]).await;
            assert_eq!(reply.status, 404, "{method} {path}: {}", reply.body);
            let code = reply.body["code"].as_str().unwrap_or_default();
            assert!(
                code == "room_not_found" || code == "message_not_found",
                "{method} {path}: {}",
                reply.body
            );
        }
    }
    assert_eq!(
        events_count(&app).await,
        before,
        "a stranger wrote something"
    );
    // The members see it all.
    let page = app
        .get(&format!("/v1/rooms/{r}/messages"), Some(&alice))
        .await;
    assert_eq!(page.body["items"][0]["body"], "hello alice");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn membership_roles_edits_reactions_and_email_invites() {
    let app = TestApp::spawn().await;
    let (alice_id, alice) = app.user("alice@test.local").await;
    let (bob_id, bob) = app.user("bob@test.local").await;
    let r = room(&app, &alice, "Ops", "private").await;
    // A member cannot invite into a private room; a moderator can.
    invite_and_join(&app, &alice, r, bob_id, &bob).await;
    let r2 = app
        .post(
            &format!("/v1/rooms/{r}/invites"),
            Some(&bob),
            &json!({"email": "carol@test.local"}),
            &[],
        )
        .await;
    r2.assert_problem(403, "forbidden");
    let set = app
        .call(
            "PUT",
            &format!("/v1/rooms/{r}/members/{bob_id}/role"),
            Some(&alice),
            Some(&json!({"role": "moderator"})),
            &[],
        )
        .await;
    assert_eq!(set.status, 200, "{}", set.body);
    // An address with no account yet; whoever registers it sees the invitation and joins.
    let inv = app
        .post(
            &format!("/v1/rooms/{r}/invites"),
            Some(&bob),
            &json!({"email": "Carol@Test.local"}),
            &[],
        )
        .await;
    assert_eq!(inv.status, 201, "{}", inv.body);
    let (carol_id, carol) = app.user("carol@test.local").await;
    app.settle("chat").await;
    let invites = app.get("/v1/invites", Some(&carol)).await;
    assert_eq!(
        invites.body["items"][0]["room_id"],
        r.to_string(),
        "{}",
        invites.body
    );
    let j = app
        .post(
            &format!("/v1/rooms/{r}/join"),
            Some(&carol),
            &json!({}),
            &[],
        )
        .await;
    assert_eq!(j.status, 200, "{}", j.body);

    // Edits keep their history; only the sender edits.
    let (m, _) = say(&app, &carol, r, "meet at 5").await;
    let e = app
        .call(
            "PATCH",
            &format!("/v1/rooms/{r}/messages/{m}"),
            Some(&bob),
            Some(&json!({"body": "meet at 6"})),
            &[],
        )
        .await;
    e.assert_problem(403, "forbidden");
    let e = app
        .call(
            "PATCH",
            &format!("/v1/rooms/{r}/messages/{m}"),
            Some(&carol),
            Some(&json!({"body": "meet at 6"})),
            &[],
        )
        .await;
    assert_eq!(e.status, 200, "{}", e.body);
    let react = app
        .call(
            "PUT",
            &format!("/v1/rooms/{r}/messages/{m}/reactions/%F0%9F%91%8D"),
            Some(&alice),
            None,
            &[],
        )
        .await;
    assert_eq!(react.status, 200, "{}", react.body);
    app.call(
        "PUT",
        &format!("/v1/rooms/{r}/messages/{m}/reactions/%F0%9F%91%8D"),
        Some(&alice),
        None,
        &[],
    )
    .await
    .assert_problem(409, "already_reacted");
    app.settle("chat").await;
    let h = app
        .get(&format!("/v1/rooms/{r}/messages/{m}/history"), Some(&alice))
        .await;
    assert_eq!(h.body["message"]["body"], "meet at 6", "{}", h.body);
    assert_eq!(h.body["message"]["edits"], 1);
    assert_eq!(h.body["versions"][0]["body"], "meet at 5");
    assert_eq!(
        h.body["message"]["reactions"]["👍"][0],
        alice_id.to_string()
    );

    // The moderator kicks carol; she loses access at once.
    let k = app
        .post(
            &format!("/v1/rooms/{r}/members/{carol_id}/kick"),
            Some(&bob),
            &json!({}),
            &[],
        )
        .await;
    assert_eq!(k.status, 200, "{}", k.body);
    send(&app, &carol, r, json!({"body": "still here?"}))
        .await
        .assert_problem(404, "room_not_found");
    // A moderator cannot kick the owner.
    app.post(
        &format!("/v1/rooms/{r}/members/{alice_id}/kick"),
        Some(&bob),
        &json!({}),
        &[],
    )
    .await
    .assert_problem(403, "forbidden");
    // Archived: read-only.
    let a = app
        .post(
            &format!("/v1/rooms/{r}/archive"),
            Some(&alice),
            &json!({}),
            &[],
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.body);
    send(&app, &bob, r, json!({"body": "late"}))
        .await
        .assert_problem(409, "room_archived");
    app.stop().await;
}

/// Every row of every table, as text, where `needle` appears.
async fn rows_containing(app: &TestApp, needle: &str) -> Vec<String> {
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT quote_ident(table_name) FROM information_schema.tables WHERE table_schema = 'public' AND table_type = 'BASE TABLE'",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    let mut found = vec![];
    for t in tables {
        let hits: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT x::text FROM {t} x WHERE x::text ILIKE '%' || $1 || '%'"
        )))
        .bind(needle)
        .fetch_all(&app.pool)
        .await
        .unwrap();
        found.extend(hits.into_iter().map(|h| format!("{t}: {h}")));
    }
    found
}

/// Every message payload on the test's EVENTS stream, as text.
async fn events_stream_payloads(app: &TestApp) -> Vec<String> {
    let js = jetstream::new(app.nats.clone());
    let mut stream = js.get_stream(app.subjects.events_stream()).await.unwrap();
    let last = stream.info().await.unwrap().state.last_sequence;
    let mut out = vec![];
    for seq in 1..=last {
        if let Ok(m) = stream.get_raw_message(seq).await {
            out.push(String::from_utf8_lossy(&m.payload).into_owned());
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn plaintext_never_rests_and_redaction_or_deletion_destroys_the_keys() {
    let app = TestApp::spawn().await;
    let (bob_id, bob) = app.user("bob@test.local").await;
    let (_, alice) = app.user("alice@test.local").await;
    let r = room(&app, &alice, "Secrets", "private").await;
    invite_and_join(&app, &alice, r, bob_id, &bob).await;
    let secret = "xylophone quagmire 4471";
    let (m, _) = say(&app, &alice, r, secret).await;
    let (kept, _) = say(&app, &bob, r, "unrelated marmalade").await;
    let e = app
        .call(
            "PATCH",
            &format!("/v1/rooms/{r}/messages/{m}"),
            Some(&alice),
            Some(&json!({"body": "xylophone quagmire edited"})),
            &[],
        )
        .await;
    assert_eq!(e.status, 200);
    app.settle("chat").await;
    // Searchable and readable while it lives…
    let s = app
        .get("/v1/search/messages?q=xylo%20quag", Some(&bob))
        .await;
    assert_eq!(s.body["items"].as_array().unwrap().len(), 1, "{}", s.body);
    // …but no table and no EVENTS message holds the text, only ciphertext.
    for needle in ["xylophone", "quagmire", "marmalade"] {
        assert_eq!(rows_containing(&app, needle).await, Vec::<String>::new());
        assert!(
            !events_stream_payloads(&app)
                .await
                .iter()
                .any(|p| p.contains(needle))
        );
    }
    // Redaction destroys the message key: its versions are gone for everyone.
    let d = app
        .call(
            "DELETE",
            &format!("/v1/rooms/{r}/messages/{m}"),
            Some(&alice),
            None,
            &[],
        )
        .await;
    assert_eq!(d.status, 200, "{}", d.body);
    app.settle("chat").await;
    let keys: i64 =
        sqlx::query_scalar("SELECT count(*) FROM chat_message_keys WHERE message_id = $1")
            .bind(m)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(keys, 0, "the redacted message's key survived");
    // Its blind index goes with it: no token is left to link it to a word.
    let tokens: Option<Vec<i64>> =
        sqlx::query_scalar("SELECT search_tokens FROM proj_chat_messages WHERE message_id = $1")
            .bind(m)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(tokens, None, "the redacted message kept its index tokens");
    let h = app
        .get(&format!("/v1/rooms/{r}/messages/{m}/history"), Some(&bob))
        .await;
    assert!(
        h.body["message"]["body"].is_null() && h.body["versions"].as_array().unwrap().is_empty(),
        "{}",
        h.body
    );
    let s = app.get("/v1/search/messages?q=xylophone", Some(&bob)).await;
    assert!(s.body["items"].as_array().unwrap().is_empty(), "{}", s.body);
    // The sealed bodies are still in the log, and nothing left in the system opens them.
    let keystore = handlers::keystore::Keystore::new(master_key(&app));
    let mut conn = app.pool.acquire().await.unwrap();
    let opened = keystore.message_keys(&mut conn, &[m, kept]).await.unwrap();
    assert!(!opened.contains_key(&m) && opened.contains_key(&kept));
    // Deleting the room destroys every key it had.
    let d = app
        .call("DELETE", &format!("/v1/rooms/{r}"), Some(&alice), None, &[])
        .await;
    assert_eq!(d.status, 200, "{}", d.body);
    let left: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM chat_room_keys WHERE room_id = $1) + (SELECT count(*) FROM chat_message_keys WHERE room_id = $1)",
    )
    .bind(r)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(left, 0);
    assert!(
        keystore
            .message_keys(&mut conn, &[kept])
            .await
            .unwrap()
            .is_empty()
    );
    drop(conn);
    app.settle("chat").await;
    app.get(&format!("/v1/rooms/{r}/messages"), Some(&bob))
        .await
        .assert_problem(404, "room_not_found");
    let sealed_events: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = 'MessagePosted'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(sealed_events, 2, "the log stays append-only");
    app.stop().await;
}

fn master_key(app: &TestApp) -> commands::crypto::Key {
    let b = base64::engine::general_purpose::STANDARD
        .decode(app.config.master_key.as_deref().unwrap())
        .unwrap();
    commands::crypto::Key::from_slice(&b).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn what_a_caller_just_wrote_is_found_at_once_without_after_position() {
    // The projectors run apart, so the test can hold the read models back.
    let app = TestApp::spawn_with(only(true, true, true, false), |_| {}).await;
    let projectors = app.start(only(false, false, false, true));
    let (_, alice) = app.user("alice@test.local").await;
    let (_, bob) = app.user("bob@test.local").await;
    let (_, eve) = app.user("eve@test.local").await;
    app.settle("chat").await;
    app.crash(projectors).await;
    // Answered by the handlers; the chat model applies neither yet.
    let r = room(&app, &alice, "Fresh", "public").await;
    let join = app
        .post(&format!("/v1/rooms/{r}/join"), Some(&bob), &json!({}), &[])
        .await;
    assert_eq!(join.status, 200, "join: {}", join.body);
    let applied: i64 =
        sqlx::query_scalar("SELECT count(*) FROM proj_chat_rooms WHERE room_id = $1")
            .bind(r)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(applied, 0, "the chat model is held back");
    let wallet = app.funded_wallet(&alice, "", 0).await; // opened, nothing deposited
    let (message, _) = say(&app, &alice, r, "first!").await;
    let trip = app
        .post(
            "/v1/itineraries",
            Some(&alice),
            &json!({"title": "Lamu", "region": "KE", "start_date": "2027-01-02",
                    "end_date": "2027-01-05", "zone": "Africa/Nairobi"}),
            &[],
        )
        .await;
    assert_eq!(trip.status, 201, "create itinerary: {}", trip.body);
    let trip = id(&trip.body["itinerary_id"]);
    let reminder = app
        .post(
            "/v1/reminders",
            Some(&alice),
            &json!({"content": "pack", "in": "10m"}),
            &[],
        )
        .await;
    assert_eq!(reminder.status, 201, "set reminder: {}", reminder.body);
    let reminder = id(&reminder.body["reminder_id"]);
    let hook = app
        .post(
            "/v1/webhooks",
            Some(&alice),
            &json!({"url": "http://127.0.0.1:9/hook", "filter": ["reminder.*"]}),
            &[],
        )
        .await;
    assert_eq!(hook.status, 201, "register webhook: {}", hook.body);
    let hook = id(&hook.body["webhook_id"]);

    // Reads without `after_position`, as a client right after its writes: the
    // room's pages (latest, anchored on a date and on the message just sent),
    // the room, its members, the message, the wallet, the trip, the reminder.
    let answered = std::sync::atomic::AtomicUsize::new(0);
    let read = |token: &str, path: String| {
        let answered = &answered;
        let app = &app;
        let token = token.to_owned();
        async move {
            let reply = app.get(&path, Some(&token)).await;
            answered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            (path, reply)
        }
    };
    let reads = futures::future::join_all([
        read(&alice, format!("/v1/rooms/{r}/messages")),
        read(
            &alice,
            format!("/v1/rooms/{r}/messages?at=2020-01-01T00:00:00Z&dir=forward"),
        ),
        read(&alice, format!("/v1/rooms/{r}")),
        read(&alice, format!("/v1/rooms/{r}/members")),
        read(&bob, format!("/v1/rooms/{r}/messages?dir=forward")),
        read(&alice, format!("/v1/wallets/{wallet}")),
        read(&alice, format!("/v1/wallets/{wallet}/entries")),
        read(&alice, format!("/v1/rooms/{r}/messages/{message}")),
        read(
            &bob,
            format!("/v1/rooms/{r}/messages?from_message={message}"),
        ),
        read(&alice, format!("/v1/itineraries/{trip}")),
        read(&alice, format!("/v1/reminders/{reminder}")),
        read(&alice, format!("/v1/webhooks/{hook}")),
        read(&alice, format!("/v1/webhooks/{hook}/deliveries")),
    ]);
    let release = async {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        let early = answered.load(std::sync::atomic::Ordering::SeqCst);
        app.start(only(false, false, false, true));
        early
    };
    let (replies, early) = tokio::join!(reads, release);
    assert_eq!(
        early, 0,
        "no read answered before the models had the writes"
    );
    for (path, reply) in replies {
        assert_eq!(reply.status, 200, "{path}: {}", reply.body);
    }
    // A stranger still learns nothing.
    let stranger = app
        .get(&format!("/v1/rooms/{r}/messages"), Some(&eve))
        .await;
    stranger.assert_problem(404, "room_not_found");
    for path in [
        format!("/v1/wallets/{wallet}"),
        format!("/v1/itineraries/{trip}"),
        format!("/v1/reminders/{reminder}"),
        format!("/v1/webhooks/{hook}"),
    ] {
        let stranger = app.get(&path, Some(&eve)).await;
        assert_eq!(stranger.status, 404, "{path}: {}", stranger.body);
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_timeline_pages_both_ways_with_explicit_ends_and_jumps_to_a_date() {
    let app = TestApp::spawn().await;
    let (_, alice) = app.user("alice@test.local").await;
    let created = app
        .post(
            "/v1/rooms",
            Some(&alice),
            &json!({"name": "Log", "visibility": "public"}),
            &[],
        )
        .await;
    assert_eq!(created.status, 201, "create room: {}", created.body);
    let r = id(&created.body["room_id"]);
    let made_at = created.body["position"].as_i64().unwrap();
    // A member's page of an empty room: no items, both ends, no cursor. It
    // reads its own write: right after the create the read model may not yet
    // hold the membership, and without `after_position` the room would be
    // "not found" to its owner for a moment.
    for query in ["", "&dir=forward"] {
        let empty = app
            .get(
                &format!("/v1/rooms/{r}/messages?after_position={made_at}{query}"),
                Some(&alice),
            )
            .await;
        assert_eq!(empty.status, 200, "{}", empty.body);
        assert_eq!(empty.body["items"], json!([]), "{}", empty.body);
        assert_eq!(
            (&empty.body["start_reached"], &empty.body["end_reached"]),
            (&json!(true), &json!(true)),
            "{}",
            empty.body
        );
        assert!(empty.body["prev"].is_null() && empty.body["next"].is_null());
    }
    let mut ids = vec![];
    for i in 0..7 {
        ids.push(say(&app, &alice, r, &format!("message {i}")).await.0);
        if i == 3 {
            tokio::time::sleep(std::time::Duration::from_millis(30)).await;
        }
    }
    app.settle("chat").await;
    let bodies = |p: &Reply| -> Vec<String> {
        p.body["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["body"].as_str().unwrap().to_owned())
            .collect()
    };
    let base = format!("/v1/rooms/{r}/messages");
    let p1 = app.get(&format!("{base}?limit=3"), Some(&alice)).await;
    assert_eq!(bodies(&p1), ["message 4", "message 5", "message 6"]);
    assert_eq!(
        (
            p1.body["start_reached"].as_bool(),
            p1.body["end_reached"].as_bool()
        ),
        (Some(false), Some(true))
    );
    assert!(p1.body["next"].is_null());
    let p2 = app
        .get(
            &format!(
                "{base}?limit=3&cursor={}",
                p1.body["prev"].as_str().unwrap()
            ),
            Some(&alice),
        )
        .await;
    assert_eq!(bodies(&p2), ["message 1", "message 2", "message 3"]);
    assert_eq!(
        (
            p2.body["start_reached"].as_bool(),
            p2.body["end_reached"].as_bool()
        ),
        (Some(false), Some(false)),
        "a page from a cursor has messages on both sides"
    );
    let p3 = app
        .get(
            &format!(
                "{base}?limit=3&cursor={}",
                p2.body["prev"].as_str().unwrap()
            ),
            Some(&alice),
        )
        .await;
    assert_eq!(bodies(&p3), ["message 0"]);
    assert_eq!(p3.body["start_reached"], true);
    assert!(p3.body["prev"].is_null());
    // Forward from the newer cursor of the oldest page.
    let f = app
        .get(
            &format!(
                "{base}?limit=3&cursor={}",
                p3.body["next"].as_str().unwrap()
            ),
            Some(&alice),
        )
        .await;
    assert_eq!(bodies(&f), ["message 1", "message 2", "message 3"]);
    assert_eq!(
        (
            f.body["start_reached"].as_bool(),
            f.body["end_reached"].as_bool()
        ),
        (Some(false), Some(false)),
        "message 0 lies before a forward page from the oldest page's cursor"
    );
    // From any message, either way, including it.
    let fm = app
        .get(
            &format!("{base}?limit=2&from_message={}&dir=forward", ids[5]),
            Some(&alice),
        )
        .await;
    assert_eq!(bodies(&fm), ["message 5", "message 6"]);
    assert_eq!(fm.body["end_reached"], true);
    assert_eq!(
        fm.body["start_reached"], false,
        "messages 0–4 lie before it"
    );
    let bm = app
        .get(
            &format!("{base}?limit=2&from_message={}", ids[5]),
            Some(&alice),
        )
        .await;
    assert_eq!(bodies(&bm), ["message 4", "message 5"]);
    assert_eq!(
        (
            bm.body["start_reached"].as_bool(),
            bm.body["end_reached"].as_bool()
        ),
        (Some(false), Some(false)),
        "message 6 lies after a backward page that includes message 5"
    );
    // Jump to a date: the first message sent at or after it.
    let t: String = sqlx::query_scalar("SELECT to_char(sent_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') FROM proj_chat_messages WHERE message_id = $1")
        .bind(ids[4])
        .fetch_one(&app.pool)
        .await
        .unwrap();
    let j = app
        .get(&format!("{base}?limit=2&at={t}&dir=forward"), Some(&alice))
        .await;
    assert_eq!(bodies(&j), ["message 4", "message 5"], "{}", j.body);
    assert_eq!(
        (
            j.body["start_reached"].as_bool(),
            j.body["end_reached"].as_bool()
        ),
        (Some(false), Some(false))
    );
    // Bad paging input is a problem, never a 500.
    app.get(&format!("{base}?cursor=bm9wZQ"), Some(&alice))
        .await
        .assert_problem(400, "malformed_request");
    app.get(&format!("{base}?limit=0"), Some(&alice))
        .await
        .assert_problem(422, "invalid_input");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unread_and_mention_counts_equal_a_recount_after_a_random_mix() {
    let app = TestApp::spawn().await;
    let (alice_id, alice) = app.user("alice@test.local").await;
    let (bob_id, bob) = app.user("bob@test.local").await;
    let (carol_id, carol) = app.user("carol@test.local").await;
    let r = room(&app, &alice, "Busy", "public").await;
    for t in [&bob, &carol] {
        assert_eq!(
            app.post(&format!("/v1/rooms/{r}/join"), Some(t), &json!({}), &[])
                .await
                .status,
            200
        );
    }
    let users = [
        (alice_id, alice.clone()),
        (bob_id, bob.clone()),
        (carol_id, carol.clone()),
    ];
    // The model: (id, timeline root or nil, sender, position, mentions, redacted).
    struct M {
        id: Uuid,
        thread: Uuid,
        sender: Uuid,
        pos: i64,
        mentions: Vec<Uuid>,
        redacted: bool,
    }
    let mut msgs: Vec<M> = vec![];
    let mut read: HashMap<(Uuid, Uuid), i64> = HashMap::new();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x6d61_7468);
    for _ in 0..70 {
        let (who, token) = &users[rng.random_range(0..3)];
        let op = rng.random_range(0..10);
        let roots: Vec<Uuid> = msgs
            .iter()
            .filter(|m| m.thread.is_nil() && !m.redacted)
            .map(|m| m.id)
            .collect();
        if op < 5 || msgs.is_empty() {
            let thread = if op % 2 == 1 && !roots.is_empty() {
                Some(roots[rng.random_range(0..roots.len())])
            } else {
                None
            };
            let mention = users[rng.random_range(0..3)].0;
            let mentions = if rng.random_bool(0.4) {
                vec![mention]
            } else {
                vec![]
            };
            let reply = send(
                &app,
                token,
                r,
                json!({"body": "x", "thread_root": thread, "mentions": mentions}),
            )
            .await;
            assert_eq!(reply.status, 201, "{}", reply.body);
            msgs.push(M {
                id: id(&reply.body["message_id"]),
                thread: thread.unwrap_or(Uuid::nil()),
                sender: *who,
                pos: reply.body["position"].as_i64().unwrap(),
                // The server drops self-mentions.
                mentions: mentions.into_iter().filter(|m| m != who).collect(),
                redacted: false,
            });
        } else if op < 8 {
            // Read up to some message of some timeline.
            let m = &msgs[rng.random_range(0..msgs.len())];
            let thread = if m.thread.is_nil() {
                None
            } else {
                Some(m.thread)
            };
            let reply = app
                .post(
                    &format!("/v1/rooms/{r}/receipts"),
                    Some(token),
                    &json!({"message_id": m.id, "thread_root": thread}),
                    &[],
                )
                .await;
            assert_eq!(reply.status, 200, "{}", reply.body);
            let e = read.entry((*who, m.thread)).or_insert(0);
            *e = (*e).max(m.pos);
        } else {
            // Redact one of one's own messages.
            let mine: Vec<usize> = (0..msgs.len())
                .filter(|i| msgs[*i].sender == *who && !msgs[*i].redacted)
                .collect();
            if let Some(&i) = mine.first() {
                let reply = app
                    .call(
                        "DELETE",
                        &format!("/v1/rooms/{r}/messages/{}", msgs[i].id),
                        Some(token),
                        None,
                        &[],
                    )
                    .await;
                assert_eq!(reply.status, 200, "{}", reply.body);
                msgs[i].redacted = true;
            }
        }
    }
    app.settle("chat").await;
    let mut counted = 0;
    for (uid, token) in &users {
        let rooms = app.get("/v1/rooms", Some(token)).await;
        let room = &rooms.body["items"][0];
        let mut timelines: Vec<Uuid> = msgs.iter().map(|m| m.thread).collect();
        timelines.sort();
        timelines.dedup();
        for t in timelines {
            let from = read.get(&(*uid, t)).copied().unwrap_or(0);
            let relevant = msgs
                .iter()
                .filter(|m| m.thread == t && m.pos > from && m.sender != *uid && !m.redacted);
            let (unread, mentions) = relevant.fold((0, 0), |(u, n), m| {
                (u + 1, n + m.mentions.contains(uid) as i64)
            });
            let (got_u, got_n) = if t.is_nil() {
                (
                    room["unread"].as_i64().unwrap(),
                    room["mentions"].as_i64().unwrap(),
                )
            } else {
                room["threads"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|x| x["thread_root"] == t.to_string())
                    .map(|x| {
                        (
                            x["unread"].as_i64().unwrap(),
                            x["mentions"].as_i64().unwrap(),
                        )
                    })
                    .unwrap_or((0, 0))
            };
            counted += unread + mentions;
            assert_eq!(
                (got_u, got_n),
                (unread, mentions),
                "user {uid} timeline {t}: {}",
                rooms.body
            );
        }
    }
    assert!(
        counted > 0,
        "the mix left nothing unread: the check would be vacuous"
    );
    // Threads list the reply counts of what is left.
    let threads = app
        .get(&format!("/v1/rooms/{r}/threads?limit=100"), Some(&alice))
        .await;
    for th in threads.body["items"].as_array().unwrap() {
        let root = id(&th["root"]["message_id"]);
        let live = msgs
            .iter()
            .filter(|m| m.thread == root && !m.redacted)
            .count() as i64;
        assert_eq!(th["root"]["reply_count"].as_i64().unwrap(), live);
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn search_finds_prefixes_only_in_the_callers_rooms_with_highlights() {
    let app = TestApp::spawn().await;
    let (_, alice) = app.user("alice@test.local").await;
    let (_, carol) = app.user("carol@test.local").await;
    let (_, bob) = app.user("bob@test.local").await;
    let a = room(&app, &alice, "A", "private").await;
    let c = room(&app, &carol, "C", "private").await;
    say(&app, &alice, a, "Kilimanjaro hike on Friday").await;
    say(&app, &alice, a, "Friday dinner").await;
    say(&app, &carol, c, "Kilimanjaro trip").await;
    app.settle("chat").await;
    let s = app.get("/v1/search/messages?q=kili", Some(&alice)).await;
    let items = s.body["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{}", s.body);
    assert_eq!(items[0]["message"]["body"], "Kilimanjaro hike on Friday");
    assert_eq!(items[0]["highlights"][0], json!([0, 4]));
    let s = app
        .get("/v1/search/messages?q=fri%20kil", Some(&alice))
        .await;
    assert_eq!(
        s.body["items"].as_array().unwrap().len(),
        1,
        "every term must match: {}",
        s.body
    );
    let s = app
        .get("/v1/search/messages?q=friday&limit=1", Some(&alice))
        .await;
    assert_eq!(s.body["items"][0]["message"]["body"], "Friday dinner");
    let next = s.body["next"].as_str().unwrap();
    let s2 = app
        .get(
            &format!("/v1/search/messages?q=friday&limit=1&cursor={next}"),
            Some(&alice),
        )
        .await;
    assert_eq!(
        s2.body["items"][0]["message"]["body"],
        "Kilimanjaro hike on Friday"
    );
    assert!(s2.body["next"].is_null());
    // Not a member anywhere: nothing. Another's room: 404.
    let s = app
        .get("/v1/search/messages?q=kilimanjaro", Some(&bob))
        .await;
    assert!(s.body["items"].as_array().unwrap().is_empty());
    app.get(
        &format!("/v1/search/messages?q=kili&room_id={c}"),
        Some(&alice),
    )
    .await
    .assert_problem(404, "room_not_found");
    app.get("/v1/search/messages?q=k", Some(&alice))
        .await
        .assert_problem(422, "invalid_input");
    app.stop().await;
}

/// Search reads each room's newest messages before it asks the GIN index (see
/// `search_rows` in the gateway): a common term is served from the walk, a rare
/// one in old messages from the index, and a page may mix both rooms and both
/// ways. Every page, followed by its cursor to the end, must give exactly the
/// matching messages newest first, whichever way found them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn search_pages_are_exact_whether_the_walk_or_the_index_finds_the_hits() {
    let app = TestApp::spawn().await;
    let (alice_id, alice) = app.user("alice@test.local").await;
    let (bob_id, bob) = app.user("bob@test.local").await;
    let a = room(&app, &alice, "A", "private").await;
    let b = room(&app, &bob, "B", "private").await;
    invite_and_join(&app, &alice, a, bob_id, &bob).await;
    invite_and_join(&app, &bob, b, alice_id, &alice).await;
    // (position, sender, words): A holds more than one walk (400) of messages,
    // so its oldest lie beyond the walk; B fewer.
    let mut sent: Vec<(i64, Uuid, String)> = vec![];
    for i in 0..460 {
        let mut words = vec![format!("filler{i}")];
        if i % 2 == 0 {
            words.push("common".into());
        }
        if i % 15 == 0 {
            words.push("middling".into());
        }
        if i < 5 {
            words.push("rarest".into());
        }
        let (who, token) = if i % 3 == 0 {
            (bob_id, &bob)
        } else {
            (alice_id, &alice)
        };
        let text = words.join(" ");
        let (_, p) = say(&app, token, a, &text).await;
        sent.push((p, who, text));
    }
    // A thread reply in A is searched like the rest of the room.
    let root = sent[0].0;
    let root_id: Uuid = {
        let r = app
            .get(
                &format!("/v1/rooms/{a}/messages?dir=forward&limit=1&after_position={root}"),
                Some(&alice),
            )
            .await;
        assert_eq!(
            r.body["items"][0]["position"].as_i64(),
            Some(root),
            "{}",
            r.body
        );
        id(&r.body["items"][0]["message_id"])
    };
    let r = send(
        &app,
        &alice,
        a,
        json!({"body": "rarest reply", "thread_root": root_id}),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    sent.push((
        r.body["position"].as_i64().unwrap(),
        alice_id,
        "rarest reply".into(),
    ));
    for i in 0..30 {
        let text = if i % 3 == 0 {
            format!("common in b {i}")
        } else {
            format!("quiet b {i}")
        };
        let (_, p) = say(&app, &bob, b, &text).await;
        sent.push((p, bob_id, text));
    }
    app.settle("chat").await;
    sent.sort_by_key(|(p, _, _)| std::cmp::Reverse(*p));
    let matches = |text: &str, q: &str| {
        q.split(' ')
            .all(|t| text.split(' ').any(|w| w.starts_with(t)))
    };
    for (q, limit, sender) in [
        ("common", 7, None),
        ("com", 20, None),
        ("middling", 3, None),
        ("middling", 40, None),
        ("rarest", 2, None),
        ("com mid", 4, None),
        ("rar", 100, None),
        ("common", 9, Some(bob_id)),
    ] {
        let want: Vec<&str> = sent
            .iter()
            .filter(|(_, who, text)| matches(text, q) && sender.is_none_or(|s| s == *who))
            .map(|(_, _, text)| text.as_str())
            .collect();
        assert!(!want.is_empty());
        let mut got: Vec<String> = vec![];
        let mut cursor: Option<String> = None;
        let base = format!(
            "/v1/search/messages?q={}&limit={limit}{}",
            q.replace(' ', "%20"),
            sender.map(|s| format!("&sender={s}")).unwrap_or_default()
        );
        loop {
            let url = match &cursor {
                Some(c) => format!("{base}&cursor={c}"),
                None => base.clone(),
            };
            let s = app.get(&url, Some(&alice)).await;
            assert_eq!(s.status, 200, "{url}: {}", s.body);
            let items = s.body["items"].as_array().unwrap();
            assert!(items.len() <= limit, "{url}: {}", s.body);
            got.extend(
                items
                    .iter()
                    .map(|h| h["message"]["body"].as_str().unwrap().to_owned()),
            );
            match s.body["next"].as_str() {
                Some(c) => {
                    assert_eq!(items.len(), limit, "a page before the last is full: {url}");
                    cursor = Some(c.to_owned());
                }
                None => break,
            }
            assert!(got.len() <= want.len(), "{q}: more pages than hits");
        }
        assert_eq!(got, want, "query {q:?}, limit {limit}, sender {sender:?}");
    }
    app.stop().await;
}

/// The chat read models as text, in a stable order.
async fn dump(app: &TestApp) -> Vec<String> {
    let mut out = vec![];
    for (t, order) in [
        ("proj_chat_rooms", "room_id"),
        ("proj_chat_members", "room_id, user_id"),
        ("proj_chat_email_invites", "room_id, email"),
        ("proj_chat_messages", "message_id"),
        ("proj_chat_edits", "message_id, edit_no"),
        ("proj_chat_unread", "user_id, room_id, thread_root"),
        ("proj_chat_flags", "message_id"),
        ("proj_chat_mutes", "room_id, user_id"),
        ("proj_chat_notes", "note_id"),
    ] {
        let rows: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT x::text FROM {t} x ORDER BY {order}"
        )))
        .fetch_all(&app.pool)
        .await
        .unwrap();
        out.extend(rows.into_iter().map(|r| format!("{t} {r}")));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rebuilding_the_chat_projection_from_zero_gives_identical_read_models() {
    let app = TestApp::spawn().await;
    let (_, alice) = app.user("alice@test.local").await;
    let (bob_id, bob) = app.user("bob@test.local").await;
    let r = room(&app, &alice, "Rebuild", "private").await;
    invite_and_join(&app, &alice, r, bob_id, &bob).await;
    let (root, _) = say(&app, &alice, r, "root words").await;
    let reply = send(
        &app,
        &bob,
        r,
        json!({"body": "reply words", "thread_root": root, "mentions": [bob_id]}),
    )
    .await;
    assert_eq!(reply.status, 201);
    let (gone, _) = say(&app, &bob, r, "to be redacted").await;
    app.call(
        "DELETE",
        &format!("/v1/rooms/{r}/messages/{gone}"),
        Some(&bob),
        None,
        &[],
    )
    .await;
    app.call(
        "PATCH",
        &format!("/v1/rooms/{r}/messages/{root}"),
        Some(&alice),
        Some(&json!({"body": "root edited"})),
        &[],
    )
    .await;
    app.call(
        "PUT",
        &format!("/v1/rooms/{r}/messages/{root}/reactions/ok"),
        Some(&bob),
        None,
        &[],
    )
    .await;
    app.post(
        &format!("/v1/rooms/{r}/receipts"),
        Some(&bob),
        &json!({"message_id": root}),
        &[],
    )
    .await;
    // Moderation and notes are part of the read model too.
    for (method, path, token, body) in [
        (
            "POST",
            format!("/v1/rooms/{r}/messages/{root}/reports"),
            &bob,
            json!({"reason": "spam"}),
        ),
        (
            "POST",
            format!("/v1/rooms/{r}/notes"),
            &alice,
            json!({"body": "pinned words", "priority": "high"}),
        ),
        (
            "PUT",
            format!("/v1/rooms/{r}/members/{bob_id}/mute"),
            &alice,
            json!({"minutes": 10}),
        ),
    ] {
        let done = app.call(method, &path, Some(token), Some(&body), &[]).await;
        assert!(done.status < 300, "{path}: {}", done.body);
    }
    app.settle("chat").await;
    let live = dump(&app).await;
    assert!(live.len() > 10);

    // Rebuild from zero in this process (the projector role keeps running; the row lock serialises).
    let mut tx = app.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM proj_checkpoints WHERE model = 'chat' FOR UPDATE")
        .execute(&mut *tx)
        .await
        .unwrap();
    for t in [
        "proj_chat_rooms",
        "proj_chat_members",
        "proj_chat_email_invites",
        "proj_chat_messages",
        "proj_chat_edits",
        "proj_chat_unread",
        "proj_chat_flags",
        "proj_chat_mutes",
        "proj_chat_notes",
    ] {
        sqlx::query(sqlx::AssertSqlSafe(format!("DELETE FROM {t}")))
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    sqlx::query("UPDATE proj_checkpoints SET position = 0 WHERE model = 'chat'")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let runner = projections::runner::Runner {
        pool: app.pool.clone(),
        js: jetstream::new(app.nats.clone()),
        subjects: app.subjects.clone(),
    };
    let projector = Arc::new(projections::chat::ChatProjector {
        keystore: handlers::keystore::Keystore::new(master_key(&app)),
    });
    let head = handlers::store::head_position(&app.pool).await.unwrap();
    runner.catch_up(&*projector, head).await.unwrap();
    assert_eq!(dump(&app).await, live);
    app.stop().await;
}

/// The indexes of the chat tables: (name, definition with the table's name only).
async fn chat_indexes(app: &TestApp) -> Vec<(String, String)> {
    sqlx::query_as(
        "SELECT indexname::text, indexdef FROM pg_indexes
         WHERE schemaname = current_schema() AND tablename LIKE 'proj_chat_%' ORDER BY 1",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_chat_replay_interrupted_and_resumed_swaps_in_every_index_and_search_still_finds() {
    use projections::Projector as _;
    use projections::rebuild::{self, Options, Outcome};
    let app = TestApp::spawn().await;
    let (_, alice) = app.user("alice@test.local").await;
    let a = room(&app, &alice, "A", "private").await;
    for i in 0..6 {
        say(&app, &alice, a, &format!("Kilimanjaro ascent day {i}")).await;
    }
    let (gone, _) = say(&app, &alice, a, "Kilimanjaro redacted").await;
    let d = app
        .call(
            "DELETE",
            &format!("/v1/rooms/{a}/messages/{gone}"),
            Some(&alice),
            None,
            &[],
        )
        .await;
    assert_eq!(d.status, 200, "{}", d.body);
    app.settle("chat").await;
    let before = chat_indexes(&app).await;
    assert!(
        before.iter().any(|(n, _)| n == "proj_chat_messages_search"),
        "{before:?}"
    );
    let projector = projections::chat::ChatProjector {
        keystore: handlers::keystore::Keystore::new(master_key(&app)),
    };
    // Interrupted after a few events: the shadow lacks the deferred indexes yet.
    let paused = rebuild::rebuild(
        &app.pool,
        &projector,
        &Options {
            max_events: Some(3),
            batch: Some(1),
            ..Options::default()
        },
        |_| {},
    )
    .await
    .unwrap();
    assert!(matches!(paused, Outcome::Paused { .. }), "{paused:?}");
    let shadow: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_indexes WHERE schemaname = 'mathia_rebuild_chat'
         AND indexname = ANY($1)",
    )
    .bind(&projector.deferred_indexes()[..])
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(shadow, 0, "deferred indexes are built after the fill");
    // Resumed: filled, indexed, swapped.
    let done = rebuild::rebuild(&app.pool, &projector, &Options::default(), |_| {})
        .await
        .unwrap();
    assert!(
        matches!(done, Outcome::Swapped { resumed: true, .. }),
        "{done:?}"
    );
    assert_eq!(
        chat_indexes(&app).await,
        before,
        "the same indexes, same definitions"
    );
    let s = app.get("/v1/search/messages?q=kilim", Some(&alice)).await;
    assert_eq!(s.body["items"].as_array().unwrap().len(), 6, "{}", s.body);
    // And the swapped-in model equals a fresh rebuild of it.
    let dry = rebuild::rebuild(
        &app.pool,
        &projector,
        &Options {
            dry_run: true,
            ..Options::default()
        },
        |_| {},
    )
    .await
    .unwrap();
    assert!(!dry.differs(), "{dry:?}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sends_past_the_per_minute_limit_get_429_naming_it_and_bad_bodies_are_refused() {
    let app = TestApp::spawn_with(mathia::Roles::ALL, |c| c.chat_messages_per_min = 3).await;
    let (_, alice) = app.user("alice@test.local").await;
    let r = room(&app, &alice, "Quota", "private").await;
    let before = events_count(&app).await;
    send(&app, &alice, r, json!({"body": "x".repeat(16 * 1024 + 1)}))
        .await
        .assert_problem(422, "invalid_input");
    send(&app, &alice, r, json!({"body": "a\u{0}b"}))
        .await
        .assert_problem(400, "malformed_request");
    send(
        &app,
        &alice,
        r,
        json!({"body": "hi", "thread_root": "nope"}),
    )
    .await
    .assert_problem(400, "malformed_request");
    assert_eq!(events_count(&app).await, before);
    for i in 0..3 {
        assert_eq!(
            send(&app, &alice, r, json!({"body": format!("m{i}")}))
                .await
                .status,
            201
        );
    }
    let limited = send(&app, &alice, r, json!({"body": "one too many"})).await;
    limited.assert_problem(429, "rate_limited");
    assert_eq!(limited.body["limit"], "chat_messages_per_minute");
    assert!(limited.header("retry-after").is_some());
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_daily_quota_refuses_with_429_and_a_refused_send_costs_no_quota() {
    let app = TestApp::spawn_with(mathia::Roles::ALL, |c| {
        c.chat_messages_per_min = 3;
        c.chat_messages_per_day = 4;
    })
    .await;
    let (alice_id, alice) = app.user("alice@test.local").await;
    let r = room(&app, &alice, "Daily", "private").await;
    let mut redis = redis::Client::open(app.config.redis_url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let counter = |limit: &str, window: i64| {
        format!(
            "{}q:{limit}:{alice_id}:{}",
            app.config.redis_prefix,
            chrono::Utc::now().timestamp() / window
        )
    };
    // The windows are fixed minutes: start well inside one.
    let second = chrono::Utc::now().timestamp() % 60;
    if second > 45 {
        tokio::time::sleep(std::time::Duration::from_secs((61 - second) as u64)).await;
    }
    for i in 0..3 {
        assert_eq!(
            send(&app, &alice, r, json!({"body": format!("m{i}")}))
                .await
                .status,
            201
        );
    }
    // The minute's limit refuses the fourth: the day's count stays at 3.
    let minute = send(&app, &alice, r, json!({"body": "too fast"})).await;
    minute.assert_problem(429, "rate_limited");
    assert_eq!(minute.body["limit"], "chat_messages_per_minute");
    let day: i64 = redis::AsyncCommands::get(&mut redis, counter("chat_messages_per_day", 86_400))
        .await
        .unwrap();
    assert_eq!(
        day, 3,
        "a send the minute's limit refused was charged to the day"
    );
    // A new minute (its counter gone): one more fits the day, then the day refuses.
    let _: () = redis::AsyncCommands::del(&mut redis, counter("chat_messages_per_minute", 60))
        .await
        .unwrap();
    assert_eq!(
        send(&app, &alice, r, json!({"body": "m3"})).await.status,
        201
    );
    let before = events_count(&app).await;
    let daily = send(&app, &alice, r, json!({"body": "m4"})).await;
    daily.assert_problem(429, "rate_limited");
    assert_eq!(daily.body["limit"], "chat_messages_per_day");
    let retry: i64 = daily.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=86_400).contains(&retry), "retry-after {retry}");
    assert_eq!(
        events_count(&app).await,
        before,
        "a refused send wrote nothing"
    );
    let minute_count: Option<i64> =
        redis::AsyncCommands::get(&mut redis, counter("chat_messages_per_minute", 60))
            .await
            .unwrap();
    assert_eq!(
        minute_count,
        Some(1),
        "a send the day refused was charged to the minute"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_message_id_sent_twice_makes_one_message() {
    let app = TestApp::spawn().await;
    let (_, alice) = app.user("alice@test.local").await;
    let r = room(&app, &alice, "Txn", "private").await;
    let body = json!({"body": "once", "client_message_id": "txn-1"});
    let a = send(&app, &alice, r, body.clone()).await;
    let b = send(&app, &alice, r, body.clone()).await;
    assert_eq!(a.status, 201, "{}", a.body);
    assert_eq!(b.status, 201, "{}", b.body);
    assert_eq!(a.body["message_id"], b.body["message_id"]);
    assert_eq!(b.header("idempotent-replayed"), Some("true"));
    let other = send(
        &app,
        &alice,
        r,
        json!({"body": "different", "client_message_id": "txn-1"}),
    )
    .await;
    other.assert_problem(422, "idempotency_key_reused");
    app.settle("chat").await;
    let page = app
        .get(&format!("/v1/rooms/{r}/messages"), Some(&alice))
        .await;
    assert_eq!(page.body["items"].as_array().unwrap().len(), 1);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_gateway_that_missed_a_rotation_refuses_at_most_one_send_and_the_next_uses_the_new_key() {
    let app = TestApp::spawn().await;
    let (_, alice) = app.user("alice@test.local").await;
    let r = room(&app, &alice, "Two doors", "private").await;
    // Gateway B reads (and keeps for a moment) the room's keys; gateway A rotates them.
    let (b, stop, task) = app.second_gateway().await;
    let send_via_b = |text: &str| {
        let req = app
            .http
            .post(format!("{b}/v1/rooms/{r}/messages"))
            .bearer_auth(&alice)
            .json(&json!({ "body": text }));
        async move { mathia_tests::Reply::from(req.send().await.expect("request")).await }
    };
    assert_eq!(send_via_b("before").await.status, 201);
    let rot = app
        .post(
            &format!("/v1/rooms/{r}/keys/rotate"),
            Some(&alice),
            &json!({}),
            &[],
        )
        .await;
    assert_eq!(rot.status, 200, "{}", rot.body);
    // B may still hold version 1: the handler refuses that send, and B forgets the keys.
    let first = send_via_b("right after").await;
    if first.status != 201 {
        first.assert_problem(409, "key_version_conflict");
    }
    let second = send_via_b("again").await;
    assert_eq!(second.status, 201, "{}", second.body);
    let version: i32 =
        sqlx::query_scalar("SELECT key_version FROM chat_message_keys WHERE message_id = $1")
            .bind(id(&second.body["message_id"]))
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(version, 2);
    stop.cancel();
    let _ = task.await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rotation_keeps_old_messages_readable_and_public_rooms_are_joined_left_or_declined() {
    let app = TestApp::spawn().await;
    let (bob_id, bob) = app.user("bob@test.local").await;
    let (_, alice) = app.user("alice@test.local").await;
    let (_, carol) = app.user("carol@test.local").await;
    let r = room(&app, &alice, "Lobby", "public").await;
    let (old, _) = say(&app, &alice, r, "before rotation").await;
    // Only the owner rotates; messages then use version 2, the old one keeps version 1.
    let j = app
        .post(&format!("/v1/rooms/{r}/join"), Some(&bob), &json!({}), &[])
        .await;
    assert_eq!(j.status, 200, "{}", j.body);
    app.post(
        &format!("/v1/rooms/{r}/keys/rotate"),
        Some(&bob),
        &json!({}),
        &[],
    )
    .await
    .assert_problem(403, "forbidden");
    let rot = app
        .post(
            &format!("/v1/rooms/{r}/keys/rotate"),
            Some(&alice),
            &json!({}),
            &[],
        )
        .await;
    assert_eq!(
        (rot.status, rot.body["key_version"].as_i64()),
        (200, Some(2)),
        "{}",
        rot.body
    );
    let (new, _) = say(&app, &bob, r, "after rotation").await;
    let versions: Vec<i32> = sqlx::query_scalar(
        "SELECT key_version FROM chat_message_keys WHERE message_id = ANY($1) ORDER BY key_version",
    )
    .bind(vec![old, new])
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(versions, [1, 2]);
    app.settle("chat").await;
    let page = app
        .get(&format!("/v1/rooms/{r}/messages"), Some(&bob))
        .await;
    let bodies: Vec<&str> = page.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["body"].as_str().unwrap())
        .collect();
    assert_eq!(bodies, ["before rotation", "after rotation"]);
    let s = app.get("/v1/search/messages?q=rotation", Some(&bob)).await;
    assert_eq!(
        s.body["items"].as_array().unwrap().len(),
        2,
        "search spans key versions: {}",
        s.body
    );
    // The directory lists it; bob leaves and loses access; an invitation can be declined.
    let dir = app.get("/v1/public-rooms", Some(&carol)).await;
    assert!(
        dir.body["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["room_id"] == r.to_string()),
        "{}",
        dir.body
    );
    let l = app
        .post(&format!("/v1/rooms/{r}/leave"), Some(&bob), &json!({}), &[])
        .await;
    assert_eq!(l.status, 200, "{}", l.body);
    app.settle("chat").await;
    app.get(&format!("/v1/rooms/{r}/messages"), Some(&bob))
        .await
        .assert_problem(404, "room_not_found");
    let p = room(&app, &alice, "Private", "private").await;
    let inv = app
        .post(
            &format!("/v1/rooms/{p}/invites"),
            Some(&alice),
            &json!({"user_id": bob_id}),
            &[],
        )
        .await;
    assert_eq!(inv.status, 201, "{}", inv.body);
    let d = app
        .post(
            &format!("/v1/rooms/{p}/decline"),
            Some(&bob),
            &json!({}),
            &[],
        )
        .await;
    assert_eq!(d.status, 200, "{}", d.body);
    app.post(&format!("/v1/rooms/{p}/join"), Some(&bob), &json!({}), &[])
        .await
        .assert_problem(404, "room_not_found");
    app.stop().await;
}

/// A timeline page's statement gets a generic plan (its limit is written in),
/// and Postgres keeps that plan while the tables grow. So the plan made on an
/// empty database must be the one a full room needs: every scan by the
/// timeline's own index. (The end check written as `EXISTS` was planned through
/// the date index there and then walked the whole room for every page.)
#[tokio::test]
async fn a_timeline_page_planned_on_an_empty_database_stays_on_the_timeline_index() {
    use gateway::routes::messages::{Timeline, page_statement};
    use sqlx::Connection as _;
    let (url, name) = mathia_tests::fresh_database().await.unwrap();
    let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
    let room = Uuid::now_v7();
    // Every direction and bound, with the membership check in the statement
    // (a main timeline's latest page or cursor) and without (after an anchor).
    let reader = Uuid::now_v7();
    let mut args_of: Vec<String> = vec![];
    let shapes: Vec<(bool, bool, bool)> = [true, false]
        .into_iter()
        .flat_map(|guarded| {
            [(true, true), (true, false), (false, true), (false, false)]
                .map(|(forward, inclusive)| (forward, inclusive, guarded))
        })
        .collect();
    for (i, (forward, inclusive, guarded)) in shapes.iter().enumerate() {
        let sql = page_statement(&Timeline::Main(room), *forward, *inclusive, 50, *guarded);
        let (types, args) = if *guarded {
            ("uuid, bigint, uuid", format!("'{room}', $$, '{reader}'"))
        } else {
            ("uuid, bigint", format!("'{room}', $$"))
        };
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "PREPARE page_{i} ({types}) AS {sql}"
        )))
        .execute(&mut conn)
        .await
        .unwrap();
        args_of.push(args);
        // Five custom plans, then Postgres compares a generic one with them.
        for _ in 0..8 {
            let args = args_of[i].replace("$$", "1000");
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!("EXECUTE page_{i} ({args})")))
                .execute(&mut conn)
                .await
                .unwrap();
        }
    }
    let generic: Vec<(String, i64)> =
        sqlx::query_as("SELECT name, generic_plans FROM pg_prepared_statements WHERE name LIKE 'page_%' ORDER BY name")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    assert_eq!(generic.len(), shapes.len());
    for (statement, plans) in &generic {
        assert!(
            *plans > 0,
            "{statement} never got a generic plan: {generic:?}"
        );
    }
    // The room grows to 3,000 messages among 30,000; nothing re-plans.
    sqlx::query(
        "INSERT INTO proj_chat_messages (message_id, room_id, position, sender, kind, mentions, mentions_assistant, sent_at)
         SELECT gen_random_uuid(), CASE WHEN g % 10 = 0 THEN $1 ELSE gen_random_uuid() END, g,
                gen_random_uuid(), 'text', '{}', false, now() - (30000 - g) * interval '1 second'
         FROM generate_series(1, 30000) g",
    )
    .bind(room)
    .execute(&mut conn)
    .await
    .unwrap();
    // Their keys, as the handlers write them (one room key, one key per message).
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "INSERT INTO chat_room_keys (room_id, version, wrapped) VALUES ('{room}', 1, '\\x00');
         INSERT INTO chat_message_keys (message_id, room_id, key_version, wrapped)
         SELECT message_id, room_id, 1, '\\x00' FROM proj_chat_messages"
    )))
    .execute(&mut conn)
    .await
    .unwrap();
    // The reader is a member, so the guarded plans read the page too.
    sqlx::query(
        "INSERT INTO proj_chat_members (room_id, user_id, role, state, since, since_position)
         VALUES ($1, $2, 'member', 'joined', now(), 0)",
    )
    .bind(room)
    .bind(reader)
    .execute(&mut conn)
    .await
    .unwrap();
    for i in 0..shapes.len() {
        let args = args_of[i].replace("$$", "15000");
        let plan: String = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "EXPLAIN (FORMAT JSON) EXECUTE page_{i} ({args})"
        )))
        .fetch_one(&mut conn)
        .await
        .map(|v: serde_json::Value| v.to_string())
        .unwrap();
        assert!(
            plan.contains("proj_chat_messages_timeline"),
            "page_{i}: {plan}"
        );
        assert!(
            !plan.contains("proj_chat_messages_at"),
            "page_{i} reads the date index: {plan}"
        );
        // A page's keys are neighbours in the covering (room, message) index,
        // not 50 probes of the table by message id.
        assert!(
            plan.contains("chat_message_keys_page") && !plan.contains("chat_message_keys_pkey"),
            "page_{i} does not read the keys by (room, message): {plan}"
        );
    }
    conn.close().await.unwrap();
    mathia_tests::drop_database(&name).await;
}
