//! The agent's client load balancer on `127.0.0.1:<lb-server-port>` (K3s's is on 6444):
//! a TCP pass-through to the first server of its list that accepts a connection, so TLS
//! is between the kubelet's kubeconfig (the cluster CA, a kubelet client certificate)
//! and a real fixture server. The list is the `--server` plus what
//! `/v1-k3s/apiservers` answered; the server that last worked comes first. As in K3s, the
//! list is kept in `<data-dir>/agent/etc/k3s-agent-load-balancer.json`
//! (`{"ServerURL": ..., "ServerAddresses": [...]}`) and read back on start.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

/// A connection attempt to one server gives up after this long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The servers (`host:port`), the preferred one first, and where the list is kept.
#[derive(Debug, Clone)]
pub struct Upstreams {
    list: Arc<Mutex<Vec<String>>>,
    server_url: String,
    file: PathBuf,
}

impl Upstreams {
    /// `server_url` (`https://host:port`) first, then the servers kept in `file`.
    pub fn new(server_url: &str, file: PathBuf) -> Upstreams {
        let mut list = vec![server_url.trim_start_matches("https://").to_owned()];
        let kept = std::fs::read(&file)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok());
        for address in kept
            .as_ref()
            .and_then(|v| v["ServerAddresses"].as_array())
            .into_iter()
            .flatten()
            .filter_map(serde_json::Value::as_str)
        {
            if !list.iter().any(|a| a == address) {
                list.push(address.to_owned());
            }
        }
        Upstreams {
            list: Arc::new(Mutex::new(list)),
            server_url: server_url.to_owned(),
            file,
        }
    }

    pub fn snapshot(&self) -> Vec<String> {
        self.list
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// `preferred` first, then `others`, then the rest of the old list (the `--server`
    /// stays known), without duplicates. The file is rewritten when the set changed.
    pub fn update(&self, preferred: &str, others: &[String]) {
        let mut list = self.list.lock().unwrap_or_else(PoisonError::into_inner);
        let mut next = vec![preferred.to_owned()];
        for server in others.iter().chain(list.iter()) {
            if !next.contains(server) {
                next.push(server.clone());
            }
        }
        let mut old_set = list.clone();
        let mut new_set = next.clone();
        old_set.sort();
        new_set.sort();
        *list = next;
        drop(list);
        if old_set != new_set || !self.file.exists() {
            let doc = serde_json::json!({
                "ServerURL": self.server_url,
                "ServerAddresses": new_set,
            });
            match crate::files::write_atomic(&self.file, doc.to_string().as_bytes(), 0o600) {
                Ok(()) => crate::log::info(&format!(
                    "k3s fixture: load balancer servers: {}",
                    new_set.join(", ")
                )),
                Err(err) => crate::log::warn(&err),
            }
        }
    }
}

/// Passes every connection on `listener` through to a server, forever.
pub async fn serve(listener: TcpListener, upstreams: Upstreams) {
    loop {
        let Ok((mut downstream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let upstreams = upstreams.clone();
        tokio::spawn(async move {
            for server in upstreams.snapshot() {
                let Ok(Ok(mut upstream)) =
                    tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(server.as_str()))
                        .await
                else {
                    continue;
                };
                let _ = tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await;
                return;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_working_server_comes_first_and_none_is_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("etc/k3s-agent-load-balancer.json");
        let upstreams = Upstreams::new("https://a:1", file.clone());
        upstreams.update("b:2", &["b:2".to_owned(), "c:3".to_owned()]);
        assert_eq!(upstreams.snapshot(), vec!["b:2", "c:3", "a:1"]);
        upstreams.update("a:1", &[]);
        assert_eq!(upstreams.snapshot(), vec!["a:1", "b:2", "c:3"]);
        let kept: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
        assert_eq!(kept["ServerURL"], "https://a:1");
        assert_eq!(
            kept["ServerAddresses"],
            serde_json::json!(["a:1", "b:2", "c:3"])
        );
        let again = Upstreams::new("https://a:1", file);
        assert_eq!(again.snapshot(), vec!["a:1", "b:2", "c:3"]);
    }
}
