//! What a joining node and a server exchange before either is authenticated: the join
//! request and answer, the join token, and the mDNS announcement.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = serde_json::from_slice::<pimesh_join::JoinRequest>(data);
    let _ = serde_json::from_slice::<pimesh_join::JoinAnswer>(data);
    let _ = serde_json::from_slice::<pimesh_join::IssuerHandover>(data);
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = pimesh_schema::JoinToken::try_from(text.to_owned());
    // The announcement: instance name, then TXT pairs, one `key=value` per line.
    let mut lines = text.lines();
    let node = lines.next().unwrap_or_default();
    let txt: Vec<(&str, &str)> = lines.filter_map(|line| line.split_once('=')).collect();
    let _ = pimesh_join::Announcement::parse(node, 8086, txt);
});
