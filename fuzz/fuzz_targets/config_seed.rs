//! The seed (`pimesh.toml` on the boot partition): any bytes give a seed or an error
//! naming the file, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = pimesh_schema::Seed::parse(std::path::Path::new("pimesh.toml"), text);
    }
});
