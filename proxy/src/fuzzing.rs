//! Entry points for the fuzz targets (`fuzz/fuzz_targets/proxy_*.rs`): each takes the raw
//! bytes a peer could send, runs them through the parser the proxy runs them through, and
//! panics only when a property of that parser breaks. Not an API: nothing in the proxy
//! calls these.

use std::net::{Ipv4Addr, SocketAddr};

use http::{HeaderMap, HeaderName, HeaderValue};
use pimesh_schema::DnsLabel;

use crate::config::routes::RouteTable;
use crate::control::discovery::document::Document;
use crate::telemetry::metrics::Metrics;
use crate::telemetry::trace::context::{self, SpanId};
use crate::transport::detect::{self, Detected};

/// The longest start of a stream the detector needs: the HTTP/2 connection preface.
const DETECTION_BUFFER: usize = 24;

/// Protocol detection on the first bytes of a connection. Properties: a decision taken
/// on a prefix holds for every longer stream (the detector peeks at a growing prefix and
/// stops at its first decision), and a full detection buffer always decides (otherwise a
/// client could hold a connection in detection until its timeout with bytes waiting).
pub fn protocol_detection(data: &[u8]) {
    let whole = detect::classify(data);
    if data.len() >= DETECTION_BUFFER {
        assert!(whole.is_some(), "{data:?}: a full buffer left undecided");
    }
    for end in 0..data.len() {
        if let Some(early) = detect::classify(&data[..end]) {
            assert_eq!(
                Some(early),
                whole,
                "{data:?}: decided {early:?} on {end} bytes, then {whole:?}"
            );
            break;
        }
    }
    if whole == Some(Detected::Http2) {
        assert!(data.starts_with(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"));
    }
}

/// Trace context headers, one `name: value` per line (lines that are not a valid header
/// are left out, as `http` would refuse them on the wire). Properties: when a context is
/// extracted, rewriting the headers for the next hop and extracting again yields the same
/// trace, the new span and the same sampling decision.
pub fn trace_headers(data: &[u8]) {
    let mut headers = HeaderMap::new();
    for line in data.split(|byte| *byte == b'\n') {
        let Some(colon) = line.iter().position(|byte| *byte == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.trim_ascii()),
            HeaderValue::from_bytes(value),
        ) {
            headers.append(name, value);
        }
    }
    let Some(incoming) = context::extract(&headers) else {
        return;
    };
    let span_id = SpanId::random_except(incoming.context.span_id);
    let mut next_hop = headers.clone();
    incoming.inject(&mut next_hop, span_id);
    let Some(outgoing) = context::extract(&next_hop) else {
        panic!("{headers:?}: rewritten as {next_hop:?}, which carries no context");
    };
    assert_eq!(outgoing.context.trace_id, incoming.context.trace_id);
    assert_eq!(outgoing.context.span_id, span_id, "{next_hop:?}");
    assert_eq!(outgoing.context.sampling, incoming.context.sampling);
    assert_eq!(outgoing.is_sampled(), incoming.is_sampled());
}

/// One line of a control replica's discovery stream. Properties: a document that parses
/// and whose config validates compiles into a routing table for each of its nodes and for
/// a proxy without an identity (the validator's bounds make every value safe to use), and
/// its server replicas never include port 0.
pub fn discovery_document(data: &[u8]) {
    let Ok(document) = Document::parse("fuzz", data) else {
        return;
    };
    assert!(document
        .server_replicas()
        .iter()
        .all(|addr| addr.port() != 0));
    let Ok(site) = DnsLabel::try_from(document.site.clone()) else {
        return;
    };
    let Ok(Some(site_config)) = document.site_config("fuzz", &site) else {
        return;
    };
    let metrics = Metrics::new();
    let own_inbound = SocketAddr::from((Ipv4Addr::LOCALHOST, 4143));
    let config = &site_config.config;
    let nodes = config.nodes.keys().map(Some).chain([None]);
    for node in nodes {
        RouteTable::build(config, &site_config.kube, node, own_inbound, &metrics, None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The committed seeds reach the deepest step of each target (a fuzzer that starts
    /// from seeds the parser refuses explores only the refusals), and hold its properties.
    #[test]
    fn the_seeds_reach_the_whole_path() {
        let document = include_bytes!("../../fuzz/seeds/proxy_discovery_document/document");
        let parsed = Document::parse("seed", document).expect("the seed parses");
        let site = DnsLabel::try_from(parsed.site.clone()).expect("site");
        let config = parsed
            .site_config("seed", &site)
            .expect("the seed's config validates");
        assert!(config.is_some());
        discovery_document(document);

        let w3c = include_bytes!("../../fuzz/seeds/proxy_trace_headers/w3c");
        let b3_multi = include_bytes!("../../fuzz/seeds/proxy_trace_headers/b3_multi");
        for seed in [&w3c[..], &b3_multi[..]] {
            let mut headers = HeaderMap::new();
            let text = std::str::from_utf8(seed).expect("text");
            for (name, value) in text.lines().filter_map(|line| line.split_once(':')) {
                headers.append(
                    HeaderName::from_bytes(name.as_bytes()).expect("name"),
                    HeaderValue::from_str(value.trim()).expect("value"),
                );
            }
            assert!(context::extract(&headers).is_some(), "{text}");
            trace_headers(seed);
        }

        let http2 = include_bytes!("../../fuzz/seeds/proxy_protocol_detection/http2");
        assert_eq!(detect::classify(http2), Some(Detected::Http2));
        protocol_detection(http2);
    }
}
