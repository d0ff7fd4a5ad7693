//! Extractors whose failures are problems, never axum's plain-text rejections.

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Query, Request};
use http::request::Parts;
use serde::de::DeserializeOwned;
use uuid::Uuid;

use crate::error::ApiError;
use crate::state::AppState;

/// `Json<T>` that fails with problem+json and refuses NUL characters anywhere
/// in the body (Postgres text cannot hold them).
pub struct AppJson<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for AppJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        match axum::Json::<serde_json::Value>::from_request(req, state).await {
            Ok(axum::Json(value)) => {
                if has_nul(&value) {
                    return Err(ApiError::Malformed(
                        "strings may not contain NUL characters".into(),
                    ));
                }
                serde_json::from_value(value)
                    .map(AppJson)
                    .map_err(|e| ApiError::Malformed(format!("invalid body: {e}")))
            }
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

fn has_nul(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::String(s) => s.contains('\0'),
        serde_json::Value::Array(a) => a.iter().any(has_nul),
        serde_json::Value::Object(o) => o.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
        _ => false,
    }
}

fn json_rejection(r: JsonRejection) -> ApiError {
    match r {
        JsonRejection::MissingJsonContentType(_) => ApiError::UnsupportedMediaType(
            "send the body as `Content-Type: application/json`".into(),
        ),
        JsonRejection::BytesRejection(b) if b.status() == http::StatusCode::PAYLOAD_TOO_LARGE => {
            ApiError::TooLarge(crate::MAX_BODY_BYTES)
        }
        other => ApiError::Malformed(other.body_text()),
    }
}

/// `Query<T>` that fails with problem+json.
pub struct AppQuery<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for AppQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(q)| AppQuery(q))
            .map_err(|e: QueryRejection| ApiError::Malformed(e.body_text()))
    }
}

/// `Path<T>` that fails with problem+json (e.g. a wallet id that is not a UUID).
pub struct AppPath<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for AppPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(p)| AppPath(p))
            .map_err(|e| ApiError::Malformed(e.body_text()))
    }
}

/// The request id (set by the request-id layer), as the correlation id.
pub struct RequestId(pub Uuid);

impl<S: Send + Sync> FromRequestParts<S> for RequestId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        // The trace id is the correlation id (see `crate::trace`).
        if let Some(span) = parts.extensions.get::<crate::trace::ServerSpan>() {
            return Ok(RequestId(span.context.trace_uuid()));
        }
        let id = parts
            .headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.parse::<Uuid>().ok())
            .unwrap_or_else(Uuid::now_v7);
        Ok(RequestId(id))
    }
}

/// Options of a write: `Idempotency-Key` and `Prefer: respond-async`.
pub struct WriteOptions {
    /// The client's key, at most 255 visible ASCII characters.
    pub idempotency_key: Option<String>,
    /// Answer 202 at once.
    pub respond_async: bool,
    /// `If-Match: "<version>"`: the addressed resource must be at this version.
    pub if_match: Option<i64>,
}

impl<S: Send + Sync> FromRequestParts<S> for WriteOptions {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let idempotency_key = match parts.headers.get("idempotency-key") {
            None => None,
            Some(v) => {
                let key = v.to_str().map_err(|_| {
                    ApiError::Malformed("Idempotency-Key must be visible ASCII".into())
                })?;
                if key.is_empty()
                    || key.len() > 255
                    || !key.bytes().all(|b| (0x21..=0x7e).contains(&b))
                {
                    return Err(ApiError::Malformed(
                        "Idempotency-Key must be 1 to 255 visible ASCII characters".into(),
                    ));
                }
                Some(key.to_owned())
            }
        };
        let respond_async = parts
            .headers
            .get_all("prefer")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| {
                v.split(',')
                    .any(|p| p.trim().eq_ignore_ascii_case("respond-async"))
            });
        let if_match = match parts.headers.get(http::header::IF_MATCH) {
            None => None,
            Some(v) => Some(
                v.to_str()
                    .ok()
                    .map(|s| s.trim().trim_matches('"'))
                    .and_then(|s| s.parse::<i64>().ok())
                    .filter(|n| *n >= 0)
                    .ok_or_else(|| {
                        ApiError::Malformed(
                            "If-Match must be the ETag this API gave out, e.g. \"3\"".into(),
                        )
                    })?,
            ),
        };
        Ok(WriteOptions {
            idempotency_key,
            respond_async,
            if_match,
        })
    }
}
