//! The trace context formats the proxy reads and rewrites: W3C `traceparent`, B3 single
//! (`b3`) and B3 multi (`X-B3-*`).
//!
//! Invariants:
//! - Parsing never fails loudly: a value that is malformed (wrong length, non-hex, all-zero
//!   id, unknown `traceparent` version, the header repeated) is treated as if the header
//!   were absent.
//! - [`extract`] does not allocate and returns at once when none of `traceparent`, `b3`
//!   and `X-B3-TraceId` is present.
//! - [`Incoming::inject`] only rewrites formats that arrived valid and belong to the same
//!   trace as the chosen context; it never adds a format and never touches `tracestate`.

use std::fmt;

use http::{HeaderMap, HeaderValue};

/// W3C trace context: `00-{trace-id:32}-{parent-id:16}-{flags:2}`, lowercase hex.
pub const TRACEPARENT: &str = "traceparent";
/// B3 single header: `{trace-id}-{span-id}[-{sampling}[-{parent-span-id}]]`, or `0`.
pub const B3: &str = "b3";
/// B3 multi headers.
pub const X_B3_TRACE_ID: &str = "x-b3-traceid";
pub const X_B3_SPAN_ID: &str = "x-b3-spanid";
pub const X_B3_PARENT_SPAN_ID: &str = "x-b3-parentspanid";
pub const X_B3_SAMPLED: &str = "x-b3-sampled";
pub const X_B3_FLAGS: &str = "x-b3-flags";

/// A trace id, 64 or 128 bits wide as it arrived.
///
/// Invariant: `value != 0`, and `value < 2^64` when `!wide`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceId {
    value: u128,
    wide: bool,
}

impl TraceId {
    /// Parses 16 (64-bit) or 32 (128-bit) hex digits; `None` for any other length,
    /// non-hex digits (uppercase only when `uppercase_ok`) or zero.
    fn parse(text: &str, uppercase_ok: bool) -> Option<TraceId> {
        let wide = match text.len() {
            16 => false,
            32 => true,
            _ => return None,
        };
        let value = parse_hex(text, uppercase_ok)?;
        (value != 0).then_some(TraceId { value, wide })
    }

    /// The id as OTLP carries it: 16 bytes, big-endian; a 64-bit id fills the low 8
    /// (zero-padded on the left, as OpenTelemetry's B3 propagator does).
    pub fn to_bytes(self) -> [u8; 16] {
        self.value.to_be_bytes()
    }

    /// Whether both ids name the same trace: equal, or a 64-bit id equal to the low 64
    /// bits of a 128-bit one (Zipkin's rule for mixed-width instrumentation).
    fn same_trace(self, other: TraceId) -> bool {
        if self.wide == other.wide {
            self.value == other.value
        } else {
            self.value as u64 == other.value as u64
        }
    }
}

impl fmt::Display for TraceId {
    /// Lowercase hex, as wide as the id arrived (16 or 32 digits).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.wide {
            write!(f, "{:032x}", self.value)
        } else {
            write!(f, "{:016x}", self.value as u64)
        }
    }
}

/// A span id. Invariant: never zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpanId(u64);

impl SpanId {
    /// Parses exactly 16 hex digits (uppercase only when `uppercase_ok`); `None` for zero.
    fn parse(text: &str, uppercase_ok: bool) -> Option<SpanId> {
        if text.len() != 16 {
            return None;
        }
        let value = parse_hex(text, uppercase_ok)?;
        (value != 0).then_some(SpanId(value as u64))
    }

    /// The id as OTLP carries it: 8 bytes, big-endian.
    pub fn to_bytes(self) -> [u8; 8] {
        self.0.to_be_bytes()
    }

    /// A random, non-zero span id different from `other` (the incoming span id, so that a
    /// span is never its own parent).
    pub fn random_except(other: SpanId) -> SpanId {
        loop {
            let value = fastrand::u64(1..);
            if value != other.0 {
                return SpanId(value);
            }
        }
    }
}

impl fmt::Display for SpanId {
    /// 16 lowercase hex digits.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// The sampling decision that came with a context.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sampling {
    /// Sampled (`traceparent` flag 01, B3 `1`/`true`).
    Accept,
    /// Sampled and forced (B3 `d`, `X-B3-Flags: 1`).
    Debug,
    /// Not sampled (`traceparent` flag 00, B3 `0`/`false`).
    Deny,
    /// No decision was sent (B3 without a sampling field).
    Deferred,
}

impl Sampling {
    /// Whether the proxy records a span: only for an explicit positive decision (the proxy
    /// never makes sampling decisions of its own, so a deferred one counts as "no").
    pub fn is_sampled(self) -> bool {
        matches!(self, Sampling::Accept | Sampling::Debug)
    }

    /// The B3 single header's sampling field; `None` when deferred (field left out).
    fn b3_field(self) -> Option<&'static str> {
        match self {
            Sampling::Accept => Some("1"),
            Sampling::Debug => Some("d"),
            Sampling::Deny => Some("0"),
            Sampling::Deferred => None,
        }
    }
}

/// One incoming context: the caller's span in a trace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Context {
    pub trace_id: TraceId,
    /// The caller's span: the parent of the span this hop makes.
    pub span_id: SpanId,
    pub sampling: Sampling,
}

/// What arrived on one request: the context the proxy joins and every valid format, so
/// that each can be rewritten as it arrived.
///
/// Invariant: `context` equals the first present of `w3c`, `b3_single`, `b3_multi`
/// (precedence: W3C, then B3 single, then B3 multi).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Incoming {
    pub context: Context,
    /// `b3: 0` arrived: an explicit "do not sample" that overrides every other format.
    deny: bool,
    w3c: Option<(Context, u8)>,
    b3_single: Option<Context>,
    b3_multi: Option<Context>,
}

impl Incoming {
    /// Whether this hop records a span and rewrites the headers: the chosen context is
    /// sampled and no `b3: 0` arrived.
    pub fn is_sampled(&self) -> bool {
        !self.deny && self.context.sampling.is_sampled()
    }

    /// Rewrites every format that arrived valid and belongs to the chosen context's trace
    /// so that the next hop sees `span_id` as its parent's span: the span id becomes
    /// `span_id`, the parent span id (where the format has one) the incoming span id. The
    /// trace id (at its width) and the sampling state stay as they arrived.
    pub fn inject(&self, headers: &mut HeaderMap, span_id: SpanId) {
        let trace_id = self.context.trace_id;
        let parent = self.context.span_id;
        if let Some((w3c, flags)) = self.w3c {
            if w3c.trace_id.same_trace(trace_id) {
                let value = format!("00-{}-{span_id}-{flags:02x}", w3c.trace_id);
                set(headers, TRACEPARENT, value);
            }
        }
        if let Some(b3) = self.b3_single {
            if b3.trace_id.same_trace(trace_id) {
                // The parent field needs the sampling field before it; without a decision
                // the header carries only the ids (the B3 spec allows both forms).
                let value = match b3.sampling.b3_field() {
                    Some(sampling) => format!("{}-{span_id}-{sampling}-{parent}", b3.trace_id),
                    None => format!("{}-{span_id}", b3.trace_id),
                };
                set(headers, B3, value);
            }
        }
        if let Some(b3) = self.b3_multi {
            if b3.trace_id.same_trace(trace_id) {
                set(headers, X_B3_SPAN_ID, span_id.to_string());
                set(headers, X_B3_PARENT_SPAN_ID, parent.to_string());
            }
        }
    }
}

/// Reads the incoming context from `headers`; `None` when there is none that is valid.
pub fn extract(headers: &HeaderMap) -> Option<Incoming> {
    if !(headers.contains_key(TRACEPARENT)
        || headers.contains_key(B3)
        || headers.contains_key(X_B3_TRACE_ID))
    {
        return None;
    }
    let w3c = single(headers, TRACEPARENT).and_then(parse_traceparent);
    let (b3_single, deny) = match single(headers, B3).map(parse_b3_single) {
        Some(B3Single::Context(context)) => (Some(context), false),
        Some(B3Single::Deny) => (None, true),
        Some(B3Single::Invalid) | None => (None, false),
    };
    let b3_multi = parse_b3_multi(headers);
    let context = w3c.map(|(context, _)| context).or(b3_single).or(b3_multi)?;
    Some(Incoming {
        context,
        deny,
        w3c,
        b3_single,
        b3_multi,
    })
}

/// The header's value as text when it occurs exactly once and is visible ASCII.
fn single<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    let mut values = headers.get_all(name).iter();
    let first = values.next()?;
    if values.next().is_some() {
        return None;
    }
    first.to_str().ok()
}

/// Replaces the header's value(s). The values built here (hex digits and `-`) are always
/// valid header values; anything else leaves the header as it was.
fn set(headers: &mut HeaderMap, name: &'static str, value: String) {
    if let Ok(value) = HeaderValue::try_from(value) {
        headers.insert(name, value);
    }
}

/// `00-{trace-id}-{parent-id}-{flags}`: only version 00 and only its exact length (55);
/// lowercase hex as the W3C spec requires. Returns the context and the flags byte.
fn parse_traceparent(value: &str) -> Option<(Context, u8)> {
    if value.len() != 55 {
        return None;
    }
    let mut fields = value.split('-');
    let (version, trace_id, span_id, flags) = (
        fields.next()?,
        fields.next()?,
        fields.next()?,
        fields.next()?,
    );
    if version != "00" || fields.next().is_some() || flags.len() != 2 {
        return None;
    }
    let trace_id = TraceId::parse(trace_id, false)?;
    if !trace_id.wide {
        return None;
    }
    let span_id = SpanId::parse(span_id, false)?;
    let flags = parse_hex(flags, false)? as u8;
    let sampling = if flags & 1 == 1 {
        Sampling::Accept
    } else {
        Sampling::Deny
    };
    Some((
        Context {
            trace_id,
            span_id,
            sampling,
        },
        flags,
    ))
}

enum B3Single {
    Context(Context),
    /// `b3: 0`.
    Deny,
    Invalid,
}

/// `{trace-id}-{span-id}[-{sampling}[-{parent-span-id}]]`, or a lone sampling state. A
/// lone `1`/`d` carries no ids and so nothing to join: treated as absent.
fn parse_b3_single(value: &str) -> B3Single {
    if value == "0" {
        return B3Single::Deny;
    }
    parse_b3_ids(value).map_or(B3Single::Invalid, B3Single::Context)
}

fn parse_b3_ids(value: &str) -> Option<Context> {
    let mut fields = value.split('-');
    let trace_id = TraceId::parse(fields.next()?, true)?;
    let span_id = SpanId::parse(fields.next()?, true)?;
    let sampling = match fields.next() {
        None => Sampling::Deferred,
        Some("1") => Sampling::Accept,
        Some("d") => Sampling::Debug,
        Some("0") => Sampling::Deny,
        Some(_) => return None,
    };
    if let Some(parent) = fields.next() {
        // Validated so that a malformed header is ignored as a whole; the value itself is
        // not needed (this hop's parent is the incoming span id).
        SpanId::parse(parent, true)?;
    }
    if fields.next().is_some() {
        return None;
    }
    Some(Context {
        trace_id,
        span_id,
        sampling,
    })
}

/// `X-B3-TraceId` and `X-B3-SpanId` must both be valid. `X-B3-Flags: 1` (debug) wins over
/// `X-B3-Sampled`; an unrecognised sampling value counts as no decision. The incoming
/// `X-B3-ParentSpanId` is not needed and not checked.
fn parse_b3_multi(headers: &HeaderMap) -> Option<Context> {
    let trace_id = TraceId::parse(single(headers, X_B3_TRACE_ID)?, true)?;
    let span_id = SpanId::parse(single(headers, X_B3_SPAN_ID)?, true)?;
    let sampling = if single(headers, X_B3_FLAGS) == Some("1") {
        Sampling::Debug
    } else {
        match single(headers, X_B3_SAMPLED) {
            Some("1") | Some("true") => Sampling::Accept,
            Some("0") | Some("false") => Sampling::Deny,
            _ => Sampling::Deferred,
        }
    };
    Some(Context {
        trace_id,
        span_id,
        sampling,
    })
}

/// Parses 1 to 32 hex digits without a sign (unlike `u128::from_str_radix`, which takes a
/// leading `+`).
fn parse_hex(text: &str, uppercase_ok: bool) -> Option<u128> {
    if text.is_empty() || text.len() > 32 {
        return None;
    }
    let mut value: u128 = 0;
    for byte in text.bytes() {
        let digit = match byte {
            b'0'..=b'9' => byte - b'0',
            b'a'..=b'f' => byte - b'a' + 10,
            b'A'..=b'F' if uppercase_ok => byte - b'A' + 10,
            _ => return None,
        };
        value = (value << 4) | u128::from(digit);
    }
    Some(value)
}

#[cfg(test)]
impl TraceId {
    /// `text` (16 or 32 lowercase hex digits) as a trace id, for other modules' tests.
    pub fn parse_for_test(text: &str) -> TraceId {
        TraceId::parse(text, false).expect("a trace id")
    }
}

#[cfg(test)]
impl SpanId {
    /// `text` (16 lowercase hex digits) as a span id, for other modules' tests.
    pub fn parse_for_test(text: &str) -> SpanId {
        SpanId::parse(text, false).expect("a span id")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const SPAN: &str = "00f067aa0ba902b7";

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    fn get<'a>(map: &'a HeaderMap, name: &str) -> Option<&'a str> {
        map.get(name).and_then(|value| value.to_str().ok())
    }

    #[test]
    fn traceparent_parses() {
        let map = headers(&[(TRACEPARENT, &format!("00-{TRACE}-{SPAN}-01"))]);
        let incoming = extract(&map).unwrap();
        assert_eq!(incoming.context.trace_id.to_string(), TRACE);
        assert_eq!(incoming.context.span_id.to_string(), SPAN);
        assert_eq!(incoming.context.sampling, Sampling::Accept);
        assert!(incoming.is_sampled());
    }

    #[test]
    fn traceparent_rewrite_keeps_trace_and_flags() {
        let mut map = headers(&[
            (TRACEPARENT, &format!("00-{TRACE}-{SPAN}-03")),
            ("tracestate", "congo=t61rcWkgMzE"),
        ]);
        let incoming = extract(&map).unwrap();
        let new = SpanId::random_except(incoming.context.span_id);
        incoming.inject(&mut map, new);
        let expected = format!("00-{TRACE}-{new}-03");
        assert_eq!(get(&map, TRACEPARENT), Some(expected.as_str()));
        assert_eq!(get(&map, "tracestate"), Some("congo=t61rcWkgMzE"));
        // The next hop parses it back, with this hop's span as its parent.
        let next = extract(&map).unwrap();
        assert_eq!(next.context.trace_id, incoming.context.trace_id);
        assert_eq!(next.context.span_id, new);
        assert_ne!(new, incoming.context.span_id);
    }

    #[test]
    fn traceparent_not_sampled() {
        let map = headers(&[(TRACEPARENT, &format!("00-{TRACE}-{SPAN}-00"))]);
        let incoming = extract(&map).unwrap();
        assert_eq!(incoming.context.sampling, Sampling::Deny);
        assert!(!incoming.is_sampled());
    }

    #[test]
    fn traceparent_invalid_is_ignored() {
        let zero_trace = format!("00-{}-{SPAN}-01", "0".repeat(32));
        let zero_span = format!("00-{TRACE}-{}-01", "0".repeat(16));
        let upper = format!("00-{}-{SPAN}-01", TRACE.to_uppercase());
        let short = format!("00-{}-{SPAN}-01", &TRACE[..31]);
        let version = format!("01-{TRACE}-{SPAN}-01");
        let forbidden = format!("ff-{TRACE}-{SPAN}-01");
        let non_hex = format!("00-{}g-{SPAN}-01", &TRACE[..31]);
        let plus = format!("00-+{}-{SPAN}-01", &TRACE[..31]);
        let trailing = format!("00-{TRACE}-{SPAN}-01-");
        let bad_flags = format!("00-{TRACE}-{SPAN}-0x");
        for value in [
            zero_trace, zero_span, upper, short, version, forbidden, non_hex, plus, trailing,
            bad_flags,
        ] {
            let map = headers(&[(TRACEPARENT, &value)]);
            assert_eq!(extract(&map), None, "{value}");
        }
        // Repeated header: ambiguous, ignored.
        let value = format!("00-{TRACE}-{SPAN}-01");
        let map = headers(&[(TRACEPARENT, &value), (TRACEPARENT, &value)]);
        assert_eq!(extract(&map), None);
    }

    #[test]
    fn b3_single_parses_all_forms() {
        let cases = [
            (format!("{TRACE}-{SPAN}"), Sampling::Deferred),
            (format!("{TRACE}-{SPAN}-1"), Sampling::Accept),
            (format!("{TRACE}-{SPAN}-d"), Sampling::Debug),
            (format!("{TRACE}-{SPAN}-0"), Sampling::Deny),
            (
                format!("{TRACE}-{SPAN}-1-05e3ac9a4f6e3b90"),
                Sampling::Accept,
            ),
            (format!("{}-{SPAN}-1", &TRACE[16..]), Sampling::Accept),
        ];
        for (value, sampling) in cases {
            let map = headers(&[(B3, &value)]);
            let incoming = extract(&map).unwrap();
            assert_eq!(incoming.context.sampling, sampling, "{value}");
            assert_eq!(incoming.context.span_id.to_string(), SPAN);
        }
    }

    #[test]
    fn b3_single_rewrite_sets_parent() {
        for trace in [TRACE, &TRACE[16..]] {
            let mut map = headers(&[(B3, &format!("{trace}-{SPAN}-1-05e3ac9a4f6e3b90"))]);
            let incoming = extract(&map).unwrap();
            let new = SpanId::random_except(incoming.context.span_id);
            incoming.inject(&mut map, new);
            let expected = format!("{trace}-{new}-1-{SPAN}");
            assert_eq!(get(&map, B3), Some(expected.as_str()));
            let next = extract(&map).unwrap();
            assert_eq!(next.context.trace_id.to_string(), trace);
            assert_eq!(next.context.span_id, new);
            assert_eq!(next.context.sampling, Sampling::Accept);
        }
        // Debug stays debug.
        let mut map = headers(&[(B3, &format!("{TRACE}-{SPAN}-d"))]);
        let incoming = extract(&map).unwrap();
        let new = SpanId::random_except(incoming.context.span_id);
        incoming.inject(&mut map, new);
        let expected = format!("{TRACE}-{new}-d-{SPAN}");
        assert_eq!(get(&map, B3), Some(expected.as_str()));
    }

    #[test]
    fn b3_single_uppercase_is_accepted_and_rewritten_lowercase() {
        let mut map = headers(&[(B3, &format!("{}-{SPAN}-1", TRACE.to_uppercase()))]);
        let incoming = extract(&map).unwrap();
        assert_eq!(incoming.context.trace_id.to_string(), TRACE);
        let new = SpanId::random_except(incoming.context.span_id);
        incoming.inject(&mut map, new);
        let expected = format!("{TRACE}-{new}-1-{SPAN}");
        assert_eq!(get(&map, B3), Some(expected.as_str()));
    }

    #[test]
    fn b3_deny_overrides_everything() {
        let map = headers(&[(B3, "0")]);
        assert_eq!(extract(&map), None);
        let map = headers(&[(B3, "0"), (TRACEPARENT, &format!("00-{TRACE}-{SPAN}-01"))]);
        let incoming = extract(&map).unwrap();
        assert!(!incoming.is_sampled());
    }

    #[test]
    fn b3_single_invalid_is_ignored() {
        let zero_trace = format!("{}-{SPAN}-1", "0".repeat(32));
        let zero_span = format!("{TRACE}-{}-1", "0".repeat(16));
        let bad_sampling = format!("{TRACE}-{SPAN}-x");
        let bad_parent = format!("{TRACE}-{SPAN}-1-0000000000000000");
        let short_parent = format!("{TRACE}-{SPAN}-1-05e3ac9a");
        let extra = format!("{TRACE}-{SPAN}-1-05e3ac9a4f6e3b90-1");
        let wrong_width = format!("{}-{SPAN}-1", &TRACE[..20]);
        let non_hex = format!("{TRACE}-{}z-1", &SPAN[..15]);
        for value in [
            "1".to_string(),
            "d".to_string(),
            String::new(),
            "-".to_string(),
            zero_trace,
            zero_span,
            bad_sampling,
            bad_parent,
            short_parent,
            extra,
            wrong_width,
            non_hex,
        ] {
            let map = headers(&[(B3, &value)]);
            assert_eq!(extract(&map), None, "{value:?}");
        }
    }

    #[test]
    fn b3_multi_parses_and_rewrites() {
        for trace in [TRACE, &TRACE[16..]] {
            let mut map = headers(&[
                (X_B3_TRACE_ID, trace),
                (X_B3_SPAN_ID, SPAN),
                (X_B3_PARENT_SPAN_ID, "05e3ac9a4f6e3b90"),
                (X_B3_SAMPLED, "1"),
            ]);
            let incoming = extract(&map).unwrap();
            assert!(incoming.is_sampled());
            let new = SpanId::random_except(incoming.context.span_id);
            incoming.inject(&mut map, new);
            assert_eq!(get(&map, X_B3_TRACE_ID), Some(trace));
            assert_eq!(get(&map, X_B3_SPAN_ID), Some(new.to_string().as_str()));
            assert_eq!(get(&map, X_B3_PARENT_SPAN_ID), Some(SPAN));
            assert_eq!(get(&map, X_B3_SAMPLED), Some("1"));
            assert_eq!(extract(&map).unwrap().context.span_id, new);
        }
    }

    #[test]
    fn b3_multi_sampling_states() {
        let cases: [(&[(&'static str, &str)], Sampling); 6] = [
            (&[(X_B3_SAMPLED, "1")], Sampling::Accept),
            (&[(X_B3_SAMPLED, "true")], Sampling::Accept),
            (&[(X_B3_SAMPLED, "0")], Sampling::Deny),
            (&[(X_B3_SAMPLED, "maybe")], Sampling::Deferred),
            (&[], Sampling::Deferred),
            (&[(X_B3_SAMPLED, "0"), (X_B3_FLAGS, "1")], Sampling::Debug),
        ];
        for (extra, sampling) in cases {
            let mut pairs = vec![(X_B3_TRACE_ID, TRACE), (X_B3_SPAN_ID, SPAN)];
            pairs.extend_from_slice(extra);
            let incoming = extract(&headers(&pairs)).unwrap();
            assert_eq!(incoming.context.sampling, sampling, "{extra:?}");
        }
    }

    #[test]
    fn b3_multi_invalid_is_ignored() {
        let cases: [&[(&'static str, &str)]; 5] = [
            &[(X_B3_TRACE_ID, TRACE)],
            &[(X_B3_TRACE_ID, "0000000000000000"), (X_B3_SPAN_ID, SPAN)],
            &[(X_B3_TRACE_ID, TRACE), (X_B3_SPAN_ID, "0000000000000000")],
            &[(X_B3_TRACE_ID, &TRACE[..20]), (X_B3_SPAN_ID, SPAN)],
            &[(X_B3_TRACE_ID, TRACE), (X_B3_SPAN_ID, "00f067aa0ba902bq")],
        ];
        for pairs in cases {
            assert_eq!(extract(&headers(pairs)), None, "{pairs:?}");
        }
    }

    #[test]
    fn no_trace_headers() {
        assert_eq!(extract(&HeaderMap::new()), None);
        // Sampling or span headers alone carry no context.
        let map = headers(&[(X_B3_SAMPLED, "1"), (X_B3_SPAN_ID, SPAN)]);
        assert_eq!(extract(&map), None);
    }

    #[test]
    fn non_ascii_value_is_ignored() {
        let mut map = HeaderMap::new();
        map.insert(TRACEPARENT, HeaderValue::from_bytes(b"00-\xff").unwrap());
        assert_eq!(extract(&map), None);
    }

    #[test]
    fn all_formats_of_the_same_trace_are_rewritten() {
        let mut map = headers(&[
            (TRACEPARENT, &format!("00-{TRACE}-{SPAN}-01")),
            (B3, &format!("{}-{SPAN}-1", &TRACE[16..])),
            (X_B3_TRACE_ID, TRACE),
            (X_B3_SPAN_ID, SPAN),
            (X_B3_SAMPLED, "1"),
        ]);
        let incoming = extract(&map).unwrap();
        let new = SpanId::random_except(incoming.context.span_id);
        incoming.inject(&mut map, new);
        let w3c = format!("00-{TRACE}-{new}-01");
        let b3 = format!("{}-{new}-1-{SPAN}", &TRACE[16..]);
        assert_eq!(get(&map, TRACEPARENT), Some(w3c.as_str()));
        assert_eq!(get(&map, B3), Some(b3.as_str()));
        assert_eq!(get(&map, X_B3_SPAN_ID), Some(new.to_string().as_str()));
        assert_eq!(get(&map, X_B3_PARENT_SPAN_ID), Some(SPAN));
    }

    #[test]
    fn precedence_and_other_traces_left_alone() {
        let other = "a".repeat(32);
        let b3 = format!("{other}-{SPAN}-1");
        let mut map = headers(&[(B3, &b3), (TRACEPARENT, &format!("00-{TRACE}-{SPAN}-01"))]);
        let incoming = extract(&map).unwrap();
        assert_eq!(incoming.context.trace_id.to_string(), TRACE);
        let new = SpanId::random_except(incoming.context.span_id);
        incoming.inject(&mut map, new);
        assert_eq!(get(&map, B3), Some(b3.as_str()));
        // B3 single wins over B3 multi.
        let map = headers(&[
            (X_B3_TRACE_ID, TRACE),
            (X_B3_SPAN_ID, SPAN),
            (B3, &format!("{other}-{SPAN}-1")),
        ]);
        assert_eq!(extract(&map).unwrap().context.trace_id.to_string(), other);
        // An invalid higher-precedence header falls through to the next format.
        let map = headers(&[(TRACEPARENT, "garbage"), (B3, &format!("{other}-{SPAN}-1"))]);
        assert_eq!(extract(&map).unwrap().context.trace_id.to_string(), other);
    }

    #[test]
    fn random_span_id_differs_and_is_not_zero() {
        let incoming = SpanId(1);
        for _ in 0..1000 {
            let id = SpanId::random_except(incoming);
            assert_ne!(id, incoming);
            assert_ne!(id.0, 0);
        }
    }
}
