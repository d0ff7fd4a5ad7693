//! Realtime through real WebSocket clients against the running gateway:
//! gap-free resume across random disconnects, retention and epoch refusals,
//! private rooms, typing and assistant chunks, long-poll sync, several gateways.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use mathia_tests::TestApp;
use rand::{RngExt, SeedableRng};
use serde_json::{Value, json};
use uuid::Uuid;
use yawc::{Frame, OpCode, Options, WebSocket};

use super::chat::{id, invite_and_join, room, say};

pub(crate) type Socket = WebSocket<yawc::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect_to(base: &str, token: &str) -> Socket {
    let url = format!("{}/v1/ws", base.replacen("http", "ws", 1));
    let mut ws = WebSocket::connect(url.parse().unwrap())
        .with_options(Options::default().with_low_latency_compression())
        .await
        .expect("websocket");
    send(&mut ws, json!({"type": "auth", "token": token})).await;
    let ready = next(&mut ws).await;
    assert_eq!(ready["type"], "ready", "{ready}");
    ws
}

pub(crate) async fn connect(app: &TestApp, token: &str) -> Socket {
    connect_to(&app.base, token).await
}

pub(crate) async fn send(ws: &mut Socket, v: Value) {
    ws.send(Frame::text(v.to_string())).await.expect("send");
}

/// The next JSON frame (pings are answered by the library).
pub(crate) async fn next(ws: &mut Socket) -> Value {
    loop {
        let f = tokio::time::timeout(Duration::from_secs(20), ws.next())
            .await
            .expect("a frame within 20 s")
            .expect("the socket is open");
        match f.opcode() {
            OpCode::Text => return serde_json::from_str(f.as_str()).expect("json"),
            OpCode::Close => panic!("closed: {:?} {:?}", f.close_code(), f.close_reason()),
            _ => {}
        }
    }
}

/// The next frame of `kind` (other frames are skipped).
pub(crate) async fn next_of(ws: &mut Socket, kind: &str) -> Value {
    loop {
        let v = next(ws).await;
        if v["type"] == kind {
            return v;
        }
    }
}

/// The next frame of `kind` about `user` (others are skipped).
async fn next_about(ws: &mut Socket, kind: &str, user: Uuid) -> Value {
    loop {
        let v = next_of(ws, kind).await;
        if v["user_id"] == json!(user) {
            return v;
        }
    }
}

/// (connections, status) of `user` as `token` sees it.
async fn presence_of(app: &TestApp, token: &str, user: Uuid) -> (u64, String) {
    let r = app
        .get(&format!("/v1/presence?user_ids={user}"), Some(token))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    (
        r.body[0]["connections"].as_u64().unwrap(),
        r.body[0]["status"].as_str().unwrap().to_owned(),
    )
}

/// A starting cursor once the gateway has delivered everything committed so far.
async fn start_cursor(app: &TestApp, token: &str) -> String {
    app.settle("feed").await;
    let feed = projections::checkpoint(&app.pool, "feed").await.unwrap();
    for _ in 0..2000 {
        let r = app.get("/v1/sync", Some(token)).await;
        assert_eq!(r.status, 200, "{}", r.body);
        let cursor = r.body["next"].as_str().unwrap().to_owned();
        let c = gateway::realtime::Cursor::decode(&cursor).expect("a cursor");
        if c.position >= feed {
            return cursor;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the gateway never caught up with the feed");
}

pub(crate) async fn subscribe(
    ws: &mut Socket,
    id: &str,
    channel: &str,
    since: Option<&str>,
) -> Value {
    send(
        ws,
        json!({"type": "subscribe", "id": id, "channel": channel, "since": since}),
    )
    .await;
    next_of(ws, "subscribed").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_dropping_at_random_during_5000_messages_ends_with_each_once_in_order() {
    let app = TestApp::spawn().await;
    let (_, alice) = app.user("alice@example.com").await;
    let (bob_id, bob) = app.user("bob@example.com").await;
    let r = room(&app, &alice, "Burst", "private").await;
    invite_and_join(&app, &alice, r, bob_id, &bob).await;
    app.settle("chat").await;
    let mut cursor = start_cursor(&app, &bob).await;

    // 5,000 messages from 16 concurrent senders.
    const N: usize = 5000;
    let senders: Vec<_> = (0..16)
        .map(|s| {
            let (base, token) = (app.base.clone(), alice.clone());
            tokio::spawn(async move {
                let http = reqwest::Client::new();
                for i in (s..N).step_by(16) {
                    let res = http
                        .post(format!("{base}/v1/rooms/{r}/messages"))
                        .bearer_auth(&token)
                        .json(&json!({"body": format!("burst {i}")}))
                        .send()
                        .await
                        .expect("send");
                    assert_eq!(res.status(), 201);
                }
            })
        })
        .collect();

    // Bob reads, dropping the connection at random points and resuming.
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut seen: Vec<Uuid> = vec![];
    let mut reconnects = 0;
    while seen.len() < N {
        let mut ws = connect(&app, &bob).await;
        let sub = subscribe(&mut ws, "r", &format!("room:{r}"), Some(&cursor)).await;
        assert_eq!(sub["recovered"], true, "{sub}");
        let take = rng.random_range(1..600);
        for _ in 0..take {
            let v = next(&mut ws).await;
            if v["type"] != "event" {
                continue;
            }
            cursor = v["cursor"].as_str().unwrap().to_owned();
            if v["kind"] == "MessagePosted" {
                assert!(v["data"]["body"].as_str().unwrap().starts_with("burst "));
                seen.push(id(&v["data"]["message_id"]));
                if seen.len() == N {
                    break;
                }
            }
        }
        reconnects += 1;
        // Dropped without a close frame, like a phone going into a tunnel.
        drop(ws);
    }
    for s in senders {
        s.await.unwrap();
    }
    assert!(
        reconnects > 5,
        "the test must really disconnect ({reconnects})"
    );
    app.settle("chat").await;
    let timeline: Vec<Uuid> = sqlx::query_scalar(
        "SELECT message_id FROM proj_chat_messages WHERE room_id = $1 ORDER BY position",
    )
    .bind(r)
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(timeline.len(), N);
    assert_eq!(seen, timeline, "exactly the timeline, in order, none twice");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn old_cursors_and_cursors_from_before_a_rebuild_are_refused_whole() {
    let app = TestApp::spawn_with(mathia::Roles::ALL, |c| c.feed_retention = 5).await;
    let (_, alice) = app.user("alice@example.com").await;
    let r = room(&app, &alice, "Old", "private").await;
    app.settle("chat").await; // the subscription's membership check reads it
    let old = start_cursor(&app, &alice).await;
    for i in 0..20 {
        say(&app, &alice, r, &format!("m{i}")).await;
    }
    // The pruner runs every second.
    for _ in 0..200 {
        let floor: i64 = sqlx::query_scalar("SELECT position FROM proj_feed_floor")
            .fetch_one(&app.pool)
            .await
            .unwrap();
        if floor > 10 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut ws = connect(&app, &alice).await;
    let sub = subscribe(&mut ws, "r", &format!("room:{r}"), Some(&old)).await;
    assert_eq!(
        (sub["recovered"].clone(), sub["reason"].clone()),
        (json!(false), json!("retention"))
    );
    assert_eq!(sub["replayed"], 0, "never a partial replay");
    let polled = app
        .get(&format!("/v1/sync?since={old}&timeout_ms=0"), Some(&alice))
        .await;
    assert_eq!(polled.body["recovered"], false);
    assert_eq!(polled.body["items"], json!([]));

    // A fresh cursor works; then a rebuild of the feed changes the epoch.
    let fresh = sub["cursor"].as_str().unwrap().to_owned();
    let live = subscribe(&mut ws, "live", &format!("room:{r}"), Some(&fresh)).await;
    assert_eq!(live["recovered"], true);
    let mut tx = app.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM proj_checkpoints WHERE model = 'feed' FOR UPDATE")
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query("DELETE FROM proj_feed")
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query("UPDATE proj_checkpoints SET position = 0 WHERE model = 'feed'")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let cut = next_of(&mut ws, "unsubscribed").await;
    assert_eq!(cut["reason"], "epoch_changed", "{cut}");
    app.settle("feed").await;
    let again = subscribe(&mut ws, "again", &format!("room:{r}"), Some(&fresh)).await;
    assert_eq!(
        (again["recovered"].clone(), again["reason"].clone()),
        (json!(false), json!("epoch_changed"))
    );
    let polled = app
        .get(
            &format!("/v1/sync?since={fresh}&timeout_ms=0"),
            Some(&alice),
        )
        .await;
    assert_eq!(polled.body["reason"], "epoch_changed");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn strangers_learn_nothing_and_bad_sockets_are_refused() {
    let app = TestApp::spawn_with(mathia::Roles::ALL, |c| {
        c.ws_origins = vec!["https://app.mathia.test".into()];
    })
    .await;
    let (_, alice) = app.user("alice@example.com").await;
    let (_, eve) = app.user("eve@example.com").await;
    let r = room(&app, &alice, "Private", "private").await;
    app.settle("chat").await;
    let mut ws = connect(&app, &eve).await;
    for room in [r, Uuid::now_v7()] {
        send(
            &mut ws,
            json!({"type": "subscribe", "id": "x", "channel": format!("room:{room}")}),
        )
        .await;
        let e = next(&mut ws).await;
        assert_eq!(
            (e["type"].clone(), e["code"].clone(), e["message"].clone()),
            (
                json!("error"),
                json!("room_not_found"),
                json!("no such room")
            ),
            "a real room and an invented one look the same"
        );
    }
    send(
        &mut ws,
        json!({"type": "subscribe", "id": "u", "channel": "user", "since": "garbage"}),
    )
    .await;
    assert_eq!(next(&mut ws).await["code"], "invalid_cursor");
    send(&mut ws, json!({"type": "dance"})).await;
    assert_eq!(next(&mut ws).await["code"], "malformed_frame");

    // A wrong token in the first frame closes with 4001.
    let url = format!("{}/v1/ws", app.base.replacen("http", "ws", 1));
    let mut bad = WebSocket::connect(url.parse().unwrap()).await.unwrap();
    send(&mut bad, json!({"type": "auth", "token": "nope"})).await;
    let f = loop {
        let f = bad.next().await.expect("a close frame");
        if f.opcode() == OpCode::Close {
            break f;
        }
    };
    assert_eq!(u16::from(f.close_code().unwrap()), 4001);

    // Before the upgrade: a foreign Origin, a bad bearer header, a plain GET.
    let upgrade = |origin: &str| {
        reqwest::Client::new()
            .get(format!("{}/v1/ws", app.base))
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
            .header(
                "sec-websocket-extensions",
                "permessage-deflate; client_max_window_bits",
            )
            .header("origin", origin.to_owned())
    };
    let foreign = upgrade("https://evil.example").send().await.unwrap();
    assert_eq!(foreign.status(), 403);
    assert_eq!(
        foreign.headers()["content-type"],
        "application/problem+json"
    );
    let bearer = upgrade("https://app.mathia.test")
        .bearer_auth("nope")
        .send()
        .await
        .unwrap();
    assert_eq!(bearer.status(), 401);
    let plain = app.get("/v1/ws", None).await;
    plain.assert_problem(400, "malformed_request");
    // permessage-deflate is agreed when offered.
    let ok = upgrade("https://app.mathia.test").send().await.unwrap();
    assert_eq!(ok.status(), 101);
    let ext = ok.headers()["sec-websocket-extensions"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(ext.starts_with("permessage-deflate"), "{ext}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn typing_presence_and_assistant_chunks_reach_the_rooms_watchers_only() {
    let app = TestApp::spawn().await;
    let (alice_id, alice) = app.user("alice@example.com").await;
    let (bob_id, bob) = app.user("bob@example.com").await;
    let (carol_id, carol) = app.user("carol@example.com").await;
    let r = room(&app, &alice, "Lamu", "private").await;
    let other = room(&app, &carol, "Elsewhere", "private").await;
    invite_and_join(&app, &alice, r, bob_id, &bob).await;
    app.settle("chat").await;
    let mut b = connect(&app, &bob).await;
    let sub = subscribe(&mut b, "r", &format!("room:{r}"), None).await;
    assert_eq!(sub["recovered"], true);
    assert_eq!(next_of(&mut b, "typing").await["user_ids"], json!([]));
    let mut c = connect(&app, &carol).await;
    subscribe(&mut c, "o", &format!("room:{other}"), None).await;

    // Alice comes online and types: Bob (watching the room) sees both.
    let mut a = connect(&app, &alice).await;
    let p = next_about(&mut b, "presence", alice_id).await;
    assert_eq!(
        (p["user_id"].clone(), p["status"].clone()),
        (json!(alice_id), json!("online"))
    );
    send(&mut a, json!({"type": "typing", "room_id": r})).await;
    let t = next_about(&mut b, "typing", alice_id).await;
    assert_eq!(
        (t["user_id"].clone(), t["typing"].clone(), t["sub"].clone()),
        (json!(alice_id), json!(true), json!("r"))
    );
    assert_eq!(t["expires_in"], 30);
    // A new watcher learns who is typing now.
    let mut b2 = connect(&app, &bob).await;
    subscribe(&mut b2, "r2", &format!("room:{r}"), None).await;
    assert_eq!(
        next_of(&mut b2, "typing").await["user_ids"],
        json!([alice_id])
    );
    // Carol may not type into a room she is not in.
    send(&mut c, json!({"type": "typing", "room_id": r})).await;
    assert_eq!(next_of(&mut c, "error").await["code"], "room_not_found");

    // Assistant chunks published on live.<room>.ai stream out in order.
    for (seq, delta) in ["Ferry ", "leaves ", "at 7."].iter().enumerate() {
        app.nats
            .publish(
                format!("{}.live.{r}.ai", app.subjects.prefix()),
                json!({"request_id": "q1", "seq": seq, "delta": delta, "done": seq == 2})
                    .to_string()
                    .into(),
            )
            .await
            .unwrap();
    }
    let mut text = String::new();
    loop {
        let f = next_of(&mut b, "ai_stream_chunk").await;
        assert_eq!(f["room_id"], json!(r));
        text.push_str(f["delta"].as_str().unwrap());
        if f["done"] == true {
            break;
        }
    }
    assert_eq!(text, "Ferry leaves at 7.");

    // Presence over REST: only people who share a room.
    let seen = app
        .get(
            &format!("/v1/presence?user_ids={alice_id},{carol_id}"),
            Some(&bob),
        )
        .await;
    assert_eq!(seen.status, 200, "{}", seen.body);
    assert_eq!(seen.body.as_array().unwrap().len(), 1);
    assert_eq!(seen.body[0]["status"], "online");
    assert_eq!(seen.body[0]["connections"], 1);
    send(&mut a, json!({"type": "presence", "status": "away"})).await;
    assert_eq!(
        next_about(&mut b, "presence", alice_id).await["status"],
        "away"
    );
    drop(a);
    assert_eq!(
        next_about(&mut b, "presence", alice_id).await["status"],
        "offline"
    );

    // Carol saw nothing of Alice's room.
    send(&mut c, json!({"type": "ping"})).await;
    loop {
        let f = next(&mut c).await;
        if f["type"] == "pong" {
            break;
        }
        assert_ne!(
            f["room_id"],
            json!(r),
            "a signal of a room Carol is not in: {f}"
        );
        assert_ne!(f["user_id"], json!(alice_id), "{f}");
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sync_long_polls_with_the_sockets_cursors_and_a_second_gateway_serves_the_same() {
    let app = TestApp::spawn().await;
    let (_, alice) = app.user("alice@example.com").await;
    let (bob_id, bob) = app.user("bob@example.com").await;
    let r = room(&app, &alice, "Sync", "private").await;
    invite_and_join(&app, &alice, r, bob_id, &bob).await;
    // The poll picks the rooms it watches from the chat model's members when
    // it starts: Bob's join must be there, not only in the feed.
    app.settle("chat").await;
    app.settle("feed").await;
    let start = start_cursor(&app, &bob).await;
    let poll = {
        let (base, token, start) = (app.base.clone(), bob.clone(), start.clone());
        tokio::spawn(async move {
            reqwest::Client::new()
                .get(format!("{base}/v1/sync?since={start}&timeout_ms=20000"))
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The feed moves for something Bob cannot see: the poll must keep waiting.
    room(&app, &alice, "Not Bob's", "private").await;
    app.settle("feed").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !poll.is_finished(),
        "a long poll ended before anything of Bob's arrived"
    );
    let (m, _) = say(&app, &alice, r, "hello over sync").await;
    let page = poll.await.unwrap();
    assert_eq!(page["recovered"], true);
    let posted: Vec<&Value> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["kind"] == "MessagePosted")
        .collect();
    assert_eq!(posted.len(), 1, "{page}");
    assert_eq!(posted[0]["data"]["message_id"], json!(m));
    assert_eq!(posted[0]["data"]["body"], "hello over sync");
    let next_cursor = page["next"].as_str().unwrap().to_owned();
    let empty = app
        .get(
            &format!("/v1/sync?since={next_cursor}&timeout_ms=0"),
            Some(&bob),
        )
        .await;
    assert_eq!(empty.body["items"], json!([]));
    app.get("/v1/sync?timeout_ms=99999", Some(&bob))
        .await
        .assert_problem(422, "invalid_input");

    // A second gateway of the same backend: the same cursor resumes there.
    let (base2, stop, second) = app.second_gateway().await;
    let mut ws = connect_to(&base2, &bob).await;
    let sub = subscribe(&mut ws, "r", &format!("room:{r}"), Some(&start)).await;
    assert_eq!(sub["recovered"], true, "{sub}");
    let replayed = next_of(&mut ws, "event").await;
    assert_eq!(replayed["data"]["message_id"], json!(m));
    // Live on the second gateway too.
    let (m2, _) = say(&app, &alice, r, "and live").await;
    let live = next_of(&mut ws, "event").await;
    assert_eq!(live["data"]["message_id"], json!(m2));
    assert_eq!(live["data"]["body"], "and live");
    let (_, online) = presence_of(&app, &alice, bob_id).await;
    assert_eq!(online, "online");

    // The second gateway stops: Bob's socket is closed with 1001 and he leaves no ghost.
    stop.cancel();
    let closed = loop {
        let f = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("a close within 10 s")
            .expect("a close frame");
        if f.opcode() == OpCode::Close {
            break f;
        }
    };
    assert_eq!(u16::from(closed.close_code().unwrap()), 1001);
    let _ = second.await;
    let (_, gone) = presence_of(&app, &alice, bob_id).await;
    assert_eq!(gone, "offline");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_user_stream_carries_unread_counts_mentions_invitations_and_wallet_movements() {
    let app = TestApp::spawn().await;
    let (_, alice) = app.user("alice@example.com").await;
    let (bob_id, bob) = app.user("bob@example.com").await;
    let r = room(&app, &alice, "Counts", "private").await;
    invite_and_join(&app, &alice, r, bob_id, &bob).await;
    app.settle("chat").await;
    let mut b = connect(&app, &bob).await;
    let sub = subscribe(&mut b, "me", "user", None).await;
    assert_eq!(sub["recovered"], true);
    let first = next_of(&mut b, "unread").await;
    assert_eq!(
        (first["room_id"].clone(), first["unread"].clone()),
        (json!(r), json!(0))
    );

    for text in ["one", "two"] {
        say(&app, &alice, r, text).await;
    }
    let mention = app
        .post(
            &format!("/v1/rooms/{r}/messages"),
            Some(&alice),
            &json!({"body": "three, @bob", "mentions": [bob_id]}),
            &[],
        )
        .await;
    assert_eq!(mention.status, 201);
    let last = id(&mention.body["message_id"]);
    // The mention arrives as an event of Bob's own stream...
    let m = next_of(&mut b, "event").await;
    assert_eq!(
        (m["kind"].clone(), m["data"]["message_id"].clone()),
        (json!("MessagePosted"), json!(last))
    );
    // ...and the counts settle at 3 unread, 1 mention (coalesced: maybe fewer frames).
    loop {
        let u = next_of(&mut b, "unread").await;
        if u["unread"] == 3 {
            assert_eq!(u["mentions"], 1);
            break;
        }
    }
    let read = app
        .post(
            &format!("/v1/rooms/{r}/receipts"),
            Some(&bob),
            &json!({"message_id": last}),
            &[],
        )
        .await;
    assert_eq!(read.status, 200, "{}", read.body);
    let receipt = next_of(&mut b, "event").await;
    assert_eq!(receipt["kind"], "ReceiptMoved");
    loop {
        if next_of(&mut b, "unread").await["unread"] == 0 {
            break;
        }
    }

    // Invitations and wallet movements come on the same stream.
    let other = room(&app, &alice, "Another", "private").await;
    let inv = app
        .post(
            &format!("/v1/rooms/{other}/invites"),
            Some(&alice),
            &json!({"user_id": bob_id}),
            &[],
        )
        .await;
    assert_eq!(inv.status, 201);
    let invited = next_of(&mut b, "event").await;
    assert_eq!(
        (invited["kind"].clone(), invited["data"]["room_id"].clone()),
        (json!("MemberInvited"), json!(other))
    );
    let (_, admin) = app.admin().await;
    app.funded_wallet(&bob, &admin, 700).await;
    let mut kinds = vec![];
    while !kinds.contains(&"Credited".to_owned()) {
        let e = next_of(&mut b, "event").await;
        kinds.push(e["kind"].as_str().unwrap().to_owned());
        if e["kind"] == "Credited" {
            assert_eq!(e["data"]["amount"], 700);
        }
    }
    assert_eq!(kinds, ["AccountOpened", "Credited"]);
    app.stop().await;
}
