//! Accounts: registration policy, login lockout, refresh rotation with reuse detection.

use mathia_tests::TestApp;
use serde_json::json;

#[tokio::test]
async fn registration_enforces_the_password_policy_and_unique_emails() {
    let app = TestApp::spawn().await;
    let r = app
        .post(
            "/v1/auth/register",
            None,
            &json!({"email": "a@test.local", "password": "short", "display_name": "A"}),
            &[],
        )
        .await;
    r.assert_problem(422, "invalid_input");
    assert!(
        r.body["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("at least 12 characters")
    );
    let r = app
        .post(
            "/v1/auth/register",
            None,
            &json!({"email": "a@test.local", "password": "Password123!", "display_name": "A"}),
            &[],
        )
        .await;
    assert!(
        r.body["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("common"),
        "{}",
        r.body
    );
    app.user("a@test.local").await;
    let r = app
        .post(
            "/v1/auth/register",
            None,
            &json!({"email": "A@Test.Local", "password": "Str0ng&Secret!", "display_name": "A"}),
            &[],
        )
        .await;
    r.assert_problem(409, "email_taken");
    let stored: String = sqlx::query_scalar("SELECT password_hash FROM users")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert!(
        stored.starts_with("$argon2id$"),
        "argon2id, never the password"
    );
    app.stop().await;
}

#[tokio::test]
async fn five_failed_logins_lock_the_account_and_every_failure_is_audited() {
    let app = TestApp::spawn().await;
    app.user("a@test.local").await;
    for _ in 0..5 {
        let r = app
            .post(
                "/v1/auth/login",
                None,
                &json!({"email": "a@test.local", "password": "Wrong&Secret1"}),
                &[],
            )
            .await;
        r.assert_problem(401, "unauthorized");
    }
    let r = app
        .post(
            "/v1/auth/login",
            None,
            &json!({"email": "a@test.local", "password": "Str0ng&Secret!"}),
            &[],
        )
        .await;
    r.assert_problem(429, "account_locked");
    assert!(r.body["retry_after"].as_i64().unwrap() > 800);
    let failures: i64 =
        sqlx::query_scalar("SELECT count(*) FROM audit_log WHERE action = 'login.failed'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(failures, 5);
    let leaked: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_log WHERE detail::text LIKE '%Secret%' OR subject LIKE '%Secret%'")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(leaked, 0);
    app.stop().await;
}

#[tokio::test]
async fn a_refresh_token_rotates_and_reusing_one_revokes_the_family() {
    let app = TestApp::spawn().await;
    app.user("a@test.local").await;
    let login = app
        .post(
            "/v1/auth/login",
            None,
            &json!({"email": "a@test.local", "password": "Str0ng&Secret!"}),
            &[],
        )
        .await;
    let first = login.body["refresh_token"].as_str().unwrap().to_owned();
    let r1 = app
        .post(
            "/v1/auth/refresh",
            None,
            &json!({"refresh_token": first}),
            &[],
        )
        .await;
    assert_eq!(r1.status, 200);
    let second = r1.body["refresh_token"].as_str().unwrap().to_owned();
    assert_ne!(first, second);
    let me = app
        .get("/v1/me", Some(r1.body["access_token"].as_str().unwrap()))
        .await;
    assert_eq!(
        (me.status, me.body["email"].as_str()),
        (200, Some("a@test.local"))
    );
    // A thief replays the first token: refused, and the whole family dies.
    app.post(
        "/v1/auth/refresh",
        None,
        &json!({"refresh_token": first}),
        &[],
    )
    .await
    .assert_problem(401, "unauthorized");
    app.post(
        "/v1/auth/refresh",
        None,
        &json!({"refresh_token": second}),
        &[],
    )
    .await
    .assert_problem(401, "unauthorized");
    let stored: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM refresh_tokens WHERE token_hash = sha256(convert_to($1, 'UTF8'))",
    )
    .bind(&second)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(stored, 1, "tokens are stored as SHA-256 only");
    app.stop().await;
}

/// Concurrent guesses cannot get more than the allowed attempts: each one claims
/// an attempt before its password is checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_of_guesses_gets_no_more_than_five_tries() {
    let app = TestApp::spawn().await;
    app.user("a@test.local").await;
    let guesses = futures::future::join_all((0..12).map(|i| {
        let app = &app;
        async move {
            app.post(
                "/v1/auth/login",
                None,
                &json!({"email": "a@test.local", "password": format!("Wrong&Secret{i}")}),
                &[],
            )
            .await
        }
    }))
    .await;
    let checked = guesses.iter().filter(|r| r.status == 401).count();
    let refused = guesses
        .iter()
        .filter(|r| r.status == 429 && r.body["code"] == "account_locked")
        .count();
    assert_eq!(
        (checked, refused),
        (5, 7),
        "{:?}",
        guesses.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    let locked = guesses.iter().find(|r| r.status == 429).unwrap();
    assert!(locked.header("retry-after").is_some());
    app.stop().await;
}
