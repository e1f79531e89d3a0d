//! A span the data path finished, as every exporter's encoder reads it.

use http::Method;

use super::context::{SpanId, TraceId};
use super::Kind;

/// A finished span on its way to the collectors.
#[derive(Clone, Debug)]
pub(super) struct FinishedSpan {
    pub trace_id: TraceId,
    pub id: SpanId,
    pub parent_id: SpanId,
    pub kind: Kind,
    pub method: Method,
    pub path: String,
    pub dst_service: String,
    pub remote: Option<std::net::SocketAddr>,
    /// Start, in microseconds since the Unix epoch.
    pub timestamp_us: u64,
    /// At least 1 (Zipkin reads 0 as "unknown").
    pub duration_us: u64,
    /// The response status; 0 when there was no response.
    pub status: u16,
}
