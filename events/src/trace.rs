//! W3C trace context (`traceparent`), parsed and formatted by hand: the format is
//! one line of hex (<https://www.w3.org/TR/trace-context/#traceparent-header>),
//! and the OpenTelemetry crates would cost this workspace dozens of dependencies
//! for it.
//!
//! The decision that makes a trace follow one request across every hop without
//! a new column in the event store: **the trace id is the correlation id**. The
//! gateway takes the request's trace id (from an incoming `traceparent`, or its
//! `X-Request-Id`, or a fresh one) and uses it, as a UUID, for the command's and
//! every resulting event's `correlation_id`. Span ids that are not random are
//! derived from ids already stored: the handler's span for a command is
//! [`span_id_of`] the command id, so the relay can name it as the parent of the
//! event message it publishes (the event's `causation_id` is that command id).
//!
//! ```
//! use events::trace::TraceContext;
//! let tc = TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
//! assert_eq!(tc.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
//! assert_eq!(tc.to_string(), "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
//! assert!(TraceContext::parse("00-00000000000000000000000000000000-00f067aa0ba902b7-01").is_none());
//! ```

use std::fmt;

use uuid::Uuid;

/// One span's place in a trace: what a `traceparent` header carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceContext {
    /// The trace: 16 bytes, never all zero.
    pub trace_id: [u8; 16],
    /// The span that sent the header (the receiver's parent): 8 bytes, never all zero.
    pub span_id: [u8; 8],
    /// The `sampled` flag.
    pub sampled: bool,
}

fn hex_into(s: &str, out: &mut [u8]) -> Option<()> {
    if s.len() != out.len() * 2 {
        return None;
    }
    for (i, byte) in out.iter_mut().enumerate() {
        let pair = s.get(i * 2..i * 2 + 2)?;
        // Lowercase only, as the spec requires.
        if !pair
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return None;
        }
        *byte = u8::from_str_radix(pair, 16).ok()?;
    }
    Some(())
}

fn hex(bytes: &[u8]) -> String {
    use fmt::Write as _;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

impl TraceContext {
    /// Parse a `traceparent` value. Version `00` exactly; a later version is
    /// read by its first four fields, as the spec asks; `ff`, bad hex and
    /// all-zero ids are refused (the receiver then starts a new trace).
    pub fn parse(value: &str) -> Option<TraceContext> {
        let value = value.trim();
        let mut parts = value.split('-');
        let version = parts.next()?;
        let (trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?);
        let mut v = [0u8; 1];
        hex_into(version, &mut v)?;
        if v[0] == 0xff || (v[0] == 0 && parts.next().is_some()) {
            return None;
        }
        let mut tc = TraceContext {
            trace_id: [0; 16],
            span_id: [0; 8],
            sampled: false,
        };
        hex_into(trace, &mut tc.trace_id)?;
        hex_into(span, &mut tc.span_id)?;
        let mut f = [0u8; 1];
        hex_into(flags, &mut f)?;
        tc.sampled = f[0] & 1 == 1;
        if tc.trace_id == [0; 16] || tc.span_id == [0; 8] {
            return None;
        }
        Some(tc)
    }

    /// A context in trace `trace` (a correlation id) for span `span_id`, sampled.
    pub fn new(trace: Uuid, span_id: [u8; 8]) -> TraceContext {
        let mut trace_id = *trace.as_bytes();
        if trace_id == [0; 16] {
            trace_id[15] = 1;
        }
        TraceContext {
            trace_id,
            span_id: nonzero(span_id),
            sampled: true,
        }
    }

    /// The same trace, as the span `span_id` (what a hop sends on to the next).
    pub fn child(&self, span_id: [u8; 8]) -> TraceContext {
        TraceContext {
            span_id: nonzero(span_id),
            ..*self
        }
    }

    /// The trace id as a UUID: the correlation id of what the trace causes.
    pub fn trace_uuid(&self) -> Uuid {
        Uuid::from_bytes(self.trace_id)
    }

    /// The trace id, 32 lowercase hex digits (the form tracing back ends search by).
    pub fn trace_id_hex(&self) -> String {
        hex(&self.trace_id)
    }

    /// The span id, 16 lowercase hex digits.
    pub fn span_id_hex(&self) -> String {
        hex(&self.span_id)
    }
}

impl fmt::Display for TraceContext {
    /// The `traceparent` header value.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{}-{}-{}",
            self.trace_id_hex(),
            self.span_id_hex(),
            if self.sampled { "01" } else { "00" }
        )
    }
}

fn nonzero(mut span_id: [u8; 8]) -> [u8; 8] {
    if span_id == [0; 8] {
        span_id[7] = 1;
    }
    span_id
}

/// The span id derived from a stored id (the last 8 bytes: the random part of a
/// UUIDv7, the hash part of a UUIDv5): the handler's span for command `id`.
pub fn span_id_of(id: Uuid) -> [u8; 8] {
    let b = id.as_bytes();
    let mut out = [0u8; 8];
    out.copy_from_slice(&b[8..]);
    nonzero(out)
}

/// The span id of whoever published command `id` when no request span is at
/// hand (a role's own command): the first 8 bytes, unlike [`span_id_of`].
pub fn publisher_span_id_of(id: Uuid) -> [u8; 8] {
    let b = id.as_bytes();
    let mut out = [0u8; 8];
    out.copy_from_slice(&b[..8]);
    nonzero(out)
}

/// The trace id written as a correlation id, in hex (for log fields).
pub fn trace_id_hex(correlation_id: Uuid) -> String {
    hex(correlation_id.as_bytes())
}

/// The `traceparent` the relay puts on the message of an event: trace = its
/// correlation id, parent = the handler's span for its command (`causation_id`).
pub fn for_event(correlation_id: Uuid, causation_id: Uuid) -> TraceContext {
    TraceContext::new(correlation_id, span_id_of(causation_id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_format_round_trip() {
        let s = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        let tc = TraceContext::parse(s).unwrap();
        assert!(!tc.sampled);
        assert_eq!(tc.to_string(), s);
        assert_eq!(TraceContext::parse(&tc.to_string()), Some(tc));
    }

    #[test]
    fn malformed_values_are_refused() {
        for bad in [
            "",
            "00",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
        ] {
            assert!(TraceContext::parse(bad).is_none(), "{bad}");
        }
        // A later version is read by its first four fields.
        assert!(
            TraceContext::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what")
                .is_some()
        );
    }

    #[test]
    fn the_trace_id_is_the_correlation_id() {
        let correlation = Uuid::now_v7();
        let command = Uuid::now_v7();
        let tc = for_event(correlation, command);
        assert_eq!(tc.trace_uuid(), correlation);
        assert_eq!(tc.span_id, span_id_of(command));
        assert_eq!(tc.trace_id_hex(), trace_id_hex(correlation));
        assert_eq!(
            tc.trace_id_hex(),
            correlation.simple().to_string(),
            "hex of the bytes is the UUID's simple form"
        );
    }
}
