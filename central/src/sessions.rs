//! Dashboard sessions: a bearer token an operator gets for one site with a request signed
//! by that site's key (`POST /v1/sites/<site>/sessions`), so that a browser, which cannot
//! sign, reads that site's overview for a while.
//!
//! Invariants: a token is 32 random bytes (hex), kept only as its SHA-256, valid for one
//! site until its expiry and never after; at most [`MAX_SESSIONS`] are live in a replica's
//! memory at once (expired ones are dropped first). A session is also recorded in the
//! storage ([`Storage::record_session`]) before its token is handed out, so that every
//! replica sharing a PostgreSQL database honours it; with the embedded file storage the
//! sessions live in memory only and a restart ends them (the operator asks for a new one).

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use pimesh_schema::DnsLabel;
use ring::rand::{SecureRandom as _, SystemRandom};

use crate::storage::Storage;

/// Live sessions at most.
pub const MAX_SESSIONS: usize = 1_024;
/// The longest a session may last, and the default.
pub const MAX_TTL_SECS: u64 = 7 * 86_400;
pub const DEFAULT_TTL_SECS: u64 = 12 * 3_600;

#[derive(Default)]
pub struct Sessions {
    by_digest: Mutex<HashMap<[u8; 32], Session>>,
}

struct Session {
    site: DnsLabel,
    expires_at: u64,
}

/// Why a session could not be opened or a token is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionError {
    /// Too many live sessions.
    Full,
    /// No randomness for a token.
    Random,
    /// The token is unknown, expired or for another site.
    Refused,
    /// The storage the replicas share could not record or read a session.
    Storage(String),
}

impl std::fmt::Display for SessionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SessionError::Full => "too many dashboard sessions are open; try again later",
            SessionError::Random => "cannot make a session token",
            SessionError::Refused => {
                "the session token is unknown, expired or for another site (pimeshctl \
                 dashboard prints a new one)"
            }
            SessionError::Storage(err) => {
                return write!(f, "cannot reach the sessions in the storage: {err}")
            }
        })
    }
}

impl std::error::Error for SessionError {}

fn digest(token: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref());
    out
}

impl Sessions {
    /// A new token for `site`, valid `ttl_secs` from `now`, recorded in `storage` for the
    /// other replicas before it is returned.
    pub fn open(
        &self,
        storage: &dyn Storage,
        site: &DnsLabel,
        ttl_secs: u64,
        now: u64,
    ) -> Result<String, SessionError> {
        let mut bytes = [0u8; 32];
        SystemRandom::new()
            .fill(&mut bytes)
            .map_err(|_| SessionError::Random)?;
        let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let session = Session {
            site: site.clone(),
            expires_at: now.saturating_add(ttl_secs.min(MAX_TTL_SECS)),
        };
        let key = digest(&token);
        let expires_at = session.expires_at;
        {
            // Room is checked and taken under one lock: two sessions opened at once never
            // both pass the bound.
            let mut sessions = self
                .by_digest
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            sessions.retain(|_, session| session.expires_at > now);
            if sessions.len() >= MAX_SESSIONS {
                return Err(SessionError::Full);
            }
            sessions.insert(key, session);
        }
        if let Err(err) = storage.record_session(&key, site, expires_at, now) {
            self.by_digest
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&key);
            return Err(SessionError::Storage(err.to_string()));
        }
        Ok(token)
    }

    /// Whether `token` is a live session of `site` at `now`: one this replica opened or
    /// has seen, else one another replica recorded in `storage`.
    pub fn check(
        &self,
        storage: &dyn Storage,
        token: &str,
        site: &DnsLabel,
        now: u64,
    ) -> Result<(), SessionError> {
        let key = digest(token);
        let known = {
            let sessions = self
                .by_digest
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            sessions.get(&key).map(|s| (s.site.clone(), s.expires_at))
        };
        let (session_site, expires_at) = match known {
            Some(known) => known,
            None => match storage.session(&key) {
                Ok(Some((session_site, expires_at))) => {
                    let session = Session {
                        site: session_site.clone(),
                        expires_at,
                    };
                    self.keep(key, session, now);
                    (session_site, expires_at)
                }
                Ok(None) => return Err(SessionError::Refused),
                Err(err) => return Err(SessionError::Storage(err.to_string())),
            },
        };
        if &session_site == site && now < expires_at {
            Ok(())
        } else {
            Err(SessionError::Refused)
        }
    }

    /// Keeps `session` (another replica's) in memory while there is room for it; without
    /// room it is looked up in the storage again next time.
    fn keep(&self, key: [u8; 32], session: Session, now: u64) {
        let mut sessions = self
            .by_digest
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        sessions.retain(|_, session| session.expires_at > now);
        if sessions.len() < MAX_SESSIONS {
            sessions.insert(key, session);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::FileStorage;

    fn label(s: &str) -> DnsLabel {
        DnsLabel::try_from(s.to_owned()).expect("label")
    }

    #[test]
    fn a_token_opens_its_own_site_until_it_expires() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = FileStorage::new(dir.path()).expect("storage");
        let sessions = Sessions::default();
        let token = sessions
            .open(&storage, &label("depot-7"), 60, 1_000)
            .expect("token");
        assert_eq!(token.len(), 64);
        assert_eq!(
            sessions.check(&storage, &token, &label("depot-7"), 1_059),
            Ok(())
        );
        assert_eq!(
            sessions.check(&storage, &token, &label("depot-7"), 1_060),
            Err(SessionError::Refused),
            "expired"
        );
        assert_eq!(
            sessions.check(&storage, &token, &label("depot-8"), 1_001),
            Err(SessionError::Refused),
            "another site"
        );
        assert_eq!(
            sessions.check(&storage, "00", &label("depot-7"), 1_001),
            Err(SessionError::Refused)
        );
        let other = sessions
            .open(&storage, &label("depot-7"), 60, 1_000)
            .expect("token");
        assert_ne!(other, token);
    }

    #[test]
    fn live_sessions_are_bounded_and_expired_ones_make_room() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = FileStorage::new(dir.path()).expect("storage");
        let sessions = Sessions::default();
        for _ in 0..MAX_SESSIONS {
            sessions.open(&storage, &label("s"), 10, 0).expect("token");
        }
        assert_eq!(
            sessions.open(&storage, &label("s"), 10, 5),
            Err(SessionError::Full)
        );
        assert!(
            sessions.open(&storage, &label("s"), 10, 10).is_ok(),
            "the first ones expired"
        );
    }
}
