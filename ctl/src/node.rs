//! `pimeshctl node sign`: the operator's side of enrolling a node by hand. The node made
//! its key and request itself; the issuer signs exactly the node identity named on the
//! command line, and nothing else the request may ask for.

use std::path::Path;
use std::time::{Duration, SystemTime};

use pimesh_identity::Authority;
use pimesh_schema::DnsLabel;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::CertificateSigningRequestDer;

use crate::site;

pub fn sign(
    csr: &Path,
    site_dir: &Path,
    node: &str,
    days: u64,
    out: Option<&Path>,
) -> Result<(), crate::Failure> {
    let site = site::name_of(site_dir)?;
    let node = DnsLabel::try_from(node.to_owned()).map_err(|err| format!("--node: {err}"))?;
    let read = |path: &Path| {
        std::fs::read_to_string(path)
            .map_err(|err| format!("cannot read {}: {err}", path.display()))
    };
    let issuer_pem = read(&site_dir.join("issuer.pem"))?;
    let issuer = Authority::from_pem(&issuer_pem, &read(&site_dir.join("issuer.key"))?)
        .map_err(|err| format!("{}: {err}", site_dir.join("issuer.pem").display()))?;
    let request =
        CertificateSigningRequestDer::from_pem_slice(read(csr)?.as_bytes()).map_err(|err| {
            format!(
                "{}: expected a PEM CERTIFICATE REQUEST: {err}",
                csr.display()
            )
        })?;
    let lifetime = Duration::from_secs(days.saturating_mul(24 * 3600));
    let chain = issuer
        .sign_node_chain(&request, &site, &node, SystemTime::now(), lifetime)
        .map_err(|err| format!("{}: not signed: {err}", csr.display()))?;
    match out {
        Some(path) => {
            std::fs::write(path, chain)
                .map_err(|err| format!("cannot write {}: {err}", path.display()))?;
            eprintln!("signed spiffe://{site}/node/{node} into {}", path.display());
        }
        None => print!("{chain}"),
    }
    Ok(())
}
