use std::path::Path;

use pimesh_schema::routes::{gateway, site_folder, PathMatch, Route};

/// The forms `config convert` writes routes in.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum RouteForm {
    /// Gateway API documents (HTTPRoute, GRPCRoute).
    Yaml,
    /// cluster.toml's [[routes]] tables.
    Toml,
}

/// Prints every route of the site folder of `file` in `form`.
pub fn convert(file: &Path, form: RouteForm) -> Result<(), crate::Failure> {
    let site = site_folder::compile(file).map_err(|err| err.to_string())?;
    let text = match form {
        RouteForm::Yaml => gateway::to_yaml(&site.config.routes).map_err(|err| err.to_string())?,
        RouteForm::Toml => gateway::to_toml(&site.config.routes).map_err(|err| err.to_string())?,
    };
    print!("{text}");
    Ok(())
}

/// One line about a route: its service, and per rule what it matches and where it sends.
fn describe(route: &Route) -> String {
    let rules: Vec<String> = route
        .rules
        .iter()
        .map(|rule| {
            let matches: Vec<String> = rule
                .matches
                .iter()
                .map(|m| {
                    let mut parts = Vec::new();
                    if let Some(method) = &m.method {
                        parts.push(method.clone());
                    }
                    match m.effective_path() {
                        Some(PathMatch::Exact(p)) => parts.push(p),
                        Some(PathMatch::Prefix(p)) => parts.push(format!("{p}*")),
                        None => {}
                    }
                    parts.extend(m.headers.iter().map(|(k, v)| format!("{k}={v}")));
                    parts.extend(m.query.iter().map(|(k, v)| format!("?{k}={v}")));
                    parts.join(" ")
                })
                .collect();
            let to = if rule.backends.is_empty() {
                route.service.to_string()
            } else {
                let backends: Vec<String> = rule
                    .backends
                    .iter()
                    .map(|b| format!("{} {}", b.service, b.weight))
                    .collect();
                backends.join(", ")
            };
            let on = if matches.is_empty() {
                "all".to_owned()
            } else {
                matches.join(" | ")
            };
            format!("{on} -> {to}")
        })
        .collect();
    format!(
        "  route {} of {}: {}",
        route.name,
        route.service,
        rules.join("; ")
    )
}

/// Validates a site configuration and prints a summary of it.
pub fn validate(file: &Path) -> Result<(), crate::Failure> {
    let site = site_folder::compile(file).map_err(|err| err.to_string())?;
    let config = site.config;
    println!(
        "{}: valid configuration of site {}: {} service(s), {} control replica(s), {} K3s server(s)",
        file.display(),
        config.site,
        config.services.len(),
        config.control.replicas,
        config.k3s.servers
    );
    for (name, service) in &config.services {
        let placement = if service.nodes.is_empty() {
            String::from("no endpoints")
        } else {
            let nodes: Vec<&str> = service.nodes.iter().map(|n| n.as_str()).collect();
            format!(
                "port {} on {}",
                service.port.unwrap_or_default(),
                nodes.join(", ")
            )
        };
        let split: Vec<String> = service
            .split
            .iter()
            .map(|b| format!("{} {}", b.service, b.weight))
            .collect();
        if split.is_empty() {
            println!("  {name}: {placement}");
        } else {
            println!("  {name}: {placement}; split to {}", split.join(", "));
        }
    }
    for (path, count) in &site.route_files {
        println!("  {}: {count} route(s)", path.display());
    }
    for route in &config.routes {
        println!("{}", describe(route));
    }
    Ok(())
}
