//! What `pimeshctl` takes as a central server's address.

/// Checks that `url` is a central server's URL: `https://host[:port]`. Configuration goes
/// to nodes and reports come back over it, so plain `http://` is refused.
pub fn check_url(url: &str) -> Result<(), crate::Failure> {
    let parsed = reqwest::Url::parse(url)
        .map_err(|err| format!("{url:?}: expected https://host[:port]: {err}"))?;
    if parsed.scheme() != "https" {
        return Err(format!(
            "{url:?}: expected https://host[:port]: the central server is reached over TLS only, \
             found the scheme {:?}",
            parsed.scheme()
        )
        .into());
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(format!("{url:?}: expected https://host[:port]: no host").into());
    }
    Ok(())
}
