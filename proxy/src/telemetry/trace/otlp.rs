//! A batch of spans as an OTLP `ExportTraceServiceRequest` (protobuf, for OTLP/HTTP's
//! `application/x-protobuf`), with the message types of `opentelemetry-proto`.
//!
//! One resource (this proxy: `service.name = "pimesh-proxy"`, `service.version`,
//! `host.name` = the node), one scope, the batch's spans. Attribute names follow the
//! OpenTelemetry HTTP semantic conventions; what the Zipkin exporter puts in tags, this
//! one puts in attributes and the span status.

use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, SpanFlags, Status};
use prost::Message as _;

use super::finished::FinishedSpan;
use super::Kind;

/// `service.name` of every span this proxy exports.
pub(super) const SERVICE_NAME: &str = "pimesh-proxy";

/// The W3C trace flag "sampled": the proxy records only sampled spans.
const SAMPLED: u32 = 0x01;

/// `batch` as an encoded `ExportTraceServiceRequest`; `node` names this proxy's node.
pub(super) fn encode(batch: &[FinishedSpan], node: &str) -> Vec<u8> {
    request(batch, node).encode_to_vec()
}

/// The spans a collector's 2xx answer (an encoded `ExportTraceServiceResponse`) rejects
/// through `partial_success`, and its message; `None` when it rejects none, or when the
/// answer is not such a message (an empty body, as many collectors send, takes them all).
pub(super) fn rejected(answer: &[u8]) -> Option<(u64, String)> {
    let partial = ExportTraceServiceResponse::decode(answer)
        .ok()?
        .partial_success?;
    let count = u64::try_from(partial.rejected_spans)
        .ok()
        .filter(|n| *n > 0)?;
    Some((count, partial.error_message))
}

fn request(batch: &[FinishedSpan], node: &str) -> ExportTraceServiceRequest {
    let resource = Resource {
        attributes: vec![
            string("service.name", SERVICE_NAME),
            string("service.version", env!("CARGO_PKG_VERSION")),
            string("host.name", node),
        ],
        ..Resource::default()
    };
    let scope = InstrumentationScope {
        name: SERVICE_NAME.to_owned(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        ..InstrumentationScope::default()
    };
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(resource),
            scope_spans: vec![ScopeSpans {
                scope: Some(scope),
                spans: batch.iter().map(span).collect(),
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        }],
    }
}

fn span(span: &FinishedSpan) -> Span {
    let start = span.timestamp_us.saturating_mul(1_000);
    let end = start.saturating_add(span.duration_us.max(1).saturating_mul(1_000));
    let mut attributes = vec![
        string("http.request.method", span.method.as_str()),
        string("url.path", &span.path),
        string("pimesh.dst_service", &span.dst_service),
    ];
    if span.status != 0 {
        attributes.push(int("http.response.status_code", i64::from(span.status)));
    }
    if let Some(remote) = span.remote {
        // The peer of this hop: the caller (SERVER) or the endpoint sent to (CLIENT).
        let ip = remote.ip().to_canonical().to_string();
        attributes.push(string("network.peer.address", &ip));
        attributes.push(int("network.peer.port", i64::from(remote.port())));
    }
    // As the Zipkin exporter's `error` tag: no response, or a 5xx.
    let status = if span.status == 0 {
        attributes.push(string("error.type", "no_response"));
        Status {
            message: "no response".to_owned(),
            code: StatusCode::Error as i32,
        }
    } else if span.status >= 500 {
        attributes.push(string("error.type", &span.status.to_string()));
        Status {
            message: String::new(),
            code: StatusCode::Error as i32,
        }
    } else {
        Status::default()
    };
    Span {
        trace_id: span.trace_id.to_bytes().to_vec(),
        span_id: span.id.to_bytes().to_vec(),
        parent_span_id: span.parent_id.to_bytes().to_vec(),
        // Sampled, and the parent came from another process (the caller or the previous
        // hop).
        flags: SAMPLED
            | SpanFlags::ContextHasIsRemoteMask as u32
            | SpanFlags::ContextIsRemoteMask as u32,
        // The method alone, as for Zipkin: span names must stay few.
        name: span.method.as_str().to_owned(),
        kind: match span.kind {
            Kind::Server => SpanKind::Server,
            Kind::Client => SpanKind::Client,
        } as i32,
        start_time_unix_nano: start,
        end_time_unix_nano: end,
        attributes,
        status: Some(status),
        ..Span::default()
    }
}

fn string(key: &str, value: &str) -> KeyValue {
    attribute(key, Value::StringValue(value.to_owned()))
}

fn int(key: &str, value: i64) -> KeyValue {
    attribute(key, Value::IntValue(value))
}

fn attribute(key: &str, value: Value) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue { value: Some(value) }),
        ..KeyValue::default()
    }
}

#[cfg(test)]
mod tests {
    use http::Method;
    use prost::Message as _;

    use super::super::context::{SpanId, TraceId};
    use super::*;

    fn attr<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a Value> {
        attributes
            .iter()
            .find(|kv| kv.key == key)
            .and_then(|kv| kv.value.as_ref())
            .and_then(|value| value.value.as_ref())
    }

    fn finished(trace: &str, kind: Kind, status: u16) -> FinishedSpan {
        FinishedSpan {
            trace_id: TraceId::parse_for_test(trace),
            id: SpanId::parse_for_test("00f067aa0ba902b7"),
            parent_id: SpanId::parse_for_test("a2fb4a1d1a96d312"),
            kind,
            method: Method::POST,
            path: "/submit".into(),
            dst_service: "api".into(),
            remote: Some("[::ffff:10.0.0.7]:4143".parse().unwrap()),
            timestamp_us: 1_700_000_000_000_000,
            duration_us: 1_500,
            status,
        }
    }

    #[test]
    fn a_batch_decodes_back_with_ids_kinds_times_and_attributes() {
        let batch = [
            finished("4bf92f3577b34da6a3ce929d0e0e4736", Kind::Client, 200),
            finished("463ac35c9f6413ad", Kind::Server, 503),
        ];
        let body = encode(&batch, "pi-a");
        let request = ExportTraceServiceRequest::decode(body.as_slice()).unwrap();
        assert_eq!(request.resource_spans.len(), 1);
        let resource = request.resource_spans[0].resource.as_ref().unwrap();
        assert_eq!(
            attr(&resource.attributes, "service.name"),
            Some(&Value::StringValue("pimesh-proxy".into()))
        );
        assert_eq!(
            attr(&resource.attributes, "host.name"),
            Some(&Value::StringValue("pi-a".into()))
        );
        let spans = &request.resource_spans[0].scope_spans[0].spans;
        assert_eq!(spans.len(), 2);

        let client = &spans[0];
        assert_eq!(
            client.trace_id,
            [
                0x4b, 0xf9, 0x2f, 0x35, 0x77, 0xb3, 0x4d, 0xa6, 0xa3, 0xce, 0x92, 0x9d, 0x0e, 0x0e,
                0x47, 0x36
            ]
        );
        assert_eq!(
            client.span_id,
            [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]
        );
        assert_eq!(
            client.parent_span_id,
            [0xa2, 0xfb, 0x4a, 0x1d, 0x1a, 0x96, 0xd3, 0x12]
        );
        assert_eq!(client.kind, SpanKind::Client as i32);
        assert_eq!(client.name, "POST");
        assert_eq!(client.start_time_unix_nano, 1_700_000_000_000_000_000);
        assert_eq!(client.end_time_unix_nano, 1_700_000_000_001_500_000);
        assert_eq!(client.flags & 0xff, 1, "sampled");
        assert_eq!(
            attr(&client.attributes, "http.request.method"),
            Some(&Value::StringValue("POST".into()))
        );
        assert_eq!(
            attr(&client.attributes, "url.path"),
            Some(&Value::StringValue("/submit".into()))
        );
        assert_eq!(
            attr(&client.attributes, "http.response.status_code"),
            Some(&Value::IntValue(200))
        );
        assert_eq!(
            attr(&client.attributes, "network.peer.address"),
            Some(&Value::StringValue("10.0.0.7".into()))
        );
        assert_eq!(
            attr(&client.attributes, "network.peer.port"),
            Some(&Value::IntValue(4143))
        );
        assert_eq!(attr(&client.attributes, "error.type"), None);
        assert_eq!(
            client.status.as_ref().unwrap().code,
            StatusCode::Unset as i32
        );

        // A 64-bit trace id is zero-padded to 16 bytes; a 5xx is an error.
        let server = &spans[1];
        assert_eq!(
            server.trace_id,
            [0, 0, 0, 0, 0, 0, 0, 0, 0x46, 0x3a, 0xc3, 0x5c, 0x9f, 0x64, 0x13, 0xad]
        );
        assert_eq!(server.kind, SpanKind::Server as i32);
        assert_eq!(
            server.status.as_ref().unwrap().code,
            StatusCode::Error as i32
        );
        assert_eq!(
            attr(&server.attributes, "error.type"),
            Some(&Value::StringValue("503".into()))
        );
    }

    #[test]
    fn no_response_is_an_error_without_a_status_code() {
        let mut span = finished("463ac35c9f6413ad", Kind::Client, 0);
        span.remote = None;
        let body = encode(&[span], "pi-a");
        let request = ExportTraceServiceRequest::decode(body.as_slice()).unwrap();
        let span = &request.resource_spans[0].scope_spans[0].spans[0];
        assert_eq!(attr(&span.attributes, "http.response.status_code"), None);
        assert_eq!(attr(&span.attributes, "network.peer.address"), None);
        let status = span.status.as_ref().unwrap();
        assert_eq!(status.code, StatusCode::Error as i32);
        assert_eq!(status.message, "no response");
    }

    #[test]
    fn a_partial_success_names_the_rejected_spans_and_anything_else_rejects_none() {
        use opentelemetry_proto::tonic::collector::trace::v1::ExportTracePartialSuccess;
        let answer = |rejected_spans: i64| {
            ExportTraceServiceResponse {
                partial_success: Some(ExportTracePartialSuccess {
                    rejected_spans,
                    error_message: "span too old".to_owned(),
                }),
            }
            .encode_to_vec()
        };
        assert_eq!(rejected(&answer(2)), Some((2, "span too old".to_owned())));
        assert_eq!(rejected(&answer(0)), None, "a warning without rejections");
        assert_eq!(rejected(&answer(-1)), None);
        assert_eq!(rejected(b""), None, "an empty 2xx body takes every span");
        assert_eq!(rejected(b"{\"partialSuccess\":{}}\xff"), None);
    }
}
