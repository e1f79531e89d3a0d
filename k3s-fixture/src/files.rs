//! Files and facts of the host the fixture needs: atomic writes with a mode, the node
//! password, the host name and its first non-loopback IPv4 address.

use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

/// Replaces `path` with `bytes` (mode `mode`) atomically: a temporary file beside it,
/// synced, then renamed over it. Missing parent folders are made.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), String> {
    let fail = |err: std::io::Error| format!("cannot write {}: {err}", path.display());
    let parent = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(fail)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut file = std::fs::File::create(&temp)?;
        file.set_permissions(std::fs::Permissions::from_mode(mode))?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&temp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result.map_err(fail)
}

/// Where the node password lives: `/etc/rancher/node/password` (as in K3s) with the
/// default data folder, else `<data-dir>/node-password`, so that tests running several
/// nodes on one host keep one password each.
pub fn node_password_path(data_dir: &Path, default_data_dir: bool) -> PathBuf {
    if default_data_dir {
        PathBuf::from("/etc/rancher/node/password")
    } else {
        data_dir.join("node-password")
    }
}

/// The node password kept at `path`, made (random, 0600) on first use.
pub fn node_password(path: &Path) -> Result<String, String> {
    match std::fs::read_to_string(path) {
        Ok(text) if !text.trim().is_empty() => return Ok(text.trim().to_owned()),
        Ok(_) => {}
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => return Err(format!("cannot read {}: {err}", path.display())),
    }
    let password = crate::token::random_hex(16)?;
    write_atomic(path, format!("{password}\n").as_bytes(), 0o600)?;
    Ok(password)
}

/// The host name (the kernel's), or `localhost`.
pub fn hostname() -> String {
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .map(|t| t.trim().to_owned())
        .find(|t| !t.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// The first non-loopback IPv4 address of the host's interfaces, else 127.0.0.1.
pub fn default_ip() -> IpAddr {
    nix::ifaddrs::getifaddrs()
        .ok()
        .into_iter()
        .flatten()
        .filter_map(|ifa| ifa.address?.as_sockaddr_in().map(|sin| sin.ip()))
        .find(|ip| !ip.is_loopback() && !ip.is_unspecified())
        .map_or(IpAddr::V4(Ipv4Addr::LOCALHOST), IpAddr::V4)
}

/// `/etc/os-release`'s `PRETTY_NAME`, for the Node's `osImage`.
pub fn os_image() -> String {
    std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("PRETTY_NAME="))
                .map(|v| v.trim_matches('"').to_owned())
        })
        .unwrap_or_else(|| "Linux".to_owned())
}

/// The kernel release, for the Node's `kernelVersion`.
pub fn kernel_version() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|t| t.trim().to_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_writes_have_the_mode_and_passwords_persist() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/file");
        write_atomic(&path, b"x", 0o640).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
        let pw = dir.path().join("node-password");
        let first = node_password(&pw).unwrap();
        assert_eq!(node_password(&pw).unwrap(), first);
        assert_eq!(first.len(), 32);
    }
}
