//! The one error type of the gateway, rendered as RFC 9457 `application/problem+json`.

use axum::Json;
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use serde::Serialize;
use serde_json::{Map, Value};
use utoipa::ToSchema;

/// The body of every error answer.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Problem {
    /// A URI naming the kind of problem.
    #[serde(rename = "type")]
    #[schema(example = "https://docs.mathia.dev/problems/insufficient_funds")]
    pub kind: String,
    /// A short summary of the kind.
    pub title: String,
    /// The HTTP status.
    pub status: u16,
    /// What went wrong with this request.
    pub detail: String,
    /// Stable machine-readable code.
    #[schema(example = "insufficient_funds")]
    pub code: String,
    /// Field errors, for invalid input.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
    /// Extra machine-readable facts (e.g. `available`, `retry_after`).
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub extra: Map<String, Value>,
}

/// One invalid field.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct FieldError {
    /// JSON pointer-ish path of the field (`amount`, `to_wallet`).
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

/// Every way a request can fail.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the request cannot be read (syntax, types, encoding).
    #[error("{0}")]
    Malformed(String),
    /// 422: readable but invalid fields.
    #[error("invalid input")]
    Invalid(Vec<FieldError>),
    /// 401: no or bad credentials.
    #[error("{0}")]
    Unauthorized(String),
    /// 403: authenticated, not allowed.
    #[error("{0}")]
    Forbidden(String),
    /// 404: no such thing (or not yours to know about).
    #[error("{0}")]
    NotFound(String),
    /// 409: conflict with the current state or an in-flight duplicate.
    #[error("{message}")]
    Conflict {
        /// Stable code.
        code: &'static str,
        /// Sentence.
        message: String,
    },
    /// 413: the body is too large.
    #[error("request body larger than {0} bytes")]
    TooLarge(usize),
    /// 415: not JSON.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// Any status with a code, a sentence and extra facts (domain rejections).
    #[error("{message}")]
    Coded {
        /// HTTP status.
        status: StatusCode,
        /// Stable code.
        code: String,
        /// Sentence.
        message: String,
        /// Extra facts.
        extra: Map<String, Value>,
    },
    /// 429: a rate limit or quota is exhausted.
    #[error("rate limit `{limit}` exceeded")]
    RateLimited {
        /// Which limit.
        limit: &'static str,
        /// Its size per window.
        max: u32,
        /// Seconds until it resets.
        retry_after: u64,
    },
    /// 503: a dependency is unavailable.
    #[error("{0}")]
    Unavailable(String),
    /// 500: our fault; the detail is logged, never shown.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        ApiError::Internal(e.into())
    }
}

impl From<redis::RedisError> for ApiError {
    fn from(e: redis::RedisError) -> Self {
        ApiError::Internal(e.into())
    }
}

/// Carried in the response extensions so one middleware logs 5xx causes.
#[derive(Debug, Clone)]
pub struct InternalCause(pub String);

impl ApiError {
    /// A problem with a machine-readable `code` and no extra members.
    pub fn coded(status: StatusCode, code: &str, message: &str) -> Self {
        ApiError::Coded {
            status,
            code: code.into(),
            message: message.into(),
            extra: Default::default(),
        }
    }

    /// A 422 for one field.
    pub fn field(field: &str, message: impl Into<String>) -> Self {
        ApiError::Invalid(vec![FieldError {
            field: field.to_owned(),
            message: message.into(),
        }])
    }

    fn parts(&self) -> (StatusCode, &str, String) {
        use ApiError::*;
        match self {
            Malformed(m) => (StatusCode::BAD_REQUEST, "malformed_request", m.clone()),
            Invalid(_) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_input",
                "some fields are invalid".into(),
            ),
            Unauthorized(m) => (StatusCode::UNAUTHORIZED, "unauthorized", m.clone()),
            Forbidden(m) => (StatusCode::FORBIDDEN, "forbidden", m.clone()),
            NotFound(m) => (StatusCode::NOT_FOUND, "not_found", m.clone()),
            Conflict { code, message } => (StatusCode::CONFLICT, code, message.clone()),
            TooLarge(_) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                self.to_string(),
            ),
            UnsupportedMediaType(m) => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                m.clone(),
            ),
            Coded {
                status,
                code,
                message,
                ..
            } => (*status, code, message.clone()),
            RateLimited { .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                self.to_string(),
            ),
            Unavailable(m) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable", m.clone()),
            Internal(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "something went wrong on our side".into(),
            ),
        }
    }

    /// The problem body.
    pub fn problem(&self) -> Problem {
        let (status, code, detail) = self.parts();
        let mut extra = Map::new();
        let mut errors = vec![];
        match self {
            ApiError::Invalid(e) => errors = e.clone(),
            ApiError::Coded { extra: x, .. } => extra = x.clone(),
            ApiError::RateLimited {
                limit,
                max,
                retry_after,
            } => {
                extra.insert("limit".into(), (*limit).into());
                extra.insert("limit_max".into(), (*max).into());
                extra.insert("retry_after".into(), (*retry_after).into());
            }
            _ => {}
        }
        Problem {
            kind: format!("https://docs.mathia.dev/problems/{code}"),
            title: status.canonical_reason().unwrap_or("Error").to_owned(),
            status: status.as_u16(),
            detail,
            code: code.to_owned(),
            errors,
            extra,
        }
    }
}

/// Render a problem with its status and content type.
pub fn problem_response(problem: &Problem) -> Response {
    let status = StatusCode::from_u16(problem.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut res = (status, Json(problem)).into_response();
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    res
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut res = problem_response(&self.problem());
        match &self {
            ApiError::Unauthorized(_) => {
                res.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            ApiError::Coded { extra, .. }
                if extra.get("retry_after").and_then(|v| v.as_u64()).is_some() =>
            {
                if let Some(v) = extra
                    .get("retry_after")
                    .and_then(|v| HeaderValue::from_str(&v.to_string()).ok())
                {
                    res.headers_mut().insert(header::RETRY_AFTER, v);
                }
            }
            ApiError::RateLimited { retry_after, .. } => {
                if let Ok(v) = HeaderValue::from_str(&retry_after.to_string()) {
                    res.headers_mut().insert(header::RETRY_AFTER, v);
                }
            }
            ApiError::Internal(e) => {
                res.extensions_mut().insert(InternalCause(format!("{e:#}")));
            }
            _ => {}
        }
        res
    }
}

/// Shorthand for handler results.
pub type ApiResult<T> = Result<T, ApiError>;
