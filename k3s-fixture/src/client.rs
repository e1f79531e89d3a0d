//! HTTPS clients of fixture servers: one that trusts only the cluster CA, and the
//! unverified one K3s uses once, to fetch `/cacerts` before it can check the CA's hash.

use std::time::Duration;

/// A client that trusts only `ca_pem`.
pub fn trusting(ca_pem: &str, timeout: Duration) -> Result<reqwest::Client, String> {
    let ca = reqwest::Certificate::from_pem(ca_pem.as_bytes())
        .map_err(|e| format!("bad CA certificate: {e}"))?;
    reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(ca)
        .timeout(timeout)
        .connect_timeout(timeout)
        .build()
        .map_err(|e| format!("cannot make an HTTPS client: {e}"))
}

/// `GET <server>/cacerts` without verifying the server (the CA is checked against the
/// token's hash afterwards, when the token has one).
pub async fn fetch_cacerts(server: &str, timeout: Duration) -> Result<String, String> {
    let client = reqwest::Client::builder()
        .use_rustls_tls()
        .danger_accept_invalid_certs(true)
        .timeout(timeout)
        .connect_timeout(timeout)
        .build()
        .map_err(|e| format!("cannot make an HTTPS client: {e}"))?;
    let url = format!("{server}/cacerts");
    let response = client
        .get(&url)
        .send()
        .await
        .map_err(|e| format!("GET {url}: {e}"))?;
    if !response.status().is_success() {
        return Err(format!("GET {url}: {}", response.status()));
    }
    response.text().await.map_err(|e| format!("GET {url}: {e}"))
}

/// `https://host:port` from a `--server` URL (path and trailing slash dropped).
pub fn base_url(server: &str) -> Result<String, String> {
    let rest = server
        .strip_prefix("https://")
        .ok_or_else(|| format!("server url must start with https://: {server}"))?;
    let host = rest.split('/').next().unwrap_or_default();
    if host.is_empty() {
        return Err(format!("invalid server url: {server}"));
    }
    Ok(format!("https://{host}"))
}

/// A response body as JSON.
pub async fn json_value(response: reqwest::Response) -> Result<serde_json::Value, String> {
    let bytes = response.bytes().await.map_err(|e| e.to_string())?;
    serde_json::from_slice(&bytes).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_urls_must_be_https() {
        assert_eq!(
            base_url("https://10.0.0.1:6443/").unwrap(),
            "https://10.0.0.1:6443"
        );
        assert!(base_url("http://10.0.0.1:6443").is_err());
        assert!(base_url("https://").is_err());
    }
}
