//! Accounts: register, log in, refresh, log out, me.
//!
//! Identity lives in plain tables, not in events: password hashes and refresh
//! tokens must be erasable and must never travel on the bus.

use std::net::SocketAddr;

use axum::Json;
use axum::extract::{ConnectInfo, State};
use axum::response::IntoResponse;
use chrono::{DateTime, Utc};
use http::StatusCode;
use serde::{Deserialize, Serialize};
use sqlx::Row;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::auth::{self, Principal};
use crate::error::{ApiError, ApiResult, FieldError, Problem};
use crate::extract::AppJson;
use crate::state::AppState;

/// A new account.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    /// Email address (case-insensitive, unique).
    #[schema(example = "amina@example.com")]
    pub email: String,
    /// ≥ 12 characters with upper, lower, digit and symbol.
    #[schema(example = "Correct-Horse-42")]
    pub password: String,
    /// Name shown to others.
    #[schema(example = "Amina")]
    pub display_name: String,
}

/// A user as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct User {
    /// User id.
    pub user_id: Uuid,
    /// Email.
    pub email: String,
    /// Display name.
    pub display_name: String,
    /// `user` or `admin`.
    pub role: String,
    /// IANA time zone.
    pub time_zone: String,
    /// When the account was created.
    pub created_at: DateTime<Utc>,
}

/// Credentials.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    /// Email.
    pub email: String,
    /// Password.
    pub password: String,
}

/// A refresh token to rotate or revoke.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RefreshRequest {
    /// The refresh token from the last login or refresh.
    pub refresh_token: String,
}

/// Tokens.
#[derive(Debug, Serialize, ToSchema)]
pub struct TokenPair {
    /// Short-lived JWT for `Authorization: Bearer`.
    pub access_token: String,
    /// Always `Bearer`.
    pub token_type: &'static str,
    /// Seconds until the access token expires.
    pub expires_in: u64,
    /// Single-use token for `/v1/auth/refresh`; using one twice revokes the family.
    pub refresh_token: String,
}

fn normalise_email(email: &str) -> Result<String, FieldError> {
    let e = email.trim().to_lowercase();
    let ok = e.len() <= 254
        && e.split_once('@').is_some_and(|(l, d)| {
            !l.is_empty() && d.contains('.') && !d.starts_with('.') && !d.ends_with('.')
        })
        && !e.chars().any(|c| c.is_whitespace() || c.is_control());
    if ok {
        Ok(e)
    } else {
        Err(FieldError {
            field: "email".into(),
            message: "not an email address".into(),
        })
    }
}

async fn audit(
    state: &AppState,
    actor: Option<Uuid>,
    action: &str,
    subject: &str,
    ip: Option<&SocketAddr>,
) {
    crate::audit::record(
        &state.pool,
        actor,
        action,
        Some(subject),
        ip,
        serde_json::json!({}),
    )
    .await;
}

/// Create an account (role `user`; admins are made with `mathia admin grant`).
#[utoipa::path(post, path = "/v1/auth/register", tag = "accounts", request_body = RegisterRequest,
    responses(
        (status = 201, body = User),
        (status = 400, body = Problem), (status = 409, description = "email taken", body = Problem),
        (status = 422, description = "invalid fields, with every unmet password rule", body = Problem),
        (status = 429, body = Problem)))]
pub async fn register(
    State(state): State<AppState>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    AppJson(req): AppJson<RegisterRequest>,
) -> ApiResult<impl IntoResponse> {
    let mut errors = vec![];
    let email = normalise_email(&req.email).map_err(|e| errors.push(e)).ok();
    let problems = auth::password_problems(&req.password);
    if !problems.is_empty() {
        errors.push(FieldError {
            field: "password".into(),
            message: format!("needs {}", problems.join(", ")),
        });
    }
    let name = req.display_name.trim();
    if name.is_empty() || name.chars().count() > 100 || name.chars().any(char::is_control) {
        errors.push(FieldError {
            field: "display_name".into(),
            message: "1 to 100 printable characters".into(),
        });
    }
    let (Some(email), true) = (email, errors.is_empty()) else {
        return Err(ApiError::Invalid(errors));
    };
    let hash = auth::hash_password(req.password, state.settings.argon2_memory_kib).await?;
    // Nobody becomes an admin by registering: email ownership is not proven here.
    // Operators grant the role with `mathia admin grant <email>`.
    let role = "user";
    let user_id = Uuid::now_v7();
    let row = sqlx::query(
        "INSERT INTO users (user_id, email, display_name, password_hash, role) VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (email) DO NOTHING RETURNING created_at, time_zone",
    )
    .bind(user_id)
    .bind(&email)
    .bind(name)
    .bind(&hash)
    .bind(role)
    .fetch_optional(&state.pool)
    .await?;
    let Some(row) = row else {
        return Err(ApiError::Conflict {
            code: "email_taken",
            message: "an account with this email exists".into(),
        });
    };
    audit(
        &state,
        Some(user_id),
        "account.registered",
        &user_id.to_string(),
        Some(&addr),
    )
    .await;
    let user = User {
        user_id,
        email,
        display_name: name.to_owned(),
        role: role.to_owned(),
        time_zone: row.get("time_zone"),
        created_at: row.get("created_at"),
    };
    Ok((StatusCode::CREATED, Json(user)))
}

async fn issue(
    state: &AppState,
    conn: &mut sqlx::PgConnection,
    user_id: Uuid,
    role: &str,
    family: Uuid,
) -> ApiResult<TokenPair> {
    let access_token = auth::access_token(&state.keys, user_id, role, state.settings.access_ttl)?;
    let (refresh_token, hash) = auth::new_refresh_token();
    let expires = Utc::now() + state.settings.refresh_ttl;
    sqlx::query("INSERT INTO refresh_tokens (token_hash, family_id, user_id, expires_at) VALUES ($1, $2, $3, $4)")
        .bind(&hash)
        .bind(family)
        .bind(user_id)
        .bind(expires)
        .execute(&mut *conn)
        .await?;
    Ok(TokenPair {
        access_token,
        token_type: "Bearer",
        expires_in: state.settings.access_ttl.as_secs(),
        refresh_token,
    })
}

fn bad_credentials() -> ApiError {
    ApiError::Unauthorized("wrong email or password".into())
}

/// Log in. After 5 failures in a row the account is locked for 15 minutes.
#[utoipa::path(post, path = "/v1/auth/login", tag = "accounts", request_body = LoginRequest,
    responses(
        (status = 200, body = TokenPair), (status = 400, body = Problem),
        (status = 401, description = "wrong email or password", body = Problem),
        (status = 429, description = "rate limited, or the account is locked; see Retry-After", body = Problem)))]
pub async fn login(
    State(state): State<AppState>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    AppJson(req): AppJson<LoginRequest>,
) -> ApiResult<Json<TokenPair>> {
    let email = normalise_email(&req.email).map_err(|_| bad_credentials())?;
    // Claim this attempt before checking the password, atomically: concurrent
    // guesses each take one of the allowed attempts, so a burst cannot get more
    // than `lockout_after` tries per lock window. An expired lock starts afresh.
    let row = sqlx::query(
        "UPDATE users SET
             failed_logins = CASE WHEN locked_until < now() THEN 1 ELSE failed_logins + 1 END,
             locked_until = CASE WHEN locked_until < now() THEN NULL ELSE locked_until END
         WHERE email = $1
           AND (locked_until IS NULL OR locked_until < now())
           AND (failed_logins < $2 OR locked_until < now())
         RETURNING user_id, password_hash, role",
    )
    .bind(&email)
    .bind(state.settings.lockout_after)
    .fetch_optional(&state.pool)
    .await?;
    let Some(row) = row else {
        let locked: Option<(Uuid, Option<DateTime<Utc>>)> =
            sqlx::query_as("SELECT user_id, locked_until FROM users WHERE email = $1")
                .bind(&email)
                .fetch_optional(&state.pool)
                .await?;
        let Some((user_id, until)) = locked else {
            // Spend the same time as a real check, so timing does not reveal which emails exist.
            let _ = auth::verify_password(
                req.password,
                DUMMY_HASH.into(),
                state.settings.argon2_memory_kib,
            )
            .await;
            audit(&state, None, "login.failed", "unknown email", Some(&addr)).await;
            return Err(bad_credentials());
        };
        audit(
            &state,
            Some(user_id),
            "login.locked",
            &user_id.to_string(),
            Some(&addr),
        )
        .await;
        // No lock yet but every attempt taken: the others are still being checked.
        let retry = until.map_or(1, |u| (u - Utc::now()).num_seconds().max(1));
        return Err(ApiError::Coded {
            status: StatusCode::TOO_MANY_REQUESTS,
            code: "account_locked".into(),
            message: "too many failed logins; try again later".into(),
            extra: [("retry_after".to_owned(), retry.into())]
                .into_iter()
                .collect(),
        });
    };
    let user_id: Uuid = row.get("user_id");
    let ok = auth::verify_password(
        req.password,
        row.get("password_hash"),
        state.settings.argon2_memory_kib,
    )
    .await;
    if !ok {
        sqlx::query(
            "UPDATE users SET locked_until = now() + $3 * interval '1 second'
             WHERE user_id = $1 AND failed_logins >= $2",
        )
        .bind(user_id)
        .bind(state.settings.lockout_after)
        .bind(state.settings.lockout_for.as_secs() as f64)
        .execute(&state.pool)
        .await
        .ok();
        audit(
            &state,
            Some(user_id),
            "login.failed",
            &user_id.to_string(),
            Some(&addr),
        )
        .await;
        return Err(bad_credentials());
    }
    sqlx::query("UPDATE users SET failed_logins = 0, locked_until = NULL WHERE user_id = $1")
        .bind(user_id)
        .execute(&state.pool)
        .await?;
    audit(
        &state,
        Some(user_id),
        "login.succeeded",
        &user_id.to_string(),
        Some(&addr),
    )
    .await;
    Ok(Json(
        issue(
            &state,
            &mut *state.pool.acquire().await?,
            user_id,
            row.get("role"),
            Uuid::now_v7(),
        )
        .await?,
    ))
}

/// A valid argon2id hash of a random password, for constant-time misses.
const DUMMY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$0oTHvgYaH0s6Q2t5DkEPtPNwKdrHrpm5j2Xd6JyvUvo";

/// Trade a refresh token for a new pair. A token used twice revokes its whole family.
#[utoipa::path(post, path = "/v1/auth/refresh", tag = "accounts", request_body = RefreshRequest,
    responses((status = 200, body = TokenPair), (status = 400, body = Problem),
        (status = 401, description = "unknown, expired, revoked or reused token", body = Problem)))]
pub async fn refresh(
    State(state): State<AppState>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    AppJson(req): AppJson<RefreshRequest>,
) -> ApiResult<Json<TokenPair>> {
    let hash = auth::token_hash(&req.refresh_token);
    let mut tx = state.pool.begin().await?;
    let row = sqlx::query(
        "SELECT t.family_id, t.user_id, t.expires_at, t.used_at, t.revoked_at, u.role
         FROM refresh_tokens t JOIN users u USING (user_id) WHERE t.token_hash = $1 FOR UPDATE OF t",
    )
    .bind(&hash)
    .fetch_optional(&mut *tx)
    .await?;
    let invalid = || ApiError::Unauthorized("the refresh token is invalid; log in again".into());
    let Some(row) = row else {
        return Err(invalid());
    };
    let family: Uuid = row.get("family_id");
    let user_id: Uuid = row.get("user_id");
    let used: Option<DateTime<Utc>> = row.get("used_at");
    let revoked: Option<DateTime<Utc>> = row.get("revoked_at");
    if used.is_some() || revoked.is_some() {
        sqlx::query("UPDATE refresh_tokens SET revoked_at = coalesce(revoked_at, now()) WHERE family_id = $1")
            .bind(family)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        if used.is_some() {
            audit(
                &state,
                Some(user_id),
                "refresh_token.reused",
                &family.to_string(),
                Some(&addr),
            )
            .await;
        }
        return Err(invalid());
    }
    if row.get::<DateTime<Utc>, _>("expires_at") < Utc::now() {
        return Err(invalid());
    }
    sqlx::query("UPDATE refresh_tokens SET used_at = now() WHERE token_hash = $1")
        .bind(&hash)
        .execute(&mut *tx)
        .await?;
    // The successor is written in the same transaction that spends the old token:
    // a failure leaves the old one unspent, so the client's retry is not "reuse".
    let pair = issue(&state, &mut tx, user_id, row.get("role"), family).await?;
    tx.commit().await?;
    Ok(Json(pair))
}

/// Revoke the refresh token's family (log out this device).
#[utoipa::path(post, path = "/v1/auth/logout", tag = "accounts", request_body = RefreshRequest,
    responses((status = 204, description = "logged out"), (status = 400, body = Problem)))]
pub async fn logout(
    State(state): State<AppState>,
    AppJson(req): AppJson<RefreshRequest>,
) -> ApiResult<StatusCode> {
    let hash = auth::token_hash(&req.refresh_token);
    let users: Vec<Uuid> = sqlx::query_scalar(
        "UPDATE refresh_tokens SET revoked_at = coalesce(revoked_at, now())
         WHERE family_id = (SELECT family_id FROM refresh_tokens WHERE token_hash = $1)
         RETURNING user_id",
    )
    .bind(&hash)
    .fetch_all(&state.pool)
    .await?;
    if let Some(user) = users.first() {
        audit(&state, Some(*user), "logout", &user.to_string(), None).await;
    }
    Ok(StatusCode::NO_CONTENT)
}

/// The caller.
#[utoipa::path(get, path = "/v1/me", tag = "accounts", security(("bearer" = [])),
    responses((status = 200, body = User), (status = 401, body = Problem)))]
pub async fn me(State(state): State<AppState>, principal: Principal) -> ApiResult<Json<User>> {
    let row = sqlx::query("SELECT user_id, email, display_name, role, time_zone, created_at FROM users WHERE user_id = $1")
        .bind(principal.user_id)
        .fetch_optional(&state.pool)
        .await?
        .ok_or_else(|| ApiError::Unauthorized("the account no longer exists".into()))?;
    Ok(Json(User {
        user_id: row.get("user_id"),
        email: row.get("email"),
        display_name: row.get("display_name"),
        role: row.get("role"),
        time_zone: row.get("time_zone"),
        created_at: row.get("created_at"),
    }))
}
