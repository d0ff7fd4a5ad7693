//! Trace context at the edge: every request gets a W3C trace, and its trace id
//! becomes the request's correlation id (see [`events::trace`] for why).
//!
//! - an incoming valid `traceparent` continues that trace (its span is our parent);
//! - otherwise the `X-Request-Id` (the client's if it is a UUID, else the one the
//!   request-id layer made) is the trace id;
//! - the request then carries `X-Request-Id` = the trace id as a UUID, the
//!   response carries both `traceparent` (our span) and that `X-Request-Id`.
//!
//! The context rides in a request extension (for the `http` span and the
//! [`crate::extract::RequestId`] extractor) and in a task-local, so that
//! [`crate::dispatch`] can put it on the command without every route passing it.

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;
use events::trace::TraceContext;
use http::HeaderValue;
use uuid::Uuid;

tokio::task_local! {
    static CURRENT: TraceContext;
}

/// This request's span in its trace (the gateway's server span).
#[derive(Debug, Clone, Copy)]
pub struct ServerSpan {
    /// Our span (its id is what the next hop names as parent).
    pub context: TraceContext,
    /// The caller's span, when the request brought a `traceparent`.
    pub parent: Option<[u8; 8]>,
}

/// The trace context of the request being served on this task, if any.
pub fn current() -> Option<TraceContext> {
    CURRENT.try_with(|c| *c).ok()
}

/// The middleware (runs inside the request-id layer, outside the `http` span).
pub async fn middleware(mut req: Request, next: Next) -> Response {
    let incoming = req
        .headers()
        .get(events::headers::TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .and_then(TraceContext::parse);
    let span_id: [u8; 8] = rand::random();
    let span = match incoming {
        Some(parent) => ServerSpan {
            context: parent.child(span_id),
            parent: Some(parent.span_id),
        },
        None => {
            let request_id = req
                .headers()
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .and_then(|s| s.parse::<Uuid>().ok())
                .unwrap_or_else(Uuid::now_v7);
            ServerSpan {
                context: TraceContext::new(request_id, span_id),
                parent: None,
            }
        }
    };
    let request_id = HeaderValue::from_str(&span.context.trace_uuid().to_string()).ok();
    if let Some(id) = &request_id {
        req.headers_mut().insert("x-request-id", id.clone());
    }
    req.extensions_mut().insert(span);
    let mut res = CURRENT.scope(span.context, next.run(req)).await;
    let headers = res.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&span.context.to_string()) {
        headers.insert(events::headers::TRACEPARENT, v);
    }
    if let Some(id) = request_id {
        headers.insert("x-request-id", id);
    }
    res
}
