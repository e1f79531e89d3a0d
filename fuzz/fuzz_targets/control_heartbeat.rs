//! A proxy's heartbeat body, as a control replica reads it.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| pimesh_control::fuzzing::heartbeat_body(data));
