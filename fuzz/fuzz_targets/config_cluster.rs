//! The site configuration (`cluster.toml`, signed by the operator but read by every
//! node): a config that validates has every limit within `cluster::limits`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pimesh_schema::cluster::{limits, ClusterConfig};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = ClusterConfig::parse(std::path::Path::new("cluster.toml"), text) {
        assert!(limits::MAX_CONNECTIONS.contains(&config.proxy.max_connections));
        assert!(limits::HEADER_TIMEOUT.contains(&config.proxy.header_timeout.0));
        for service in config.services.values() {
            if let Some(timeout) = service.timeout {
                assert!(limits::REQUEST_TIMEOUT.contains(&timeout.0));
            }
        }
    }
});
