//! Attachments and voice notes through the HTTP API: upload (sealed at rest,
//! members only, size limit, daily quota), send, timeline metadata, download,
//! and redaction that leaves the bytes unrecoverable.

use std::path::{Path, PathBuf};

use mathia_tests::{Reply, TestApp};
use rand::RngExt;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;

fn id(v: &Value) -> Uuid {
    v.as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not a uuid: {v}"))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

async fn room(app: &TestApp, token: &str) -> Uuid {
    let r = app
        .post("/v1/rooms", Some(token), &json!({"name": "Files"}), &[])
        .await;
    assert_eq!(r.status, 201, "create room: {}", r.body);
    id(&r.body["room_id"])
}

async fn invite_and_join(app: &TestApp, owner: &str, room: Uuid, user: Uuid, token: &str) {
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

async fn reply(res: reqwest::Response) -> Reply {
    let status = res.status().as_u16();
    let headers = res.headers().clone();
    let bytes = res.bytes().await.unwrap_or_default();
    Reply {
        status,
        headers,
        body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    }
}

async fn upload(
    app: &TestApp,
    token: &str,
    room: Uuid,
    content_type: Option<&str>,
    bytes: Vec<u8>,
) -> Reply {
    // Membership is read from the read model: let it catch up with the room's creation.
    app.settle("chat").await;
    let mut req = app
        .http
        .post(format!("{}/v1/rooms/{room}/uploads", app.base))
        .bearer_auth(token)
        .body(bytes);
    if let Some(ct) = content_type {
        req = req.header("content-type", ct);
    }
    reply(req.send().await.expect("upload")).await
}

async fn send(app: &TestApp, token: &str, room: Uuid, body: Value) -> Reply {
    app.post(
        &format!("/v1/rooms/{room}/messages"),
        Some(token),
        &body,
        &[],
    )
    .await
}

/// (status, headers, bytes) of a download.
async fn download(
    app: &TestApp,
    token: &str,
    room: Uuid,
    message: Uuid,
    after: i64,
) -> (u16, reqwest::header::HeaderMap, Vec<u8>) {
    let res = app
        .http
        .get(format!(
            "{}/v1/rooms/{room}/messages/{message}/attachment?after_position={after}",
            app.base
        ))
        .bearer_auth(token)
        .send()
        .await
        .expect("download");
    let status = res.status().as_u16();
    let headers = res.headers().clone();
    (
        status,
        headers,
        res.bytes().await.unwrap_or_default().to_vec(),
    )
}

/// Every file under the test's upload directory (temporary ones included).
fn stored_files(app: &TestApp) -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else {
                out.push(p);
            }
        }
    }
    let mut out = vec![];
    walk(&app.config.upload_dir, &mut out);
    out
}

async fn uploads_rows(app: &TestApp) -> i64 {
    app.count("chat_uploads").await
}

/// Rows of any table whose text contains `needle`.
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

/// Random bytes with a recognisable plaintext marker every 4 KiB.
fn file_bytes(len: usize) -> Vec<u8> {
    let mut rng = rand::rng();
    let mut b: Vec<u8> = (0..len).map(|_| rng.random()).collect();
    for at in (0..len.saturating_sub(32)).step_by(4096) {
        b[at..at + 24].copy_from_slice(b"PLAINTEXT-MARKER-7731-ok");
    }
    b
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_attachment_is_sealed_on_disk_shown_in_the_timeline_and_downloads_the_same_bytes() {
    let app = TestApp::spawn().await;
    let (_, alice) = app.user("alice@test.local").await;
    let (bob_id, bob) = app.user("bob@test.local").await;
    let r = room(&app, &alice).await;
    invite_and_join(&app, &alice, r, bob_id, &bob).await;

    let data = file_bytes(200 * 1024 + 123);
    let u = upload(&app, &alice, r, Some("application/pdf"), data.clone()).await;
    assert_eq!(u.status, 201, "{}", u.body);
    assert_eq!(u.body["size"], data.len() as i64);
    assert_eq!(u.body["sha256"], hex(&Sha256::digest(&data)));
    assert_eq!(u.body["content_type"], "application/pdf");
    let upload_id = id(&u.body["upload_id"]);
    let key = u.body["storage_key"].as_str().unwrap().to_owned();
    // On disk: one file, bigger than the plaintext (record overhead), with none of it in clear.
    let files = stored_files(&app);
    assert_eq!(files.len(), 1, "{files:?}");
    assert_eq!(files[0], app.config.upload_dir.join(&key));
    let on_disk = std::fs::read(&files[0]).unwrap();
    assert!(on_disk.len() > data.len());
    assert!(!contains(&on_disk, b"PLAINTEXT-MARKER"));
    assert!(!contains(&on_disk, &data[100..140]));

    let sent = json!({"client_message_id": "file-1",
        "attachment": {"upload_id": upload_id, "name": "zanzibar-itinerary.pdf"}});
    let s = send(&app, &alice, r, sent.clone()).await;
    assert_eq!(s.status, 201, "{}", s.body);
    assert_eq!(s.body["kind"], "attachment");
    let m = id(&s.body["message_id"]);
    // The same send again (a client retry) is the same message, not a conflict.
    let again = send(&app, &alice, r, sent).await;
    assert_eq!(again.status, 201, "{}", again.body);
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(id(&again.body["message_id"]), m);
    let pos = s.body["position"].as_i64().unwrap();

    let t = app
        .get(
            &format!("/v1/rooms/{r}/messages?after_position={pos}"),
            Some(&bob),
        )
        .await;
    assert_eq!(t.status, 200, "{}", t.body);
    let item = &t.body["items"][0];
    assert_eq!(item["kind"], "attachment");
    assert_eq!(item["body"], "");
    let a = &item["attachment"];
    assert_eq!(a["name"], "zanzibar-itinerary.pdf", "{item}");
    assert_eq!(a["content_type"], "application/pdf");
    assert_eq!(a["size"], data.len() as i64);
    assert_eq!(a["sha256"], hex(&Sha256::digest(&data)));
    assert!(a["duration_ms"].is_null() && a["transcript"].is_null());
    assert_eq!(
        a["download"],
        format!("/v1/rooms/{r}/messages/{m}/attachment")
    );

    let (status, headers, got) = download(&app, &bob, r, m, pos).await;
    assert_eq!(status, 200);
    assert_eq!(got, data, "the downloaded bytes differ");
    assert_eq!(headers["content-type"], "application/pdf");
    assert_eq!(headers["x-content-type-options"], "nosniff");
    assert!(
        headers["content-disposition"]
            .to_str()
            .unwrap()
            .contains("zanzibar-itinerary.pdf")
    );

    // The file name rests nowhere in clear; the upload's own key copy is gone.
    assert_eq!(
        rows_containing(&app, "zanzibar").await,
        Vec::<String>::new()
    );
    let (wrapped, bound): (Option<Vec<u8>>, Option<Uuid>) =
        sqlx::query_as("SELECT wrapped_key, message_id FROM chat_uploads WHERE upload_id = $1")
            .bind(upload_id)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert!(
        wrapped.is_none(),
        "the room-key copy of the file key survived the send"
    );
    assert_eq!(bound, Some(m));

    // An upload goes out with one message only.
    send(
        &app,
        &alice,
        r,
        json!({"body": "again", "attachment": {"upload_id": upload_id, "name": "x.pdf"}}),
    )
    .await
    .assert_problem(409, "upload_already_sent");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn strangers_get_404_on_upload_download_and_others_uploads_and_nothing_is_stored() {
    let app = TestApp::spawn().await;
    let (_, alice) = app.user("alice@test.local").await;
    let (bob_id, bob) = app.user("bob@test.local").await;
    let (_, eve) = app.user("eve@test.local").await;
    let r = room(&app, &alice).await;
    invite_and_join(&app, &alice, r, bob_id, &bob).await;
    let eves = room(&app, &eve).await;

    for target in [r, Uuid::now_v7()] {
        upload(&app, &eve, target, Some("image/png"), file_bytes(1000))
            .await
            .assert_problem(404, "room_not_found");
    }
    assert!(stored_files(&app).is_empty(), "{:?}", stored_files(&app));
    assert_eq!(uploads_rows(&app).await, 0);

    let u = upload(&app, &alice, r, Some("image/png"), file_bytes(1000)).await;
    assert_eq!(u.status, 201, "{}", u.body);
    let upload_id = u.body["upload_id"].clone();
    let s = send(
        &app,
        &alice,
        r,
        json!({"body": "look", "attachment": {"upload_id": upload_id, "name": "a.png"}}),
    )
    .await;
    assert_eq!(s.status, 201, "{}", s.body);
    let m = id(&s.body["message_id"]);
    let pos = s.body["position"].as_i64().unwrap();
    let (status, _, body) = download(&app, &eve, r, m, pos).await;
    assert_eq!(status, 404);
    assert_eq!(
        serde_json::from_slice::<Value>(&body).unwrap()["code"],
        "room_not_found"
    );

    // Someone else's upload, or an upload of another room, cannot be sent.
    let u2 = upload(&app, &alice, r, Some("image/png"), file_bytes(10)).await;
    assert_eq!(u2.status, 201);
    let before = app.count("events").await;
    send(
        &app,
        &bob,
        r,
        json!({"attachment": {"upload_id": u2.body["upload_id"], "name": "b.png"}}),
    )
    .await
    .assert_problem(404, "upload_not_found");
    send(
        &app,
        &eve,
        eves,
        json!({"attachment": {"upload_id": u2.body["upload_id"], "name": "b.png"}}),
    )
    .await
    .assert_problem(404, "upload_not_found");
    send(
        &app,
        &alice,
        r,
        json!({"attachment": {"upload_id": Uuid::now_v7(), "name": "b.png"}}),
    )
    .await
    .assert_problem(404, "upload_not_found");
    assert_eq!(app.count("events").await, before);
    app.stop().await;
}

/// A chunked upload without Content-Length, over a raw socket; returns the status.
async fn chunked_upload(app: &TestApp, token: &str, room: Uuid, total: usize) -> u16 {
    let addr = app.base.trim_start_matches("http://");
    app.settle("chat").await;
    let mut sock = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /v1/rooms/{room}/uploads HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: audio/ogg\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    );
    sock.write_all(head.as_bytes()).await.unwrap();
    let chunk = vec![b'a'; 16 * 1024];
    let mut sent = 0;
    while sent < total {
        let frame = [
            format!("{:x}\r\n", chunk.len()).into_bytes(),
            chunk.clone(),
            b"\r\n".to_vec(),
        ]
        .concat();
        // The server may answer (and stop reading) before the end.
        if sock.write_all(&frame).await.is_err() {
            break;
        }
        sent += chunk.len();
    }
    let _ = sock.write_all(b"0\r\n\r\n").await;
    let mut buf = vec![];
    let _ = sock.read_to_end(&mut buf).await;
    let text = String::from_utf8_lossy(&buf);
    text.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {text:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upload_over_the_limit_gets_413_and_nothing_is_kept() {
    let app = TestApp::spawn_with(mathia::Roles::ALL, |c| c.upload_max_bytes = 100_000).await;
    let (_, alice) = app.user("alice@test.local").await;
    let r = room(&app, &alice).await;
    // Declared too large: refused before a byte is read.
    upload(&app, &alice, r, Some("audio/ogg"), vec![0u8; 100_001])
        .await
        .assert_problem(413, "payload_too_large");
    // Streamed without a length: refused when the limit is crossed.
    assert_eq!(chunked_upload(&app, &alice, r, 300_000).await, 413);
    // No type: 415.
    upload(&app, &alice, r, None, vec![1u8; 10])
        .await
        .assert_problem(415, "unsupported_media_type");
    assert!(stored_files(&app).is_empty(), "{:?}", stored_files(&app));
    assert_eq!(uploads_rows(&app).await, 0);
    // Exactly the limit is fine, streamed or not.
    let u = upload(&app, &alice, r, Some("audio/ogg"), vec![7u8; 100_000]).await;
    assert_eq!(u.status, 201, "{}", u.body);
    assert_eq!(chunked_upload(&app, &alice, r, 16 * 1024 * 3).await, 201);
    assert_eq!(stored_files(&app).len(), 2);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_voice_note_must_be_audio_with_a_sane_duration_and_shows_its_transcript() {
    let app = TestApp::spawn().await;
    let (_, alice) = app.user("alice@test.local").await;
    let r = room(&app, &alice).await;
    let text = upload(&app, &alice, r, Some("text/plain"), b"not audio".to_vec()).await;
    assert_eq!(text.status, 201);
    let audio = upload(
        &app,
        &alice,
        r,
        Some("audio/ogg; codecs=opus"),
        file_bytes(5000),
    )
    .await;
    assert_eq!(audio.status, 201, "{}", audio.body);
    let (tid, aid) = (
        text.body["upload_id"].clone(),
        audio.body["upload_id"].clone(),
    );
    let before = app.count("events").await;
    let refused: Vec<(Value, u16, &str)> = vec![
        (
            json!({"upload_id": tid, "name": "v.ogg", "duration_ms": 1000}),
            422,
            "invalid_input",
        ),
        (
            json!({"upload_id": aid, "name": "v.ogg", "duration_ms": 0}),
            422,
            "invalid_input",
        ),
        (
            json!({"upload_id": aid, "name": "v.ogg", "duration_ms": 3_600_001}),
            422,
            "invalid_input",
        ),
        (
            json!({"upload_id": aid, "name": "x".repeat(256), "duration_ms": 10}),
            422,
            "invalid_input",
        ),
        (
            json!({"upload_id": aid, "name": "", "duration_ms": 10}),
            422,
            "invalid_input",
        ),
        (
            json!({"upload_id": aid, "name": "a\u{0}b", "duration_ms": 10}),
            400,
            "malformed_request",
        ),
        (
            json!({"upload_id": aid, "name": "v.ogg", "duration_ms": 10, "transcript": "t".repeat(16 * 1024 + 1)}),
            422,
            "invalid_input",
        ),
        (
            json!({"upload_id": aid, "name": "v.ogg", "transcript": "no duration"}),
            422,
            "invalid_input",
        ),
        (
            json!({"upload_id": aid, "name": "v.ogg", "content_type": "audio/mpeg"}),
            422,
            "invalid_input",
        ),
        (
            json!({"upload_id": aid, "name": "v.ogg", "path": "../../etc"}),
            400,
            "malformed_request",
        ),
    ];
    for (attachment, status, code) in refused {
        send(&app, &alice, r, json!({"attachment": attachment}))
            .await
            .assert_problem(status, code);
    }
    assert_eq!(
        app.count("events").await,
        before,
        "a refused send wrote something"
    );

    let s = send(
        &app,
        &alice,
        r,
        json!({"attachment": {"upload_id": aid, "name": "memo.ogg", "duration_ms": 4200,
            "transcript": "meet at the jetty quindecim"}}),
    )
    .await;
    assert_eq!(s.status, 201, "{}", s.body);
    assert_eq!(s.body["kind"], "voice");
    let m = id(&s.body["message_id"]);
    let pos = s.body["position"].as_i64().unwrap();
    let g = app
        .get(
            &format!("/v1/rooms/{r}/messages/{m}?after_position={pos}"),
            Some(&alice),
        )
        .await;
    assert_eq!(g.status, 200, "{}", g.body);
    assert_eq!(g.body["kind"], "voice");
    assert_eq!(g.body["attachment"]["duration_ms"], 4200);
    assert_eq!(
        g.body["attachment"]["transcript"],
        "meet at the jetty quindecim"
    );
    assert_eq!(
        g.body["attachment"]["content_type"],
        "audio/ogg; codecs=opus"
    );
    assert_eq!(
        rows_containing(&app, "quindecim").await,
        Vec::<String>::new()
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn after_redaction_the_attachment_is_404_and_nothing_opens_its_bytes() {
    let app = TestApp::spawn().await;
    let (_, alice) = app.user("alice@test.local").await;
    let (bob_id, bob) = app.user("bob@test.local").await;
    let r = room(&app, &alice).await;
    invite_and_join(&app, &alice, r, bob_id, &bob).await;
    let data = file_bytes(70_000);
    let u = upload(&app, &alice, r, Some("audio/ogg"), data.clone()).await;
    assert_eq!(u.status, 201);
    let upload_id = id(&u.body["upload_id"]);
    let path = app
        .config
        .upload_dir
        .join(u.body["storage_key"].as_str().unwrap());
    let s = send(
        &app,
        &alice,
        r,
        json!({"attachment": {"upload_id": upload_id, "name": "secret-memo.ogg", "duration_ms": 900}}),
    )
    .await;
    assert_eq!(s.status, 201, "{}", s.body);
    let m = id(&s.body["message_id"]);
    let pos = s.body["position"].as_i64().unwrap();
    let (status, _, got) = download(&app, &bob, r, m, pos).await;
    assert_eq!((status, got == data), (200, true));
    let ciphertext = std::fs::read(&path).unwrap();
    // Once sent, the message key is the only way to the file key.
    let room_key_copies = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM chat_uploads WHERE upload_id = $1 AND wrapped_key IS NOT NULL",
        )
        .bind(upload_id)
        .fetch_one(&app.pool)
        .await
        .unwrap()
    };
    assert_eq!(room_key_copies().await, 0);

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
    let after = d.header("mathia-position").unwrap().parse::<i64>().unwrap();
    let (status, _, body) = download(&app, &bob, r, m, after).await;
    assert_eq!(status, 404);
    assert_eq!(
        serde_json::from_slice::<Value>(&body).unwrap()["code"],
        "attachment_not_found"
    );
    let g = app
        .get(
            &format!("/v1/rooms/{r}/messages/{m}?after_position={after}"),
            Some(&alice),
        )
        .await;
    assert!(
        g.body["attachment"].is_null() && g.body["redacted_at"].is_string(),
        "{}",
        g.body
    );
    // The message key is destroyed, and with it the only copy of the file key:
    // no upload row keeps one, and the ciphertext itself is gone from the store.
    let keys: i64 =
        sqlx::query_scalar("SELECT count(*) FROM chat_message_keys WHERE message_id = $1")
            .bind(m)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(keys, 0);
    assert_eq!(room_key_copies().await, 0);
    assert!(
        !path.exists(),
        "the redacted ciphertext is still in the store"
    );
    // Someone who kept a copy of the ciphertext holds only ciphertext.
    assert!(!contains(&ciphertext, b"PLAINTEXT-MARKER"));
    // The log still has the (sealed) post: erasure without rewriting history.
    let posted: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE event_type = 'MessagePosted' AND payload->'attachment' IS NOT NULL",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(posted, 1);
    // Deleting the room erases the keys of uploads it still had waiting.
    let waiting = upload(&app, &alice, r, Some("image/png"), file_bytes(100)).await;
    assert_eq!(waiting.status, 201);
    let d = app
        .call("DELETE", &format!("/v1/rooms/{r}"), Some(&alice), None, &[])
        .await;
    assert_eq!(d.status, 200, "{}", d.body);
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM chat_uploads WHERE room_id = $1")
        .bind(r)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(left, 0);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn uploads_past_the_daily_quota_get_429_naming_it() {
    let app = TestApp::spawn_with(mathia::Roles::ALL, |c| c.uploads_per_day = 2).await;
    let (_, alice) = app.user("alice@test.local").await;
    let r = room(&app, &alice).await;
    for _ in 0..2 {
        let u = upload(&app, &alice, r, Some("image/png"), file_bytes(100)).await;
        assert_eq!(u.status, 201, "{}", u.body);
    }
    let limited = upload(&app, &alice, r, Some("image/png"), file_bytes(100)).await;
    limited.assert_problem(429, "rate_limited");
    assert_eq!(limited.body["limit"], "uploads_per_day");
    assert!(limited.header("retry-after").is_some());
    assert_eq!(uploads_rows(&app).await, 2);
    assert_eq!(stored_files(&app).len(), 2);
    app.stop().await;
}
