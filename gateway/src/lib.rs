//! # gateway — the HTTP face of Mathia
//!
//! REST under `/v1`, the OpenAPI 3.1 document at `/openapi.json` (browsable at
//! `/docs`), `/healthz`, `/readyz`, `/metrics`. It authenticates every request,
//! validates input, turns a write into a command envelope on `COMMANDS` and
//! waits (bounded) for the handlers' outcome; it serves reads from the read
//! models. It never writes the event store.
//!
//! - [`state`]: [`AppState`], what every handler gets.
//! - [`audit`]: the audit log of security-relevant actions, secrets redacted.
//! - [`error`]: the one [`error::ApiError`], rendered as `application/problem+json`.
//! - [`extract`]: JSON, principal and header extractors that fail as problems.
//! - [`dispatch`]: the idempotent write path (Idempotency-Key, ledger, waiting).
//! - [`consistency`]: read-your-writes (`after_position`).
//! - [`ratelimit`]: per-principal and per-IP limits in Redis.
//! - [`objects`]: where uploaded files rest (sealed), behind an [`objects::ObjectStore`].
//! - [`trace`]: W3C trace context at the edge (`traceparent` in and out).
//! - [`routes`]: one module per resource.

pub mod audit;
pub mod auth;
pub mod consistency;
pub mod dispatch;
pub mod error;
pub mod extract;
pub mod objects;
pub mod openapi;
pub mod paging;
pub mod ratelimit;
pub mod realtime;
pub mod roomkeys;
pub mod routes;
pub mod signals;
pub mod state;
pub mod telemetry;
pub mod trace;
pub mod travel;

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
pub use state::{AppState, Settings};
use tokio::net::TcpListener;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

/// Largest request body accepted (bigger ones get 413).
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// The whole HTTP application.
pub fn app(state: AppState) -> Router {
    let (api, openapi) = openapi::router().split_for_parts();
    let docs = utoipa_swagger_ui::SwaggerUi::new("/docs").url("/openapi.json", openapi);
    let request_id = http::HeaderName::from_static("x-request-id");
    Router::new()
        .merge(api)
        .merge(docs)
        .fallback(routes::not_found)
        .method_not_allowed_fallback(routes::method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(state.clone(), ratelimit::middleware))
        .layer(axum::middleware::from_fn(telemetry::record))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(
            TraceLayer::new_for_http().make_span_with(|req: &http::Request<_>| {
                let matched = req
                    .extensions()
                    .get::<axum::extract::MatchedPath>()
                    .map(|m| m.as_str().to_owned())
                    .unwrap_or_default();
                let request_id = req.headers().get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or("");
                let (trace_id, span_id, parent_span_id) = match req.extensions().get::<trace::ServerSpan>() {
                    Some(s) => (
                        s.context.trace_id_hex(),
                        s.context.span_id_hex(),
                        s.parent.map(|p| events::trace::TraceContext { span_id: p, ..s.context }.span_id_hex()),
                    ),
                    None => (String::new(), String::new(), None),
                };
                tracing::info_span!("http", method = %req.method(), matched_path = %matched, request_id = %request_id,
                    trace_id = %trace_id, span_id = %span_id, parent_span_id = parent_span_id.as_deref())
            }),
        )
        .layer(axum::middleware::from_fn(trace::middleware))
        .layer(PropagateRequestIdLayer::new(request_id.clone()))
        .layer(SetRequestIdLayer::new(request_id, MakeRequestUuid))
        .with_state(state)
}

/// Serve until `shutdown` resolves, then drain.
pub async fn run(
    state: AppState,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    // Install the metrics recorder before any role records a figure.
    routes::health::prometheus();
    let outcomes = state.clone().listen_for_outcomes().await?;
    // Realtime: the feed tailer and the signal listener live as long as the server.
    let stop = tokio_util::sync::CancellationToken::new();
    let tail = tokio::spawn(realtime::tail(state.clone(), stop.clone()));
    let signals = tokio::spawn(signals::listen(state.clone(), state.signals.clone()));
    tracing::info!(addr = %listener.local_addr()?, "gateway listening");
    axum::serve(
        listener,
        app(state.clone()).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await?;
    outcomes.abort();
    state.hub.closing.cancel();
    stop.cancel();
    signals.abort();
    let _ = tail.await;
    // Connections die with the process: withdraw their presence now rather than
    // leave them online until they go stale.
    tokio::time::sleep(Duration::from_millis(50)).await;
    for (user, conn) in state.hub.take_connections() {
        signals::presence_gone(&state, user, conn).await;
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
    Ok(())
}
