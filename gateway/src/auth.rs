//! Authentication: argon2id passwords, HS256 access tokens, rotating refresh
//! tokens with reuse detection, and the [`Principal`] extractor.

use argon2::{Algorithm, Argon2, Params, Version};
use argon2::{PasswordHash, PasswordHasher, PasswordVerifier};
use axum::extract::FromRequestParts;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use commands::{Actor, Role};
use http::request::Parts;
use jsonwebtoken::{DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::error::ApiError;
use crate::state::AppState;

/// Grant (or with `admin = false`, revoke) the admin role of the account with
/// `email`, and audit it. Returns false when there is no such account. Takes
/// effect at the account's next login or refresh.
pub async fn set_admin(pool: &sqlx::PgPool, email: &str, admin: bool) -> anyhow::Result<bool> {
    let role = if admin { "admin" } else { "user" };
    let user: Option<Uuid> =
        sqlx::query_scalar("UPDATE users SET role = $2 WHERE email = $1 RETURNING user_id")
            .bind(email.trim().to_lowercase())
            .bind(role)
            .fetch_optional(pool)
            .await?;
    if let Some(user) = user {
        let action = if admin {
            "admin.granted"
        } else {
            "admin.revoked"
        };
        sqlx::query("INSERT INTO audit_log (action, subject) VALUES ($1, $2)")
            .bind(action)
            .bind(user.to_string())
            .execute(pool)
            .await?;
    }
    Ok(user.is_some())
}

/// JWT signing keys, from the configured secret.
pub struct Keys {
    encoding: EncodingKey,
    decoding: DecodingKey,
}

impl Keys {
    /// Keys from a secret of at least 32 bytes.
    pub fn new(secret: &[u8]) -> anyhow::Result<Self> {
        anyhow::ensure!(
            secret.len() >= 32,
            "the JWT secret must be at least 32 bytes (got {})",
            secret.len()
        );
        Ok(Keys {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
        })
    }
}

/// Claims of an access token.
#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    /// The user id.
    pub sub: Uuid,
    /// `user` or `admin`.
    pub role: String,
    /// Expiry (seconds since the epoch).
    pub exp: i64,
    /// Issued at.
    pub iat: i64,
}

/// The authenticated caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Principal {
    /// The user.
    pub user_id: Uuid,
    /// Whether they are an admin.
    pub admin: bool,
}

impl Principal {
    /// The actor commands run as.
    pub fn actor(&self) -> Actor {
        Actor {
            user_id: Some(self.user_id),
            role: if self.admin { Role::Admin } else { Role::User },
        }
    }
}

/// Issue an access token.
pub fn access_token(
    keys: &Keys,
    user_id: Uuid,
    role: &str,
    ttl: std::time::Duration,
) -> anyhow::Result<String> {
    let now = chrono::Utc::now().timestamp();
    let claims = Claims {
        sub: user_id,
        role: role.to_owned(),
        iat: now,
        exp: now + ttl.as_secs() as i64,
    };
    Ok(jsonwebtoken::encode(
        &Header::default(),
        &claims,
        &keys.encoding,
    )?)
}

/// Verify an access token.
pub fn verify(keys: &Keys, token: &str) -> Option<Claims> {
    let mut v = Validation::new(jsonwebtoken::Algorithm::HS256);
    v.leeway = 5;
    jsonwebtoken::decode::<Claims>(token, &keys.decoding, &v)
        .ok()
        .map(|d| d.claims)
}

/// The subject of a token signed by us, expired or not: rate limits count an
/// app resuming with a stale token against its user, not against a shared IP.
pub fn signed_subject(keys: &Keys, token: &str) -> Option<Uuid> {
    let mut v = Validation::new(jsonwebtoken::Algorithm::HS256);
    v.validate_exp = false;
    v.required_spec_claims.clear();
    jsonwebtoken::decode::<Claims>(token, &keys.decoding, &v)
        .ok()
        .map(|d| d.claims.sub)
}

/// The bearer token of a request, if any.
pub fn bearer(parts: &http::HeaderMap) -> Option<&str> {
    parts
        .get(http::header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

impl FromRequestParts<AppState> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let token = bearer(&parts.headers).ok_or_else(|| {
            ApiError::Unauthorized("send `Authorization: Bearer <access token>`".into())
        })?;
        let claims = verify(&state.keys, token).ok_or_else(|| {
            ApiError::Unauthorized("the access token is invalid or expired".into())
        })?;
        Ok(Principal {
            user_id: claims.sub,
            admin: claims.role == "admin",
        })
    }
}

/// A new opaque refresh token and the SHA-256 that is stored.
pub fn new_refresh_token() -> (String, Vec<u8>) {
    let bytes: [u8; 32] = rand::random();
    let token = URL_SAFE_NO_PAD.encode(bytes);
    let hash = token_hash(&token);
    (token, hash)
}

/// SHA-256 of a refresh token.
pub fn token_hash(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

fn argon2(memory_kib: u32) -> Argon2<'static> {
    let params = Params::new(memory_kib, 2, 1, None).unwrap_or_default();
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

/// Hash a password with argon2id (on a blocking thread).
pub async fn hash_password(password: String, memory_kib: u32) -> anyhow::Result<String> {
    tokio::task::spawn_blocking(move || {
        argon2(memory_kib)
            .hash_password(password.as_bytes())
            .map(|h| h.to_string())
            .map_err(|e| anyhow::anyhow!("hashing a password: {e}"))
    })
    .await?
}

/// Check a password against a stored hash (on a blocking thread).
pub async fn verify_password(password: String, hash: String, memory_kib: u32) -> bool {
    tokio::task::spawn_blocking(move || {
        hash.parse::<PasswordHash>().is_ok_and(|h| {
            argon2(memory_kib)
                .verify_password(password.as_bytes(), &h)
                .is_ok()
        })
    })
    .await
    .unwrap_or(false)
}

const COMMON_PASSWORDS: &[&str] = &[
    "password1234!",
    "Password1234!",
    "Password123!",
    "Qwerty123456!",
    "Welcome12345!",
    "Admin1234567!",
    "Passw0rd!2345",
    "Iloveyou1234!",
    "Letmein12345!",
    "P@ssw0rd1234",
    "P@ssword1234",
    "Changeme123!",
];

/// SPEC §1's password policy: ≥ 12 characters with upper, lower, digit and
/// symbol, not a known common password. Returns every unmet rule.
pub fn password_problems(password: &str) -> Vec<&'static str> {
    let mut out = vec![];
    if password.chars().count() < 12 {
        out.push("at least 12 characters");
    }
    if password.chars().count() > 128 {
        out.push("at most 128 characters");
    }
    if !password.chars().any(|c| c.is_uppercase()) {
        out.push("an upper-case letter");
    }
    if !password.chars().any(|c| c.is_lowercase()) {
        out.push("a lower-case letter");
    }
    if !password.chars().any(|c| c.is_ascii_digit()) {
        out.push("a digit");
    }
    if !password.chars().any(|c| !c.is_alphanumeric()) {
        out.push("a symbol");
    }
    if COMMON_PASSWORDS
        .iter()
        .any(|p| p.eq_ignore_ascii_case(password))
    {
        out.push("not a common password");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_password_policy_names_every_missing_rule() {
        assert!(password_problems("Str0ng&Secret!").is_empty());
        assert_eq!(
            password_problems("short"),
            vec![
                "at least 12 characters",
                "an upper-case letter",
                "a digit",
                "a symbol"
            ]
        );
        assert_eq!(
            password_problems("Password123!"),
            vec!["not a common password"]
        );
    }

    #[test]
    fn tokens_verify_only_with_their_key() {
        let k1 = Keys::new(&[1u8; 32]).unwrap();
        let k2 = Keys::new(&[2u8; 32]).unwrap();
        let id = Uuid::new_v4();
        let t = access_token(&k1, id, "user", std::time::Duration::from_secs(60)).unwrap();
        assert_eq!(verify(&k1, &t).unwrap().sub, id);
        assert!(verify(&k2, &t).is_none());
        assert!(Keys::new(&[0u8; 16]).is_err());
    }
}
