//! Talking to the central server: publishing signed revisions and reading the fleet view.

use std::path::Path;
use std::time::Duration;

use pimesh_revision::{Mode, Revision};
use pimesh_schema::cluster::ClusterConfig;
use reqwest::blocking::Client;

use crate::CentralArgs;

fn client(args: &CentralArgs) -> Result<Client, String> {
    let mut builder = Client::builder()
        .use_rustls_tls()
        .timeout(Duration::from_secs(30));
    if let Some(ca) = &args.central_ca {
        let pem =
            std::fs::read(ca).map_err(|err| format!("cannot read {}: {err}", ca.display()))?;
        for der in pimesh_meshtls::pem::certificates(&pem)
            .map_err(|err| format!("{}: {err}", ca.display()))?
        {
            let cert = reqwest::Certificate::from_der(&der)
                .map_err(|err| format!("{}: {err}", ca.display()))?;
            builder = builder.add_root_certificate(cert);
        }
    }
    builder
        .build()
        .map_err(|err| format!("cannot set up TLS: {err}"))
}

fn fleet(client: &Client, args: &CentralArgs) -> Result<serde_json::Value, String> {
    let url = format!("{}/v1/fleet", args.central.trim_end_matches('/'));
    let response = client
        .get(&url)
        .send()
        .map_err(|err| format!("cannot reach {url}: {err}"))?;
    let status = response.status();
    let body = response
        .text()
        .map_err(|err| format!("cannot read the answer of {url}: {err}"))?;
    if !status.is_success() {
        return Err(format!("{url} answered {status}: {body}"));
    }
    serde_json::from_str(&body)
        .map_err(|err| format!("{url} answered something other than the fleet view: {err}"))
}

pub fn publish(
    file: &Path,
    site_dir: &Path,
    args: &CentralArgs,
    revision: Option<u64>,
    try_mode: bool,
) -> Result<(), String> {
    let text = std::fs::read_to_string(file)
        .map_err(|err| format!("cannot read {}: {err}", file.display()))?;
    let config = ClusterConfig::parse(file, &text).map_err(|err| err.to_string())?;
    let key_path = site_dir.join("signing.pk8");
    let key = std::fs::read(&key_path)
        .map_err(|err| format!("cannot read the site key {}: {err}", key_path.display()))?;
    let client = client(args)?;
    let number = match revision {
        Some(number) => number,
        None => {
            let fleet = fleet(&client, args)?;
            let latest = fleet["sites"]
                .as_array()
                .and_then(|sites| sites.iter().find(|s| s["site"] == config.site.as_str()))
                .ok_or_else(|| format!("the central server does not serve site {}", config.site))?
                ["latest_revision"]
                .as_u64()
                .unwrap_or(0);
            latest + 1
        }
    };
    let signed = Revision {
        site: config.site.clone(),
        revision: number,
        mode: if try_mode { Mode::Try } else { Mode::Apply },
        config: text,
    }
    .sign(&key)?;
    let url = format!(
        "{}/v1/sites/{}/revisions",
        args.central.trim_end_matches('/'),
        config.site
    );
    let response = client
        .put(&url)
        .header("content-type", "application/json")
        .body(signed.to_json())
        .send()
        .map_err(|err| format!("cannot reach {url}: {err}"))?;
    let status = response.status();
    let body = response.text().unwrap_or_default();
    if !status.is_success() {
        return Err(format!(
            "the central server refused revision {number} of site {} ({status}): {body}",
            config.site
        ));
    }
    println!("published revision {number} of site {}", config.site);
    Ok(())
}

pub fn status(args: &CentralArgs) -> Result<(), String> {
    let fleet = fleet(&client(args)?, args)?;
    for site in fleet["sites"].as_array().into_iter().flatten() {
        let latest = site["latest_revision"]
            .as_u64()
            .map_or("none".to_owned(), |n| n.to_string());
        println!(
            "site {}: newest revision {latest}",
            site["site"].as_str().unwrap_or("?")
        );
        for node in site["nodes"].as_array().into_iter().flatten() {
            let revision = node["revision"]
                .as_u64()
                .map_or("-".to_owned(), |n| n.to_string());
            let detail = node["detail"].as_str().unwrap_or_default();
            println!(
                "  {:<20} revision {:<6} {}{}",
                node["node"].as_str().unwrap_or("?"),
                revision,
                node["state"].as_str().unwrap_or("?"),
                if detail.is_empty() {
                    String::new()
                } else {
                    format!(": {detail}")
                }
            );
        }
    }
    Ok(())
}
