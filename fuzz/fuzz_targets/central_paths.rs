//! The central server's request paths and the long-poll query.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let (path, query) = text
            .split_once('?')
            .map_or((text, None), |(p, q)| (p, Some(q)));
        let _ = pimesh_revision::path::Route::parse(path);
        let _ = pimesh_revision::path::ConfigQuery::parse(query);
    }
});
