//! The audit log: security-relevant actions, one row each in `audit_log`
//! (who, what, on what, from where, and a JSON detail). It never holds a
//! secret: [`redact`] replaces the value of every detail key that names one
//! (`secret`, `token`, `password`, `authorization`, `signature`, `*_key`, …),
//! at any depth, before the row is written.
//!
//! What is audited: registrations, logins (succeeded, failed, locked), refresh
//! token reuse, logouts, admin grants and revocations, every admin read
//! (status, journal, reconciliation, flags), room key rotations and room
//! deletions (crypto-shredding), webhook endpoints registered, changed and
//! deleted, and payment webhooks refused for their signature.

use std::net::SocketAddr;

use serde_json::Value;
use uuid::Uuid;

const REDACTED: &str = "REDACTED";

/// Whether a detail key names a secret.
fn is_secret_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    [
        "secret",
        "token",
        "password",
        "passwd",
        "authorization",
        "signature",
        "cookie",
        "api_key",
        "apikey",
        "private",
        "credential",
    ]
    .iter()
    .any(|s| k.contains(s))
        || k == "key"
        || k.ends_with("_key")
}

/// `value` with the value of every secret-naming key replaced, at any depth.
pub fn redact(value: Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| {
                    let v = if is_secret_key(&k) && !v.is_null() {
                        Value::String(REDACTED.into())
                    } else {
                        redact(v)
                    };
                    (k, v)
                })
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.into_iter().map(redact).collect()),
        other => other,
    }
}

/// A URL fit for the log: no user, password, query or fragment (where tokens hide).
pub fn safe_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.set_query(None);
            u.set_fragment(None);
            u.to_string()
        }
        Err(_) => "(not a URL)".into(),
    }
}

/// Write one row. A failure is logged, never returned: the action itself has happened.
pub async fn record(
    pool: &sqlx::PgPool,
    actor: Option<Uuid>,
    action: &str,
    subject: Option<&str>,
    ip: Option<&SocketAddr>,
    detail: Value,
) {
    let detail = redact(detail);
    let r = sqlx::query(
        "INSERT INTO audit_log (actor, action, subject, ip, detail) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(actor)
    .bind(action)
    .bind(subject)
    .bind(ip.map(|a| a.ip().to_string()))
    .bind(&detail)
    .execute(pool)
    .await;
    if let Err(e) = r {
        tracing::error!(error = %e, action, "could not write the audit log");
    }
}

/// Audit `action` by `actor` on `subject` when the write `res` succeeded; `res` passes through.
pub async fn if_ok(
    pool: &sqlx::PgPool,
    res: axum::response::Response,
    actor: Uuid,
    action: &str,
    subject: &str,
    detail: Value,
) -> axum::response::Response {
    if res.status().is_success() {
        record(pool, Some(actor), action, Some(subject), None, detail).await;
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn secrets_are_redacted_at_any_depth() {
        let d = redact(json!({
            "webhook_id": "w1", "key_version": 2, "secret": "whsec_x",
            "nested": [{"access_token": "t", "master_key": "k", "url": "https://a"}],
            "Authorization": "Bearer t", "password": null
        }));
        assert_eq!(d["secret"], REDACTED);
        assert_eq!(d["nested"][0]["access_token"], REDACTED);
        assert_eq!(d["nested"][0]["master_key"], REDACTED);
        assert_eq!(d["nested"][0]["url"], "https://a");
        assert_eq!(d["Authorization"], REDACTED);
        assert_eq!(d["key_version"], 2);
        assert_eq!(d["password"], Value::Null);
    }

    #[test]
    fn urls_lose_credentials_and_queries() {
        assert_eq!(
            safe_url("https://u:p@hooks.example/in?token=abc#x"),
            "https://hooks.example/in"
        );
    }
}
