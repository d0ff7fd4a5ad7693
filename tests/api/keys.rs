//! Master key rotation (`mathia keys rotate-master`): the keystore moves to the
//! new key in one transaction, what it sealed stays readable, and a rerun is harmless.

use commands::crypto::Key;
use handlers::keystore::Keystore;
use handlers::master_key;
use mathia_tests::TestApp;
use serde_json::{Value, json};
use uuid::Uuid;

/// `POST /v1/rooms/{room}/keys/rotate` as `token` (the owner); asserts 200.
pub(crate) async fn rotate_room_key(app: &TestApp, token: &str, room: Uuid) {
    let r = app
        .post(
            &format!("/v1/rooms/{room}/keys/rotate"),
            Some(token),
            &json!({}),
            &[],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
}

/// Register a webhook endpoint at `url` for `notify.*`; asserts 201, returns the answer (with its secret).
pub(crate) async fn register_webhook(app: &TestApp, token: &str, url: &str) -> Value {
    let r = app
        .post(
            "/v1/webhooks",
            Some(token),
            &json!({"url": url, "filter": ["notify.*"]}),
            &[],
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    r.body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_the_master_key_rewraps_every_room_key_and_webhook_secret() {
    let app = TestApp::spawn().await;
    let (_, alice) = app.user("alice@test.local").await;
    let room = super::chat::room(&app, &alice, "ops", "private").await;
    super::chat::say(&app, &alice, room, "before the rotation").await;
    rotate_room_key(&app, &alice, room).await;
    let hook = register_webhook(&app, &alice, "http://127.0.0.1:9/hook").await;
    let endpoint: Uuid = hook["webhook_id"].as_str().unwrap().parse().unwrap();
    let secret = hook["secret"].as_str().unwrap().to_owned();
    // Every role stops before a rotation (the runbook's first step).
    let groups = std::mem::take(&mut *app.roles.lock().unwrap());
    for g in &groups {
        g.shutdown.cancel();
    }
    for g in groups {
        let _ = g.task.await;
    }

    let encoded = app.config.master_key.clone().unwrap();
    let old = mathia::decode_master_key(&encoded, "old").unwrap();
    let new = Key::random();
    let (before_old, before_new) = (Keystore::new(old.clone()), Keystore::new(new.clone()));
    let keys = before_old
        .room_keys(&app.pool, room)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(keys.version, 2);
    assert!(
        before_new
            .room_keys(&app.pool, room)
            .await
            .unwrap()
            .is_none()
    );

    // A wrong "old" key changes nothing.
    let wrong = Key::random();
    assert!(master_key::rotate(&app.pool, &wrong, &new).await.is_err());
    assert!(
        before_old
            .room_keys(&app.pool, room)
            .await
            .unwrap()
            .is_some()
    );

    let done = master_key::rotate(&app.pool, &old, &new).await.unwrap();
    assert_eq!(
        (done.room_keys, done.webhook_secrets, done.already_new),
        (2, 1, 0),
        "{done:?}"
    );
    let after = Keystore::new(new.clone());
    let reopened = after
        .room_keys(&app.pool, room)
        .await
        .unwrap()
        .expect("opens with the new key");
    assert_eq!(reopened.version, 2);
    assert_eq!(
        reopened.current.as_bytes(),
        keys.current.as_bytes(),
        "the room key itself is unchanged"
    );
    assert_eq!(reopened.search.as_bytes(), keys.search.as_bytes());
    assert!(
        before_old
            .room_keys(&app.pool, room)
            .await
            .unwrap()
            .is_none(),
        "the old key opens nothing"
    );
    let mut conn = app.pool.acquire().await.unwrap();
    let opened = after
        .webhook_secret(&mut conn, endpoint)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(opened, secret.as_bytes());
    assert!(
        before_old
            .webhook_secret(&mut conn, endpoint)
            .await
            .unwrap()
            .is_none()
    );
    drop(conn);

    // A second run (an operator unsure whether the first finished) is harmless.
    let again = master_key::rotate(&app.pool, &old, &new).await.unwrap();
    assert_eq!(
        (again.room_keys, again.webhook_secrets, again.already_new),
        (0, 0, 3)
    );

    // (Message keys are wrapped by the room key, which is unchanged, so every
    // message sealed before the rotation opens as before.)
    app.stop().await;
}
