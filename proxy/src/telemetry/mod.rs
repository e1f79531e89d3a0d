//! What the proxy tells about itself beyond its logs: Prometheus metrics and distributed
//! traces.
//!
//! - `metrics`: the registry every concern registers its families in, encoded at
//!   `/metrics`; the families themselves live with the code that records them
//!   (`transport::metrics`, `outbound::metrics`, `config::metrics`, the control plane
//!   clients' `metrics`, `trace`'s span counters), except the per-route HTTP families
//!   both directions record (`requests`);
//! - `labels`: the label values several families share;
//! - `grpc`: gRPC responses classified by their `grpc-status`, for the request metrics
//!   and the balancer;
//! - `trace`: spans of proxied requests, exported to Zipkin and/or OTLP collectors.

pub mod grpc;
pub mod labels;
pub mod metrics;
pub mod requests;
pub mod trace;
