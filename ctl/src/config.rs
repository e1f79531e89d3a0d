use std::path::Path;

use pimesh_schema::cluster::ClusterConfig;

/// Validates a site configuration and prints a summary of it.
pub fn validate(file: &Path) -> Result<(), crate::Failure> {
    let config = ClusterConfig::load(file).map_err(|err| err.to_string())?;
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
    Ok(())
}
