//! Trace context: the headers of the request a part serves that it copies onto the
//! requests it makes, so that one trace spans every hop (W3C and both B3 forms).

use http::header::{HeaderMap, HeaderName, HeaderValue};

/// The headers that carry a trace: W3C Trace Context, B3 single and B3 multi.
pub const TRACE_HEADERS: [&str; 8] = [
    "traceparent",
    "tracestate",
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
];

/// The trace headers of one served request.
#[derive(Clone, Debug, Default)]
pub struct TraceContext(Vec<(HeaderName, HeaderValue)>);

impl TraceContext {
    pub fn of(headers: &HeaderMap) -> TraceContext {
        TraceContext(
            TRACE_HEADERS
                .iter()
                .filter_map(|name| {
                    let value = headers.get(*name)?;
                    Some((HeaderName::from_static(name), value.clone()))
                })
                .collect(),
        )
    }

    /// Sets the headers on an outgoing request.
    pub fn apply(&self, headers: &mut HeaderMap) {
        for (name, value) in &self.0 {
            headers.insert(name.clone(), value.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_w3c_and_b3_headers_and_nothing_else() {
        let mut served = HeaderMap::new();
        served.insert(
            "traceparent",
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        served.insert("x-b3-traceid", HeaderValue::from_static("463ac35c9f6413ad"));
        served.insert(
            "b3",
            HeaderValue::from_static("463ac35c9f6413ad-a2fb4a1d1a96d312-1"),
        );
        served.insert("cookie", HeaderValue::from_static("secret"));
        let context = TraceContext::of(&served);
        let mut outgoing = HeaderMap::new();
        context.apply(&mut outgoing);
        assert_eq!(outgoing.len(), 3);
        assert_eq!(outgoing["traceparent"], served["traceparent"]);
        assert_eq!(outgoing["x-b3-traceid"], "463ac35c9f6413ad");
        assert_eq!(outgoing["b3"], served["b3"]);
        assert!(!outgoing.contains_key("cookie"));
    }
}
