//! The first bytes of a connection to the proxy's outbound or inbound port: HTTP/2, HTTP/1
//! or opaque TCP.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| pimesh_proxy::fuzzing::protocol_detection(data));
