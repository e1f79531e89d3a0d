//! The trace context headers of a request through the proxy (W3C `traceparent`, B3 single
//! and multi), one `name: value` per line.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| pimesh_proxy::fuzzing::trace_headers(data));
