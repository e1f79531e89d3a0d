//! The flags `k3s server` and `k3s agent` accept at v1.34.3+k3s1, from the one list both
//! the fixture and its readers share: `tests/k3s/fixture/flags-v1.34.3+k3s1.txt` (its
//! header gives the sources and the line format). A config.yaml key is a flag's long name.

use std::collections::BTreeMap;
use std::sync::OnceLock;

/// The flag list, embedded at build time.
const FLAGS_FILE: &str = include_str!("../../tests/k3s/fixture/flags-v1.34.3+k3s1.txt");

/// The subcommands the fixture runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subcommand {
    Server,
    Agent,
}

impl Subcommand {
    pub fn as_str(self) -> &'static str {
        match self {
            Subcommand::Server => "server",
            Subcommand::Agent => "agent",
        }
    }
}

/// What values a flag takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// One value; the last one given wins.
    Scalar,
    /// Repeatable (a YAML list in config.yaml).
    List,
    /// `--flag` alone means true; `--flag=false` is allowed.
    Bool,
}

/// One subcommand's flags: long name to kind.
#[derive(Debug, Default)]
pub struct FlagSet {
    flags: BTreeMap<String, Kind>,
}

impl FlagSet {
    /// The long name and kind of `name`, a long name or a one-letter alias.
    pub fn lookup(&self, command: Subcommand, name: &str) -> Option<(String, Kind)> {
        let long = alias(command, name).unwrap_or(name);
        self.flags.get(long).map(|kind| (long.to_owned(), *kind))
    }
}

/// K3s's one-letter aliases (`-o` is the server's only).
fn alias(command: Subcommand, name: &str) -> Option<&'static str> {
    Some(match name {
        "c" => "config",
        "d" => "data-dir",
        "t" => "token",
        "s" => "server",
        "l" => "log",
        "i" => "node-ip",
        "o" if command == Subcommand::Server => "write-kubeconfig",
        _ => return None,
    })
}

/// The flags of `command`.
pub fn flags(command: Subcommand) -> &'static FlagSet {
    static SETS: OnceLock<(FlagSet, FlagSet)> = OnceLock::new();
    let (server, agent) = SETS.get_or_init(|| parse(FLAGS_FILE));
    match command {
        Subcommand::Server => server,
        Subcommand::Agent => agent,
    }
}

/// The server's and the agent's flag sets from the file's text.
fn parse(text: &str) -> (FlagSet, FlagSet) {
    let mut server = FlagSet::default();
    let mut agent = FlagSet::default();
    let mut in_agent = false;
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line == "[agent]" {
            in_agent = true;
            continue;
        }
        let (name, kind) = match line.split_once(' ') {
            Some((name, "[]")) => (name, Kind::List),
            Some((name, "?")) => (name, Kind::Bool),
            _ => (line, Kind::Scalar),
        };
        let set = if in_agent { &mut agent } else { &mut server };
        set.flags.insert(name.to_owned(), kind);
    }
    (server, agent)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_list_has_both_subcommands() {
        let server = flags(Subcommand::Server);
        let agent = flags(Subcommand::Agent);
        assert!(server.flags.len() > 100 && agent.flags.len() > 40);
        assert_eq!(
            server.lookup(Subcommand::Server, "tls-san"),
            Some(("tls-san".to_owned(), Kind::List))
        );
        assert_eq!(
            server.lookup(Subcommand::Server, "cluster-init"),
            Some(("cluster-init".to_owned(), Kind::Bool))
        );
        assert_eq!(
            server.lookup(Subcommand::Server, "o"),
            Some(("write-kubeconfig".to_owned(), Kind::Scalar))
        );
        assert_eq!(agent.lookup(Subcommand::Agent, "o"), None);
        assert_eq!(agent.lookup(Subcommand::Agent, "disable"), None);
        assert!(agent
            .lookup(Subcommand::Agent, "disable-apiserver-lb")
            .is_some());
        assert!(server
            .lookup(Subcommand::Server, "disable-apiserver-lb")
            .is_none());
    }
}
