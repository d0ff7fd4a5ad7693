//! Reminders, the scheduler and notifications through the HTTP API and the
//! WebSocket, against real services.

use std::time::Duration;

use chrono::{DateTime, Timelike, Utc};
use mathia::Roles;
use mathia_tests::TestApp;
use serde_json::{Value, json};
use uuid::Uuid;

use super::chat::id;

async fn set(app: &TestApp, token: &str, body: Value) -> mathia_tests::Reply {
    app.post("/v1/reminders", Some(token), &body, &[]).await
}

/// Poll `path` until `done` holds of its body.
async fn eventually(
    app: &TestApp,
    path: &str,
    token: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    for _ in 0..600 {
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
async fn a_reminder_rings_once_on_time_and_lands_in_the_inbox() {
    let app = TestApp::spawn_with(Roles::ALL, |c| c.reminders_per_12h = 2).await;
    let (_, alice) = app.user("alice@example.com").await;
    let (_, eve) = app.user("eve@example.com").await;

    // Bad input writes nothing.
    let events = app.count("events").await;
    for (body, field) in [
        (
            json!({"content": "x", "in": "10m", "due_at": "2030-01-01T00:00:00Z"}),
            "due_at",
        ),
        (json!({"content": "x", "in": "ten minutes"}), "in"),
        (
            json!({"content": "x", "in": "10m", "zone": "Mars/Olympus"}),
            "zone",
        ),
    ] {
        let r = set(&app, &alice, body).await;
        r.assert_problem(422, "invalid_input");
        assert_eq!(r.body["errors"][0]["field"], field, "{}", r.body);
    }
    set(
        &app,
        &alice,
        json!({"content": "past", "due_at": "2020-01-01T00:00:00Z"}),
    )
    .await
    .assert_problem(422, "invalid_input");
    set(&app, &alice, json!({"content": "", "in": "10m"}))
        .await
        .assert_problem(422, "invalid_input");
    assert_eq!(app.count("events").await, events);

    let r = set(
        &app,
        &alice,
        json!({"content": "Call John", "in": "2s", "priority": "high"}),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let rid = id(&r.body["reminder_id"]);
    let due: DateTime<Utc> = serde_json::from_value(r.body["due_at"].clone()).unwrap();
    let path = format!("/v1/reminders/{rid}");
    app.get(&path, Some(&eve))
        .await
        .assert_problem(404, "reminder_not_found");

    // It rings: the inbox has it, and the reminder is done.
    let inbox = eventually(&app, "/v1/notifications", &alice, |b| b["unread"] == 1).await;
    let n = &inbox["items"][0];
    assert_eq!(
        (n["category"].clone(), n["title"].clone()),
        (json!("task"), json!("Call John"))
    );
    assert_eq!(n["link"], format!("reminder:{rid}"));
    let done = eventually(&app, &path, &alice, |b| b["status"] == "done").await;
    assert_eq!(done["fired"], 1);
    let fired_at: DateTime<Utc> =
        sqlx::query_scalar("SELECT last_fired_at FROM proj_reminders WHERE reminder_id = $1")
            .bind(rid)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    let late = fired_at - due;
    assert!(
        late >= chrono::Duration::zero() && late < chrono::Duration::seconds(1),
        "fired {late} after its time"
    );
    let fired: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = 'ReminderFired'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(fired, 1);

    // Read it; snooze and cancel a second one; the quota says when it resets.
    let read = app
        .post(
            "/v1/notifications/read",
            Some(&alice),
            &json!({"all": true}),
            &[],
        )
        .await;
    assert_eq!(read.status, 200, "{}", read.body);
    eventually(&app, "/v1/notifications?unread=true", &alice, |b| {
        b["unread"] == 0 && b["items"] == json!([])
    })
    .await;
    let daily = set(
        &app,
        &alice,
        json!({"content": "Stand-up", "local": "2030-04-02T09:00:00", "zone": "Europe/London", "recurrence": "daily"}),
    )
    .await;
    assert_eq!(daily.status, 201, "{}", daily.body);
    assert_eq!(daily.body["due_at"], "2030-04-02T08:00:00Z", "09:00 BST");
    let d = id(&daily.body["reminder_id"]);
    let snooze = app
        .post(
            &format!("/v1/reminders/{d}/snooze"),
            Some(&alice),
            &json!({"minutes": 15}),
            &[],
        )
        .await;
    assert_eq!(snooze.status, 200, "{}", snooze.body);
    app.post(
        &format!("/v1/reminders/{d}/snooze"),
        Some(&eve),
        &json!({"minutes": 15}),
        &[],
    )
    .await
    .assert_problem(404, "reminder_not_found");
    let cancel = app
        .call(
            "DELETE",
            &format!("/v1/reminders/{d}"),
            Some(&alice),
            None,
            &[],
        )
        .await;
    assert_eq!(cancel.status, 200, "{}", cancel.body);
    app.call(
        "DELETE",
        &format!("/v1/reminders/{d}"),
        Some(&alice),
        None,
        &[],
    )
    .await
    .assert_problem(409, "reminder_cancelled");
    let over = set(&app, &alice, json!({"content": "one too many", "in": "1h"})).await;
    over.assert_problem(429, "rate_limited");
    assert!(over.header("retry-after").is_some());
    let list = eventually(&app, "/v1/reminders", &alice, |b| {
        b["items"].as_array().unwrap().len() == 2
    })
    .await;
    assert_eq!(list["items"][1]["status"], "cancelled");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_reminders_due_in_one_second_fire_once_each_with_two_schedulers_one_killed() {
    let app = TestApp::spawn_with(
        Roles {
            scheduler: false,
            ..Roles::ALL
        },
        |c| c.reminders_per_12h = 0,
    )
    .await;
    let (_, alice) = app.user("alice@example.com").await;
    const N: usize = 1000;
    // Whole seconds, as reminders are kept.
    let due = (Utc::now() + chrono::Duration::seconds(30))
        .with_nanosecond(0)
        .unwrap();
    let mut set_all = vec![];
    for s in 0..16 {
        let (base, token) = (app.base.clone(), alice.clone());
        set_all.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            for i in (s..N).step_by(16) {
                let r = http
                    .post(format!("{base}/v1/reminders"))
                    .bearer_auth(&token)
                    .json(&json!({"content": format!("r{i}"), "due_at": due}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 201);
            }
        }));
    }
    for t in set_all {
        t.await.unwrap();
    }
    assert!(
        Utc::now() < due,
        "setting up took too long for the test to mean anything"
    );
    app.settle("reminders").await;
    let scheduler = Roles {
        gateway: false,
        handlers: false,
        relay: false,
        projections: false,
        scheduler: true,
    };
    let first = app.start(scheduler);
    let _second = app.start(scheduler);
    // Kill one scheduler in the middle of the due second.
    let wait = (due - Utc::now()).to_std().unwrap_or_default() + Duration::from_millis(150);
    tokio::time::sleep(wait).await;
    app.crash(first).await;

    for _ in 0..400 {
        let fired: i64 =
            sqlx::query_scalar("SELECT count(*) FROM proj_reminders WHERE status = 'done'")
                .fetch_one(&app.pool)
                .await
                .unwrap();
        if fired as usize == N {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    // Give a straggler every chance to fire twice.
    tokio::time::sleep(Duration::from_secs(1)).await;
    app.settle("reminders").await;
    let (events, distinct): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT stream_id) FROM events WHERE event_type = 'ReminderFired'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!((events, distinct), (N as i64, N as i64), "each once");
    let notes: i64 = sqlx::query_scalar("SELECT count(*) FROM proj_notifications")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(notes, N as i64);
    let late: Vec<f64> = sqlx::query_scalar(
        "SELECT extract(epoch FROM last_fired_at - $1)::float8 FROM proj_reminders ORDER BY 1",
    )
    .bind(due)
    .fetch_all(&app.pool)
    .await
    .unwrap();
    let p99 = late[(late.len() * 99) / 100 - 1];
    assert!(late[0] >= 0.0, "none early");
    assert!(p99 <= 1.0, "p99 lateness {p99:.3} s");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_room_reminder_posts_as_its_owner_and_a_restart_after_its_time_still_fires_it() {
    let app = TestApp::spawn_with(
        Roles {
            scheduler: false,
            ..Roles::ALL
        },
        |_| {},
    )
    .await;
    let (alice_id, alice) = app.user("alice@example.com").await;
    let room = super::chat::room(&app, &alice, "Team", "private").await;
    app.settle("chat").await;
    let r = set(
        &app,
        &alice,
        json!({"content": "Ship it", "in": "1s", "room_id": room}),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let stranger_room = set(
        &app,
        &alice,
        json!({"content": "x", "in": "1s", "room_id": Uuid::now_v7()}),
    )
    .await;
    stranger_room.assert_problem(404, "room_not_found");
    // No scheduler while it falls due; one starts two seconds late.
    tokio::time::sleep(Duration::from_secs(3)).await;
    app.start(Roles {
        gateway: false,
        handlers: false,
        relay: false,
        projections: false,
        scheduler: true,
    });
    let page = eventually(&app, &format!("/v1/rooms/{room}/messages"), &alice, |b| {
        b["items"].as_array().is_some_and(|i| !i.is_empty())
    })
    .await;
    assert_eq!(page["items"][0]["body"], "⏰ Reminder: Ship it");
    assert_eq!(
        page["items"][0]["sender"],
        json!(alice_id),
        "posted with the owner's authority"
    );
    eventually(&app, "/v1/notifications", &alice, |b| b["unread"] == 1).await;
    app.stop().await;
}
