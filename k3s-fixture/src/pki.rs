//! The fixture's certificates, made with rcgen: the cluster CA (self-signed, ECDSA P-256,
//! kept in `<data-dir>/server/tls/server-ca.{crt,key}` and reused across restarts), and
//! leaves it signs: each server's serving certificate, the admin client certificate
//! (`CN=system:admin, O=system:masters`) and kubelet client certificates
//! (`CN=system:node:<name>, O=system:nodes`).
//!
//! Simplification: real K3s has separate server, client and request-header CAs; the
//! fixture signs everything with the one server CA, and trusts client certificates it signed.

use std::net::IpAddr;
use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

use crate::files::write_atomic;
use crate::log::{civil_from_days, now_secs};

/// The cluster CA: its certificate PEM exactly as kept on disk and served at `/cacerts`
/// (the token's CA hash is of these bytes), and its key.
#[derive(Clone)]
pub struct Ca {
    pub cert_pem: String,
    key_pem: String,
}

/// A certificate and its key, both PEM.
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
}

impl Ca {
    /// The CA kept in `tls_dir`, or a new one written there.
    pub fn load_or_create(tls_dir: &Path) -> Result<(Ca, bool), String> {
        if let Some(ca) = Ca::load(tls_dir)? {
            return Ok((ca, false));
        }
        let ca = Ca::generate()?;
        ca.store(tls_dir)?;
        Ok((ca, true))
    }

    /// The CA kept in `tls_dir`, if there is one.
    pub fn load(tls_dir: &Path) -> Result<Option<Ca>, String> {
        let cert = tls_dir.join("server-ca.crt");
        let key = tls_dir.join("server-ca.key");
        if !cert.exists() || !key.exists() {
            return Ok(None);
        }
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|err| format!("cannot read {}: {err}", p.display()))
        };
        Ca::from_pem(read(&cert)?, read(&key)?).map(Some)
    }

    /// A CA from its PEM certificate and key (checked to be usable).
    pub fn from_pem(cert_pem: String, key_pem: String) -> Result<Ca, String> {
        let ca = Ca { cert_pem, key_pem };
        ca.issuer()?;
        Ok(ca)
    }

    /// A new self-signed CA, valid for ten years.
    pub fn generate() -> Result<Ca, String> {
        let key = KeyPair::generate().map_err(|e| format!("cannot make the CA key: {e}"))?;
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, format!("k3s-server-ca@{}", now_secs()));
        params.distinguished_name = name;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        set_validity(&mut params, 10);
        let cert = params
            .self_signed(&key)
            .map_err(|e| format!("cannot make the CA certificate: {e}"))?;
        Ok(Ca {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Writes the CA to `tls_dir` (`server-ca.crt` 0644, `server-ca.key` 0600).
    pub fn store(&self, tls_dir: &Path) -> Result<(), String> {
        write_atomic(
            &tls_dir.join("server-ca.key"),
            self.key_pem.as_bytes(),
            0o600,
        )?;
        write_atomic(
            &tls_dir.join("server-ca.crt"),
            self.cert_pem.as_bytes(),
            0o644,
        )
    }

    /// The key PEM, for the server bootstrap exchange only.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// K3s's CA hash: SHA-256 of the CA PEM bytes.
    pub fn hash(&self) -> String {
        crate::token::sha256_hex(self.cert_pem.as_bytes())
    }

    fn issuer(&self) -> Result<Issuer<'static, KeyPair>, String> {
        let key = KeyPair::from_pem(&self.key_pem).map_err(|e| format!("bad CA key: {e}"))?;
        Issuer::from_ca_cert_pem(&self.cert_pem, key)
            .map_err(|e| format!("bad CA certificate: {e}"))
    }

    /// A serving certificate for `names` (host names or IP addresses), valid a year.
    pub fn serving(&self, names: &[String]) -> Result<Leaf, String> {
        let mut sans = Vec::new();
        for name in names {
            let san = match name.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(
                    name.clone()
                        .try_into()
                        .map_err(|e| format!("bad certificate name {name:?}: {e}"))?,
                ),
            };
            if !sans.contains(&san) {
                sans.push(san);
            }
        }
        self.leaf("k3s", &["k3s"], sans, ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A client certificate for `cn` in the groups `orgs`, valid a year.
    pub fn client(&self, cn: &str, orgs: &[&str]) -> Result<Leaf, String> {
        self.leaf(cn, orgs, Vec::new(), ExtendedKeyUsagePurpose::ClientAuth)
    }

    fn leaf(
        &self,
        cn: &str,
        orgs: &[&str],
        sans: Vec<SanType>,
        usage: ExtendedKeyUsagePurpose,
    ) -> Result<Leaf, String> {
        let key = KeyPair::generate().map_err(|e| format!("cannot make a key: {e}"))?;
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        for org in orgs {
            name.push(DnType::OrganizationName, *org);
        }
        name.push(DnType::CommonName, cn);
        params.distinguished_name = name;
        params.subject_alt_names = sans;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![usage];
        params.use_authority_key_identifier_extension = true;
        set_validity(&mut params, 1);
        let cert = params
            .signed_by(&key, &self.issuer()?)
            .map_err(|e| format!("cannot sign a certificate for {cn}: {e}"))?;
        Ok(Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// From yesterday to `years` years from today.
fn set_validity(params: &mut CertificateParams, years: i64) {
    let today = i64::try_from(now_secs() / 86_400).unwrap_or(0);
    let (y, m, d) = civil_from_days(today - 1);
    let (ny, nm, nd) = civil_from_days(today);
    let date = |y: i64, m: u32, d: u32| {
        rcgen::date_time_ymd(
            i32::try_from(y).unwrap_or(2000),
            u8::try_from(m).unwrap_or(1),
            u8::try_from(d.min(28)).unwrap_or(1),
        )
    };
    params.not_before = date(y, m, d);
    params.not_after = date(ny + years, nm, nd);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ca_is_kept_and_signs_leaves() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, made) = Ca::load_or_create(dir.path()).unwrap();
        assert!(made);
        let (again, made) = Ca::load_or_create(dir.path()).unwrap();
        assert!(!made);
        assert_eq!(again.cert_pem, ca.cert_pem);
        let on_disk = std::fs::read(dir.path().join("server-ca.crt")).unwrap();
        assert_eq!(ca.hash(), crate::token::sha256_hex(&on_disk));
        let serving = ca
            .serving(&[
                "127.0.0.1".to_owned(),
                "localhost".to_owned(),
                "127.0.0.1".to_owned(),
            ])
            .unwrap();
        assert!(serving.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        let admin = ca.client("system:admin", &["system:masters"]).unwrap();
        assert!(admin.key_pem.contains("PRIVATE KEY"));
    }
}
