//! The kubeconfigs the fixture writes, in the form K3s writes them: the admin's (inline
//! `*-data`, one cluster, user and context named `default`) and the kubelet's
//! (`<data-dir>/agent/kubelet.kubeconfig`, with file paths).

use std::path::Path;

use base64::Engine as _;

use crate::files::write_atomic;

/// The admin kubeconfig: `server`, the CA, and the admin client certificate and key inline.
pub fn admin(server: &str, ca_pem: &str, cert_pem: &str, key_pem: &str) -> String {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    format!(
        "apiVersion: v1\n\
         clusters:\n\
         - cluster:\n    certificate-authority-data: {}\n    server: {server}\n  name: default\n\
         contexts:\n\
         - context:\n    cluster: default\n    user: default\n  name: default\n\
         current-context: default\n\
         kind: Config\n\
         preferences: {{}}\n\
         users:\n\
         - name: default\n  user:\n    client-certificate-data: {}\n    client-key-data: {}\n",
        b64(ca_pem),
        b64(cert_pem),
        b64(key_pem)
    )
}

/// The kubelet's kubeconfig: `server` (the agent's local load balancer) and the CA,
/// client certificate and key as file paths.
pub fn kubelet(server: &str, ca: &Path, cert: &Path, key: &Path) -> String {
    format!(
        "apiVersion: v1\n\
         clusters:\n\
         - cluster:\n    certificate-authority: {}\n    server: {server}\n  name: local\n\
         contexts:\n\
         - context:\n    cluster: local\n    namespace: default\n    user: user\n  name: Default\n\
         current-context: Default\n\
         kind: Config\n\
         preferences: {{}}\n\
         users:\n\
         - name: user\n  user:\n    client-certificate: {}\n    client-key: {}\n",
        ca.display(),
        cert.display(),
        key.display()
    )
}

/// Writes `text` to `path` atomically with the mode `mode` (an octal string, as
/// `--write-kubeconfig-mode`; 0600 when absent). An unparsable mode is logged as K3s logs
/// it, and the file keeps 0600.
pub fn write(path: &Path, text: &str, mode: Option<&str>) -> Result<(), String> {
    let bits = match mode {
        None | Some("") => 0o600,
        Some(mode) => match u32::from_str_radix(mode, 8) {
            Ok(bits) if bits <= 0o7777 => bits,
            Ok(_) => {
                crate::log::error(&format!(
                    "Failed to set {} to mode {mode}: mode out of range",
                    path.display()
                ));
                0o600
            }
            Err(err) => {
                crate::log::error(&format!(
                    "Failed to set {} to mode {mode}: {err}",
                    path.display()
                ));
                0o600
            }
        },
    };
    write_atomic(path, text.as_bytes(), bits)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn kubeconfigs_are_yaml_and_have_their_mode() {
        let text = admin("https://127.0.0.1:6443", "CA", "CERT", "KEY");
        let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).unwrap();
        assert_eq!(
            doc["clusters"][0]["cluster"]["server"],
            "https://127.0.0.1:6443"
        );
        assert_eq!(doc["users"][0]["user"]["client-key-data"], "S0VZ");
        let text = kubelet(
            "https://127.0.0.1:6444",
            Path::new("/d/agent/server-ca.crt"),
            Path::new("/d/agent/client-kubelet.crt"),
            Path::new("/d/agent/client-kubelet.key"),
        );
        let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).unwrap();
        assert_eq!(
            doc["users"][0]["user"]["client-key"],
            "/d/agent/client-kubelet.key"
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k3s.yaml");
        for (mode, bits) in [(None, 0o600), (Some("0644"), 0o644), (Some("bad"), 0o600)] {
            write(&path, "x", mode).unwrap();
            let got = std::fs::metadata(&path).unwrap().permissions().mode() & 0o7777;
            assert_eq!(got, bits, "{mode:?}");
        }
    }
}
