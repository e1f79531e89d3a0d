//! `pimesh-supervisor trust COMMAND`: one step of the trust root's lifecycle, run by the
//! operator on the node instead of the daemon. Each step takes the trust lock, so it never
//! races the daemon's periodic check.

use std::path::PathBuf;
use std::time::SystemTime;

use pimesh_schema::DnsLabel;

use super::error::TrustError;
use super::files::TrustFiles;
use super::lifecycle;
use crate::credential::CredentialFiles;
use crate::node::seed::SeedState;
use crate::paths::NodePaths;

/// One step of the trust root's lifecycle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrustAction {
    Status,
    RotateIssuer,
    AnchorBegin,
    AnchorSwitch,
    AnchorFinish { force: bool },
    ExportAnchorKey(PathBuf),
    ImportAnchorKey(PathBuf),
}

/// Runs `action` on the node's trust folder; returns what to print.
pub fn run(action: &TrustAction, paths: &NodePaths) -> Result<String, TrustError> {
    let files = TrustFiles::on_node(paths);
    let store = &files.store;
    store.recover()?;
    let credential = CredentialFiles::on_node(paths);
    let site = || site(paths);
    let now = SystemTime::now();
    match action {
        TrustAction::Status => {
            serde_json::to_string_pretty(&lifecycle::status(store)?).map_err(TrustError::Encode)
        }
        TrustAction::RotateIssuer => {
            let n = lifecycle::rotate_issuer(store, &site()?, now)?;
            let resigned = match &files.issuer()? {
                Some(issuer) => credential.renew_from(issuer, now)?,
                None => false,
            };
            Ok(format!(
                "issuer rotated (generation {n}){}",
                if resigned {
                    "; this node's credential is re-signed by it"
                } else {
                    ""
                }
            ))
        }
        TrustAction::AnchorBegin => lifecycle::anchor_begin(store, &site()?, now),
        TrustAction::AnchorSwitch => lifecycle::anchor_switch(store, &site()?, &credential, now),
        TrustAction::AnchorFinish { force } => {
            lifecycle::anchor_finish(store, &credential, now, *force)
        }
        TrustAction::ExportAnchorKey(file) => lifecycle::export_anchor_key(store, file),
        TrustAction::ImportAnchorKey(file) => lifecycle::import_anchor_key(store, file),
    }
}

/// The site's name, from the seed: the new anchors and issuers are the site's.
fn site(paths: &NodePaths) -> Result<DnsLabel, TrustError> {
    let seed = SeedState::load(&paths.seed);
    seed.seed()
        .map(|seed| seed.site.clone())
        .ok_or_else(|| TrustError::UnusableSeed {
            seed: paths.seed.clone(),
            summary: seed.one_line_summary("this node"),
        })
}
