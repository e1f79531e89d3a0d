//! The supervisor's configuration (`/etc/pimesh/supervisor.toml`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ =
            pimesh_schema::SupervisorConfig::parse(std::path::Path::new("supervisor.toml"), text);
    }
});
