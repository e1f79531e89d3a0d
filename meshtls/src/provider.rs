//! The one crypto provider behind every configuration, key and verifier of the crate.
//!
//! Invariant: every rustls object the crate makes uses this provider (ring), so a key
//! that [`crate::Credential`] accepts is one that every configuration can sign with, and
//! the verifier checks signatures with the same algorithms the handshakes negotiate.

use std::sync::{Arc, OnceLock};

use rustls::crypto::CryptoProvider;

/// The ring provider, made once.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    Arc::clone(PROVIDER.get_or_init(|| Arc::new(rustls::crypto::ring::default_provider())))
}
