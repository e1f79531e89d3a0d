//! A batch of spans as a Zipkin v2 JSON array (<https://zipkin.io/zipkin-api/#/default/post_spans>).

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::Serialize;

use super::finished::FinishedSpan;
use super::Kind;

/// The batch as a Zipkin v2 JSON array.
pub(super) fn encode(
    batch: &[FinishedSpan],
    service_name: &str,
) -> Result<Vec<u8>, serde_json::Error> {
    let spans: Vec<ZipkinSpan<'_>> = batch
        .iter()
        .map(|span| ZipkinSpan::new(span, service_name))
        .collect();
    serde_json::to_vec(&spans)
}

/// One span in Zipkin's v2 model (<https://zipkin.io/zipkin-api/#/default/post_spans>).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ZipkinSpan<'a> {
    trace_id: String,
    id: String,
    parent_id: String,
    name: &'a str,
    kind: &'static str,
    timestamp: u64,
    duration: u64,
    local_endpoint: Endpoint<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    remote_endpoint: Option<Endpoint<'a>>,
    tags: BTreeMap<&'static str, String>,
}

#[derive(Serialize, Default)]
#[serde(rename_all = "camelCase")]
struct Endpoint<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    service_name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ipv4: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ipv6: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    port: Option<u16>,
}

impl<'a> ZipkinSpan<'a> {
    fn new(span: &'a FinishedSpan, service_name: &'a str) -> ZipkinSpan<'a> {
        let mut tags = BTreeMap::new();
        tags.insert("http.method", span.method.as_str().to_string());
        tags.insert("http.path", span.path.clone());
        tags.insert("pimesh.dst_service", span.dst_service.clone());
        if span.status != 0 {
            tags.insert("http.status_code", span.status.to_string());
        }
        if span.status == 0 {
            tags.insert("error", "no response".to_string());
        } else if span.status >= 500 {
            tags.insert("error", span.status.to_string());
        }
        ZipkinSpan {
            trace_id: span.trace_id.to_string(),
            id: span.id.to_string(),
            parent_id: span.parent_id.to_string(),
            // The method alone: paths carry ids, and span names are indexed by the
            // collector, so they must stay few. The path is in `http.path`.
            name: span.method.as_str(),
            kind: match span.kind {
                Kind::Server => "SERVER",
                Kind::Client => "CLIENT",
            },
            timestamp: span.timestamp_us,
            duration: span.duration_us.max(1),
            local_endpoint: Endpoint {
                service_name: Some(service_name),
                ..Endpoint::default()
            },
            remote_endpoint: span.remote.map(remote_endpoint),
            tags,
        }
    }
}

fn remote_endpoint<'a>(addr: SocketAddr) -> Endpoint<'a> {
    let (ipv4, ipv6) = match addr.ip().to_canonical() {
        std::net::IpAddr::V4(ip) => (Some(ip.to_string()), None),
        std::net::IpAddr::V6(ip) => (None, Some(ip.to_string())),
    };
    Endpoint {
        service_name: None,
        ipv4,
        ipv6,
        port: Some(addr.port()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_endpoint_uses_the_address_family() {
        let v4 = serde_json::to_value(remote_endpoint("10.0.0.1:80".parse().unwrap())).unwrap();
        assert_eq!(v4, serde_json::json!({"ipv4": "10.0.0.1", "port": 80}));
        let mapped =
            serde_json::to_value(remote_endpoint("[::ffff:10.0.0.1]:80".parse().unwrap())).unwrap();
        assert_eq!(mapped, serde_json::json!({"ipv4": "10.0.0.1", "port": 80}));
        let v6 = serde_json::to_value(remote_endpoint("[fd00::1]:443".parse().unwrap())).unwrap();
        assert_eq!(v6, serde_json::json!({"ipv6": "fd00::1", "port": 443}));
    }
}
