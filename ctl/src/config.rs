use std::path::Path;

use std::collections::BTreeMap;

use pimesh_schema::cluster::ClusterConfig;
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

/// `pimeshctl seed validate`: the seed checked as a node reads it, and what it says.
pub fn validate_seed(file: &Path) -> Result<(), crate::Failure> {
    let seed = pimesh_schema::Seed::load(file).map_err(|err| err.to_string())?;
    let node = seed
        .node
        .as_ref()
        .map_or_else(|| "named by the node".to_owned(), ToString::to_string);
    let servers = if seed.servers.is_empty() {
        "found by mDNS".to_owned()
    } else {
        format!("{} listed", seed.servers.len())
    };
    println!(
        "{}: valid seed of site {}: role {}, node {node}, join token {}, servers {servers}, \
         central {}",
        file.display(),
        seed.site,
        seed.role.as_str(),
        if seed.join_token.is_some() {
            "set"
        } else {
            "none"
        },
        seed.central
            .as_ref()
            .map_or_else(|| "none".to_owned(), |c| c.url.as_url().to_string())
    );
    Ok(())
}

/// What is valid but likely not meant: services sharing a port of one node (named
/// requests reach the one app there, but a connection intercepted to that port goes to
/// one of them only), and services placed on nodes `[nodes]` does not list while it lists
/// some (they run only once such a node joins and reports its address).
pub fn notes(config: &ClusterConfig) -> Vec<String> {
    let mut notes = Vec::new();
    let mut ports: BTreeMap<(&str, u16), Vec<&str>> = BTreeMap::new();
    for (name, service) in &config.services {
        if let Some(port) = service.port {
            for node in &service.nodes {
                ports
                    .entry((node.as_str(), port))
                    .or_default()
                    .push(name.as_str());
            }
        }
    }
    for ((node, port), services) in ports.iter().filter(|(_, s)| s.len() > 1) {
        notes.push(format!(
            "port {port} of node {node} serves {}: they reach one app there, and a connection \
             intercepted to that port goes to {} alone",
            services.join(" and "),
            services[0]
        ));
    }
    if !config.nodes.is_empty() {
        for (name, service) in &config.services {
            for node in service
                .nodes
                .iter()
                .filter(|n| !config.nodes.contains_key(*n))
            {
                notes.push(format!(
                    "service {name} is placed on {node}, which [nodes] does not list: it runs \
                     there only once {node} joins and reports its address"
                ));
            }
        }
    }
    notes
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
    // Every error of cluster.toml at once; then the route files, which need it valid.
    let text = pimesh_schema::seed::read_small(file).map_err(|err| err.to_string())?;
    if let Err(errors) = ClusterConfig::parse_all(file, &text) {
        for error in &errors {
            eprintln!("{error}");
        }
        let count = errors.len();
        let what = if count == 1 { "error" } else { "errors" };
        return Err(format!("{}: {count} {what}", file.display()).into());
    }
    let site = site_folder::compile(file).map_err(|err| err.to_string())?;
    let config = site.config;
    for note in notes(&config) {
        println!("note: {note}");
    }
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

/// `pimeshctl config diff`: the site folder of `file` (compiled as `publish` signs it)
/// against the newest revision the central server holds, as a unified diff; returns the
/// exit code: 0 when they are the same, [`crate::status::UNHEALTHY_EXIT`] when they
/// differ (as `diff` and `kubectl diff` tell the two apart).
pub fn diff(file: &Path, operator: &crate::central::Operator<'_>) -> Result<u8, crate::Failure> {
    let local = site_folder::compile(file).map_err(|err| err.to_string())?;
    if local.config.site != operator.site {
        return Err(format!(
            "{} is for site {}, the site folder for site {}",
            file.display(),
            local.config.site,
            operator.site
        )
        .into());
    }
    let (published, label) = match operator.latest_revision()? {
        Some(number) => (
            operator.revision(number)?.config,
            format!("revision {number} (central)"),
        ),
        None => (String::new(), "nothing published (central)".to_owned()),
    };
    let text = unified_diff(&published, &label, &local.text, &file.display().to_string());
    if text.is_empty() {
        println!("{} is what {label} holds", file.display());
        return Ok(0);
    }
    print!("{text}");
    Ok(crate::status::UNHEALTHY_EXIT)
}

/// `old` → `new` as a unified diff with 3 lines of context; empty when they are equal.
fn unified_diff(old: &str, old_label: &str, new: &str, new_label: &str) -> String {
    if old == new {
        return String::new();
    }
    similar::TextDiff::from_lines(old, new)
        .unified_diff()
        .context_radius(3)
        .header(old_label, new_label)
        .to_string()
}

#[cfg(test)]
mod diff_tests {
    use super::unified_diff;

    #[test]
    fn a_diff_shows_the_changed_lines_with_context_and_nothing_when_equal() {
        let old = "site = \"s\"\n[proxy]\nmax_connections = 100\n";
        let new = "site = \"s\"\n[proxy]\nmax_connections = 200\n";
        assert_eq!(unified_diff(old, "a", old, "b"), "");
        assert_eq!(
            unified_diff(old, "revision 3 (central)", new, "cluster.toml"),
            "--- revision 3 (central)\n+++ cluster.toml\n@@ -1,3 +1,3 @@\n site = \"s\"\n [proxy]\n-max_connections = 100\n+max_connections = 200\n"
        );
    }
}
