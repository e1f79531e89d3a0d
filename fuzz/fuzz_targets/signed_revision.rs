//! A signed revision as the central server and the nodes receive it: any bytes are
//! verified or rejected with a reason, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pimesh_revision::Verifier;
use pimesh_schema::{DnsLabel, SigningKey};

fuzz_target!(|data: &[u8]| {
    let (Ok(site), Ok(key)) = (
        DnsLabel::try_from("depot-7".to_owned()),
        SigningKey::try_from("ed25519:11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=".to_owned()),
    ) else {
        return;
    };
    let verifier = Verifier::new(site, key);
    let _ = verifier.verify(data, Some(3));
    let _ = verifier.verify_signature(data);
});
