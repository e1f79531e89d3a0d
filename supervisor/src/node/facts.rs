//! Facts about the node that the supervisor reads but does not change: its name, board,
//! what the image holds, whether K3s is installed.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

use crate::node::seed::SeedState;
use crate::paths::NodePaths;
use crate::status::{K3sPresence, NodeInfo};

/// Where the board's serial number is (Raspberry Pi firmware fills it in the device tree).
const DT_SERIAL: &str = "/sys/firmware/devicetree/base/serial-number";
const DT_MODEL: &str = "/sys/firmware/devicetree/base/model";
const MACHINE_ID: &str = "/etc/machine-id";
/// The kernel's boot ID: changes on every boot.
const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";

#[derive(Debug, Clone)]
pub struct NodeFacts {
    /// The node's name: the seed's `node`, else `pimesh-` and the end of the board serial
    /// (or of the machine ID where the board has no serial, as on QEMU).
    pub node_name: String,
    /// Where `node_name` came from: `seed`, `board-serial` or `machine-id`.
    pub node_name_source: &'static str,
    pub model: Option<String>,
    pub k3s: K3sPresence,
    /// The image manifest as shipped (`null` off a Pimesh image).
    pub image: Option<serde_json::Value>,
}

impl NodeFacts {
    pub fn gather(paths: &NodePaths, seed: &SeedState) -> NodeFacts {
        let (node_name, node_name_source) = match seed.seed().and_then(|s| s.node.as_ref()) {
            Some(node) => (node.to_string(), "seed"),
            None => derived_name(),
        };
        let image = read_manifest(&paths.manifest);
        let k3s = K3sPresence {
            present: is_executable(&paths.k3s_bin),
            path: paths.k3s_bin.display().to_string(),
            version: image
                .as_ref()
                .and_then(|m| m.pointer("/k3s/version"))
                .and_then(|v| v.as_str())
                .map(str::to_owned),
        };
        NodeFacts {
            node_name,
            node_name_source,
            model: read_trimmed(Path::new(DT_MODEL)),
            k3s,
            image,
        }
    }
}

impl NodeFacts {
    /// The node's name and board as the status shows them, with this boot's ID.
    pub fn info(&self) -> NodeInfo {
        NodeInfo {
            name: self.node_name.clone(),
            name_source: self.node_name_source,
            model: self.model.clone(),
            boot_id: std::fs::read_to_string(BOOT_ID)
                .ok()
                .map(|id| id.trim().to_owned()),
        }
    }
}

fn derived_name() -> (String, &'static str) {
    if let Some(name) = read_trimmed(Path::new(DT_SERIAL)).and_then(|s| name_from_id(&s)) {
        return (name, "board-serial");
    }
    let id = read_trimmed(Path::new(MACHINE_ID)).unwrap_or_default();
    (
        name_from_id(&id).unwrap_or_else(|| "pimesh".to_owned()),
        "machine-id",
    )
}

/// `pimesh-` and the last six hex digits of a serial number or machine ID, lowercased;
/// `None` when the ID has fewer than six hex digits or is all zeros.
pub fn name_from_id(id: &str) -> Option<String> {
    let hex: Vec<char> = id
        .chars()
        .filter(char::is_ascii_hexdigit)
        .map(|c| c.to_ascii_lowercase())
        .collect();
    if hex.len() < 6 || hex.iter().all(|c| *c == '0') {
        return None;
    }
    let tail: String = hex[hex.len() - 6..].iter().collect();
    Some(format!("pimesh-{tail}"))
}

/// A sysfs or /etc text file, trimmed of whitespace and the device tree's trailing NULs.
fn read_trimmed(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let text = text.trim_matches(|c: char| c == '\0' || c.is_whitespace());
    (!text.is_empty() && text != "uninitialized").then(|| text.to_owned())
}

fn read_manifest(path: &Path) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(path).ok()?;
    match serde_json::from_str(&text) {
        Ok(value) => Some(value),
        Err(err) => {
            tracing::warn!(file = %path.display(), %err, "image manifest is not JSON");
            None
        }
    }
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_come_from_the_end_of_the_serial() {
        assert_eq!(
            name_from_id("10000000ABCDEF12").as_deref(),
            Some("pimesh-cdef12")
        );
        assert_eq!(
            name_from_id("3f2504e04f8911d39a0c0305e82c3301").as_deref(),
            Some("pimesh-2c3301")
        );
        assert_eq!(name_from_id("0000000000000000"), None);
        assert_eq!(name_from_id("abc"), None);
    }
}
