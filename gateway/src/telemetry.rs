//! Request metrics and the one place 5xx causes are logged.

use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;

use crate::error::InternalCause;

/// Record latency by route and status; log the cause of any 5xx.
pub async fn record(req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = req.method().to_string();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".into());
    let res = next.run(req).await;
    let status = res.status().as_u16().to_string();
    metrics::histogram!("mathia_http_request_seconds", "method" => method, "route" => route.clone(), "status" => status)
        .record(started.elapsed().as_secs_f64());
    if let Some(cause) = res.extensions().get::<InternalCause>() {
        tracing::error!(route = %route, cause = %cause.0, "internal error");
    }
    res
}
