//! Liveness, readiness and metrics.

use std::sync::OnceLock;

use axum::Json;
use axum::extract::State;
use axum::response::IntoResponse;
use http::StatusCode;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde::Serialize;
use utoipa::ToSchema;

use crate::state::AppState;

/// Health of the process or of a dependency.
#[derive(Serialize, ToSchema)]
pub struct Health {
    /// `ok` or `unavailable`.
    pub status: &'static str,
    /// Per dependency: `ok` or what is wrong.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checks: Option<std::collections::BTreeMap<&'static str, String>>,
}

/// The process is up.
#[utoipa::path(get, path = "/healthz", tag = "operations", responses((status = 200, body = Health)))]
pub async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok",
        checks: None,
    })
}

/// Postgres, NATS and Redis answer.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses((status = 200, body = Health), (status = 503, description = "a dependency is down", body = Health)))]
pub async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let mut checks = std::collections::BTreeMap::new();
    let pg = sqlx::query("SELECT 1")
        .execute(&state.pool)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string());
    checks.insert("postgres", pg.err().unwrap_or_else(|| "ok".into()));
    let nats = match state.nats.connection_state() {
        async_nats::connection::State::Connected => "ok".to_owned(),
        other => format!("{other:?}"),
    };
    checks.insert("nats", nats);
    let mut redis = state.redis.clone();
    let pong: Result<String, _> = redis::cmd("PING").query_async(&mut redis).await;
    checks.insert(
        "redis",
        pong.map(|_| "ok".to_owned())
            .unwrap_or_else(|e| e.to_string()),
    );
    let ok = checks.values().all(|v| v == "ok");
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(Health {
            status: if ok { "ok" } else { "unavailable" },
            checks: Some(checks),
        }),
    )
}

/// The process-wide Prometheus recorder, installed on first use.
pub fn prometheus() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        // Another recorder may already be installed (tests start many apps): keep ours readable anyway.
        let _ = metrics::set_global_recorder(recorder);
        // Histograms buffer every sample until upkeep folds them into summaries:
        // without this, a process nobody scrapes grows without bound.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let upkeep = handle.clone();
            rt.spawn(async move {
                let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
                loop {
                    tick.tick().await;
                    upkeep.run_upkeep();
                }
            });
        }
        handle
    })
}

/// Prometheus metrics (text exposition format).
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
pub async fn metrics() -> impl IntoResponse {
    (
        [(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        prometheus().render(),
    )
}

/// `/metrics` and `/healthz` alone, for a process without the gateway
/// (`MATHIA_METRICS_LISTEN`): handlers, relay and projectors record their own
/// figures (command latency is measured in the handlers), so each process
/// that does work can be scraped, and probed for liveness.
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    prometheus();
    let app = axum::Router::new()
        .route("/metrics", axum::routing::get(metrics))
        .route("/healthz", axum::routing::get(healthz));
    tracing::info!(addr = %listener.local_addr()?, "metrics listening");
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}
