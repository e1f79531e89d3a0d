//! One line of a control replica's discovery stream, as the proxy reads it: parsed,
//! validated and compiled into a routing table.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| pimesh_proxy::fuzzing::discovery_document(data));
