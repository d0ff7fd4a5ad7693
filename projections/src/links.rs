//! Trace links of a projector batch: one batch applies the events of many
//! requests, so its span names their traces (the trace id is each event's
//! correlation id, see `events::trace`) instead of pretending to have one parent.

use std::collections::BTreeSet;

use events::EventEnvelope;

/// Most trace ids a batch span names; the rest are counted.
const MOST: usize = 16;

/// The distinct trace ids of `events`, comma-separated, in first-seen order
/// (at most [`MOST`], then `+N`).
pub fn trace_links(events: &[EventEnvelope]) -> String {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for e in events {
        if seen.insert(e.correlation_id) && out.len() < MOST {
            out.push(events::trace::trace_id_hex(e.correlation_id));
        }
    }
    let mut s = out.join(",");
    if seen.len() > MOST {
        s.push_str(&format!(",+{}", seen.len() - MOST));
    }
    s
}

/// The span a projector batch is applied in; `links` is filled only when the span is on.
pub fn batch_span(
    projector: &'static str,
    from: i64,
    to: i64,
    events: &[EventEnvelope],
) -> tracing::Span {
    let span = tracing::info_span!(
        "projections.apply",
        projector,
        from,
        to,
        links = tracing::field::Empty
    );
    if !span.is_disabled() {
        span.record("links", trace_links(events).as_str());
    }
    span
}
