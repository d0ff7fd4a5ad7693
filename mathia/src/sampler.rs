//! The metrics sampler: every few seconds it reads [`projections::status::gather`]
//! (the same picture as `mathia status`) and sets gauges from it, so that
//! `/metrics` shows how far behind every reader is without each role having to
//! know about the others.
//!
//! Series (all gauges; label values are stream, consumer and projector names):
//! - `mathia_log_head`: the event store's last position;
//! - `mathia_projector_lag_events{projector}`, `mathia_projector_lag_seconds{projector}`,
//!   `mathia_projector_stuck{projector}` (1 when behind and not moving);
//! - `mathia_relay_lag_events{relay}`, `mathia_relay_lag_seconds{relay}`;
//! - `mathia_stream_messages{stream}`, `mathia_stream_last_seq{stream}`;
//! - `mathia_consumer_pending{stream,consumer}` (not yet delivered: for `handlers`
//!   it is the handler backlog), `mathia_consumer_ack_pending{stream,consumer}`,
//!   `mathia_consumer_redelivered{stream,consumer}`;
//! - `mathia_stuck_readers`: how many reasons `mathia status` would print.
//!
//! The counters and histograms recorded where the work happens complete the set:
//! `mathia_http_request_seconds{method,route,status}`, `mathia_commands_total` and
//! `mathia_command_seconds{command,outcome}`, `mathia_relay_events_total` (events/s
//! is its rate), `mathia_projected_events_total{projector}`, `mathia_ws_connections`.

use std::time::Duration;

use events::Subjects;
use projections::status::{self, Status};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// Set every gauge from `s`.
pub fn record(s: &Status) {
    metrics::gauge!("mathia_log_head").set(s.log.head as f64);
    for p in &s.projectors {
        let name = p.name.clone();
        metrics::gauge!("mathia_projector_lag_events", "projector" => name.clone())
            .set(p.lag_events as f64);
        metrics::gauge!("mathia_projector_lag_seconds", "projector" => name.clone())
            .set(p.lag_seconds);
        metrics::gauge!("mathia_projector_stuck", "projector" => name).set(u8::from(p.stuck));
    }
    for r in &s.relays {
        metrics::gauge!("mathia_relay_lag_events", "relay" => r.name.clone())
            .set(r.lag_events as f64);
        metrics::gauge!("mathia_relay_lag_seconds", "relay" => r.name.clone()).set(r.lag_seconds);
    }
    for st in &s.streams {
        metrics::gauge!("mathia_stream_messages", "stream" => st.name.clone())
            .set(st.messages as f64);
        metrics::gauge!("mathia_stream_last_seq", "stream" => st.name.clone())
            .set(st.last_seq as f64);
        for c in &st.consumers {
            let (stream, consumer) = (st.name.clone(), c.name.clone());
            metrics::gauge!("mathia_consumer_pending", "stream" => stream.clone(), "consumer" => consumer.clone())
                .set(c.num_pending as f64);
            metrics::gauge!("mathia_consumer_ack_pending", "stream" => stream.clone(), "consumer" => consumer.clone())
                .set(c.num_ack_pending as f64);
            metrics::gauge!("mathia_consumer_redelivered", "stream" => stream, "consumer" => consumer)
                .set(c.num_redelivered as f64);
        }
    }
    metrics::gauge!("mathia_stuck_readers").set(s.stuck.len() as f64);
}

/// Sample every `every` until `shutdown`. A failed sample is logged and retried
/// at the next tick: metrics never stop a process.
pub async fn run(
    pool: PgPool,
    js: async_nats::jetstream::Context,
    subjects: Subjects,
    every: Duration,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tick.tick() => {}
        }
        match status::gather(&pool, &js, &subjects, Duration::from_secs(60)).await {
            Ok(s) => record(&s),
            Err(e) => tracing::warn!(error = format!("{e:#}"), "metrics sample failed"),
        }
    }
}
