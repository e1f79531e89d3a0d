//! Connections to a Kubernetes Service address, from this node's processes and from its
//! pods, go through the mesh proxy: in table `nat`, a chain [`CHAIN`] holds one rule,
//! `-p tcp -d <service_cidr> -j REDIRECT --to-ports 4140` (the proxy's outbound port,
//! [`PROXY_OUTBOUND_PORT`]); the first rule of `OUTPUT` jumps to it,
//! `-p tcp -d <service_cidr> -m owner ! --uid-owner pimesh-proxy -j PIMESH-K3S-SERVICES`,
//! and so does the first rule of `PREROUTING` for what arrives from the pods' bridge
//! ([`POD_BRIDGE`], K3s's flannel bridge), `-i cni0 -p tcp -d <service_cidr> -j ...`: a
//! redirect there lands on the bridge's own address, where the proxy's outbound port
//! listens too (it serves a connection on another address than loopback only when a
//! redirect brought it). The proxy reads the original destination (`SO_ORIGINAL_DST`)
//! and routes by it.
//!
//! Invariants:
//! - the proxy's own connections are never redirected (the owner match), so it can reach
//!   a Service address itself without a loop;
//! - each jump is its parent chain's first rule, ahead of kube-proxy's `KUBE-SERVICES`
//!   (which would DNAT the address to a pod first); kube-proxy only adds its jump when it
//!   is missing, so the two never fight;
//! - nothing from another interface than the pods' bridge is redirected: a host of the
//!   LAN cannot reach the proxy's outbound side through a Service address;
//! - [`Iptables::install`] is idempotent and cheap when nothing changed: the chain is made
//!   when missing, flushed and refilled only when it holds anything but the one rule, and
//!   the jump inserted only when `iptables -C` finds it absent or it is not first (a jump
//!   for another range, left by an earlier `service_cidr`, is deleted);
//!   [`Iptables::remove`] takes the jumps and the chain away, touching no other rule;
//! - every `iptables` call runs with `-w` (the xtables lock) and a timeout
//!   ([`TIMEOUT`]); a missing or failing `iptables` is an error for the status, never a
//!   crash.

use std::fmt;
use std::io::Read as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pimesh_schema::cluster::Ipv4Cidr;
pub use pimesh_schema::cluster::PROXY_OUTBOUND_PORT;

/// The chain of the redirect, in table `nat`.
pub const CHAIN: &str = "PIMESH-K3S-SERVICES";
/// The bridge of the node's pods (K3s's flannel CNI makes it).
pub const POD_BRIDGE: &str = "cni0";
/// The chains that jump to [`CHAIN`]: connections made on the node, and those that come in
/// (from the pods' bridge).
pub const PARENTS: [&str; 2] = ["OUTPUT", "PREROUTING"];
/// The proxy's system user (`systemd/pimesh.sysusers`).
pub const PROXY_USER: &str = "pimesh-proxy";
/// The longest one `iptables` call may take.
pub const TIMEOUT: Duration = Duration::from_secs(10);
/// The most of an answer read (an `-S` listing of `OUTPUT` or of the chain).
const MAX_OUTPUT: u64 = 1024 * 1024;

/// What is redirected on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    /// The Kubernetes Services' range (`[k3s] service_cidr`).
    pub service_cidr: Ipv4Cidr,
    /// Where connections go: the proxy's outbound port.
    pub to_port: u16,
    /// The proxy's user, by name or number: its connections are left alone.
    pub proxy_owner: String,
}

impl Rules {
    /// The node's rules for `service_cidr`: to the proxy's outbound port, the proxy's user
    /// exempt.
    pub fn for_proxy(service_cidr: Ipv4Cidr) -> Rules {
        Rules {
            service_cidr,
            to_port: PROXY_OUTBOUND_PORT,
            proxy_owner: PROXY_USER.to_owned(),
        }
    }

    /// The chain's one rule, as it follows `-A PIMESH-K3S-SERVICES`.
    pub fn redirect_rule(&self) -> Vec<String> {
        strings(&[
            "-p",
            "tcp",
            "-d",
            &self.service_cidr.to_string(),
            "-j",
            "REDIRECT",
            "--to-ports",
            &self.to_port.to_string(),
        ])
    }

    /// The jump from `parent` (one of [`PARENTS`]), as it follows `-I <parent> 1`.
    pub fn jump_rule(&self, parent: &str) -> Vec<String> {
        let cidr = self.service_cidr.to_string();
        if parent == "PREROUTING" {
            return strings(&["-i", POD_BRIDGE, "-p", "tcp", "-d", &cidr, "-j", CHAIN]);
        }
        strings(&[
            "-p",
            "tcp",
            "-d",
            &cidr,
            "-m",
            "owner",
            "!",
            "--uid-owner",
            &self.proxy_owner,
            "-j",
            CHAIN,
        ])
    }
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|arg| (*arg).to_owned()).collect()
}

/// `iptables -w 5 -t nat <args>`: every call of this module.
pub fn nat(args: &[String]) -> Vec<String> {
    let mut all = strings(&["-w", "5", "-t", "nat"]);
    all.extend(args.iter().cloned());
    all
}

/// `<verb> <chain> <rule>`.
fn command(verb: &str, chain: &str, rule: &[String]) -> Vec<String> {
    let mut args = strings(&[verb, chain]);
    args.extend(rule.iter().cloned());
    args
}

/// The lines of an `iptables -S <parent>` listing that jump to [`CHAIN`].
pub fn jumps_in<'a>(listing: &'a str, parent: &str) -> Vec<&'a str> {
    let prefix = format!("-A {parent} ");
    listing
        .lines()
        .map(str::trim)
        .filter(|line| line.starts_with(&prefix))
        .filter(|line| {
            line.split_whitespace()
                .collect::<Vec<_>>()
                .ends_with(&["-j", CHAIN])
        })
        .collect()
}

/// Whether the first rule of an `iptables -S <parent>` listing jumps to [`CHAIN`].
pub fn jump_is_first(listing: &str, parent: &str) -> bool {
    let prefix = format!("-A {parent} ");
    let first = listing
        .lines()
        .map(str::trim)
        .find(|line| line.starts_with(&prefix));
    first.is_some_and(|line| jumps_in(line, parent).len() == 1)
}

/// The arguments that delete the rule of listing line `line` (`-A <chain> ...` becomes
/// `-D <chain> ...`); the rules this module lists hold no quoted words.
pub fn delete_args(line: &str) -> Option<Vec<String>> {
    let rest = line.trim().strip_prefix("-A ")?;
    let mut args = vec!["-D".to_owned()];
    args.extend(rest.split_whitespace().map(str::to_owned));
    Some(args)
}

/// The number of rules in an `iptables -S <chain>` listing.
pub fn rule_count(listing: &str) -> usize {
    listing
        .lines()
        .filter(|line| line.trim_start().starts_with("-A "))
        .count()
}

/// Why the rules could not be read or changed.
#[derive(Debug)]
pub enum RedirectError {
    /// `iptables` could not be run (not installed, most likely).
    Spawn {
        program: PathBuf,
        source: std::io::Error,
    },
    /// It did not answer within [`TIMEOUT`]; it was killed.
    Timeout { args: Vec<String> },
    /// It answered with a failure.
    Failed {
        args: Vec<String>,
        status: std::process::ExitStatus,
        stderr: String,
    },
}

impl fmt::Display for RedirectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RedirectError::Spawn { program, source } => {
                write!(f, "cannot run {}: {source}", program.display())
            }
            RedirectError::Timeout { args } => write!(
                f,
                "iptables {} did not answer within {} s",
                args.join(" "),
                TIMEOUT.as_secs()
            ),
            RedirectError::Failed {
                args,
                status,
                stderr,
            } => write!(
                f,
                "iptables {} failed ({status}): {}",
                args.join(" "),
                stderr.trim()
            ),
        }
    }
}

impl std::error::Error for RedirectError {}

/// One finished call: whether it succeeded, its exit code and its output.
struct Answer {
    code: Option<i32>,
    status: std::process::ExitStatus,
    stdout: String,
    stderr: String,
}

/// The `iptables` executable this node's rules are made with.
#[derive(Debug, Clone)]
pub struct Iptables {
    pub program: PathBuf,
}

impl Default for Iptables {
    /// `iptables` on the `PATH` (Debian's: the nf_tables backend).
    fn default() -> Self {
        Iptables {
            program: PathBuf::from("iptables"),
        }
    }
}

impl Iptables {
    /// Makes the node's rules `rules` (see the module doc). Returns whether anything
    /// changed.
    pub fn install(&self, rules: &Rules) -> Result<bool, RedirectError> {
        let mut changed = false;
        let redirect = rules.redirect_rule();
        let chain = self.call(&strings(&["-S", CHAIN]))?;
        if chain.code != Some(0) {
            self.must(&strings(&["-N", CHAIN]))?;
            changed = true;
        }
        let exact = chain.code == Some(0)
            && rule_count(&chain.stdout) == 1
            && self.present(&command("-C", CHAIN, &redirect))?;
        if !exact {
            self.must(&strings(&["-F", CHAIN]))?;
            self.must(&command("-A", CHAIN, &redirect))?;
            changed = true;
        }
        for parent in PARENTS {
            let jump = rules.jump_rule(parent);
            let listing = self.must(&strings(&["-S", parent]))?;
            let jumps = jumps_in(&listing.stdout, parent);
            let in_place = jumps.len() == 1
                && jump_is_first(&listing.stdout, parent)
                && self.present(&command("-C", parent, &jump))?;
            if !in_place {
                for line in jumps {
                    if let Some(args) = delete_args(line) {
                        self.must(&args)?;
                    }
                }
                let mut insert = strings(&["-I", parent, "1"]);
                insert.extend(jump);
                self.must(&insert)?;
                changed = true;
            }
        }
        Ok(changed)
    }

    /// Takes the jumps and the chain away, when there. Returns whether anything changed.
    pub fn remove(&self) -> Result<bool, RedirectError> {
        let mut changed = false;
        for parent in PARENTS {
            let listing = self.must(&strings(&["-S", parent]))?;
            for line in jumps_in(&listing.stdout, parent) {
                if let Some(args) = delete_args(line) {
                    self.must(&args)?;
                    changed = true;
                }
            }
        }
        if self.call(&strings(&["-S", CHAIN]))?.code == Some(0) {
            self.must(&strings(&["-F", CHAIN]))?;
            self.must(&strings(&["-X", CHAIN]))?;
            changed = true;
        }
        Ok(changed)
    }

    /// `iptables -C`: `true` when the rule is there, `false` when absent (exit code 1),
    /// an error otherwise (a bad rule: exit code 2).
    fn present(&self, args: &[String]) -> Result<bool, RedirectError> {
        let answer = self.call(args)?;
        match answer.code {
            Some(0) => Ok(true),
            Some(1) => Ok(false),
            _ => Err(RedirectError::Failed {
                args: nat(args),
                status: answer.status,
                stderr: answer.stderr,
            }),
        }
    }

    /// A call that must succeed.
    fn must(&self, args: &[String]) -> Result<Answer, RedirectError> {
        let answer = self.call(args)?;
        if answer.code == Some(0) {
            Ok(answer)
        } else {
            Err(RedirectError::Failed {
                args: nat(args),
                status: answer.status,
                stderr: answer.stderr,
            })
        }
    }

    /// Runs `iptables -w 5 -t nat <args>`, killed after [`TIMEOUT`].
    fn call(&self, args: &[String]) -> Result<Answer, RedirectError> {
        let all = nat(args);
        let mut child = Command::new(&self.program)
            .args(&all)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| RedirectError::Spawn {
                program: self.program.clone(),
                source,
            })?;
        // Read both pipes beside the wait, so that a long listing cannot block the child.
        let readers = [
            child.stdout.take().map(|out| read_all(Box::new(out))),
            child.stderr.take().map(|err| read_all(Box::new(err))),
        ];
        let deadline = Instant::now() + TIMEOUT;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Ok(None) | Err(_) => break None,
            }
        };
        let Some(status) = status else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(RedirectError::Timeout { args: all });
        };
        let [stdout, stderr] = readers.map(|reader| {
            reader
                .and_then(|handle| handle.join().ok())
                .unwrap_or_default()
        });
        Ok(Answer {
            code: status.code(),
            status,
            stdout,
            stderr,
        })
    }
}

/// Reads `pipe` to its end (at most [`MAX_OUTPUT`]) on a thread of its own.
fn read_all(pipe: Box<dyn std::io::Read + Send>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.take(MAX_OUTPUT).read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(cidr: &str, owner: &str) -> Rules {
        Rules {
            service_cidr: Ipv4Cidr::try_from(cidr.to_owned()).expect("cidr"),
            to_port: 4140,
            proxy_owner: owner.to_owned(),
        }
    }

    #[test]
    fn the_rules_redirect_the_services_range_but_not_the_proxy_itself() {
        let node = Rules::for_proxy(Ipv4Cidr::K3S_DEFAULT_SERVICES);
        assert_eq!(
            node.redirect_rule().join(" "),
            "-p tcp -d 10.43.0.0/16 -j REDIRECT --to-ports 4140"
        );
        assert_eq!(
            node.jump_rule("OUTPUT").join(" "),
            "-p tcp -d 10.43.0.0/16 -m owner ! --uid-owner pimesh-proxy -j PIMESH-K3S-SERVICES"
        );
        // From the pods' bridge only: nothing that arrives from the LAN is redirected.
        assert_eq!(
            node.jump_rule("PREROUTING").join(" "),
            "-i cni0 -p tcp -d 10.43.0.0/16 -j PIMESH-K3S-SERVICES"
        );
        assert_eq!(
            nat(&command("-A", CHAIN, &node.redirect_rule())).join(" "),
            "-w 5 -t nat -A PIMESH-K3S-SERVICES -p tcp -d 10.43.0.0/16 -j REDIRECT --to-ports 4140"
        );
        assert_eq!(
            rules("10.96.0.0/12", "997").jump_rule("OUTPUT")[..4].join(" "),
            "-p tcp -d 10.96.0.0/12"
        );
    }

    #[test]
    fn jumps_are_found_in_a_listing_and_deleted_by_their_own_words() {
        let listing = "\
-P OUTPUT ACCEPT
-A OUTPUT -d 10.44.0.0/16 -p tcp -m owner ! --uid-owner 997 -j PIMESH-K3S-SERVICES
-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A OUTPUT -d 10.43.0.0/16 -p tcp -m owner ! --uid-owner 997 -j PIMESH-K3S-SERVICES
-A OUTPUT -j PIMESH-K3S-SERVICES-NOT
";
        let jumps = jumps_in(listing, "OUTPUT");
        assert_eq!(jumps.len(), 2);
        assert!(jumps_in(listing, "PREROUTING").is_empty());
        assert!(jump_is_first(listing, "OUTPUT"));
        assert!(!jump_is_first(
            &listing.replacen(
                "-A OUTPUT -d 10.44",
                "-A OUTPUT -j KUBE-SERVICES\n-A OUTPUT -d 10.44",
                1
            ),
            "OUTPUT"
        ));
        assert_eq!(
            delete_args(jumps[0]).expect("a rule").join(" "),
            "-D OUTPUT -d 10.44.0.0/16 -p tcp -m owner ! --uid-owner 997 -j PIMESH-K3S-SERVICES"
        );
        assert_eq!(delete_args("-P OUTPUT ACCEPT"), None);
        assert_eq!(
            rule_count("-N PIMESH-K3S-SERVICES\n-A PIMESH-K3S-SERVICES -j REDIRECT\n"),
            1
        );
    }

    #[test]
    fn a_missing_iptables_is_an_error_that_names_it() {
        let iptables = Iptables {
            program: PathBuf::from("/nonexistent/iptables"),
        };
        let err = iptables
            .install(&rules("10.43.0.0/16", "0"))
            .expect_err("no iptables");
        assert!(
            err.to_string().contains("cannot run /nonexistent/iptables"),
            "{err}"
        );
    }

    /// In a network namespace of its own (root only, as `make test` runs): install, install
    /// again (no second jump), move to another range, remove; `iptables -t nat -S` tells.
    #[test]
    fn the_rules_are_installed_once_followed_and_removed_in_a_fresh_network_namespace() {
        assert!(
            nix::unistd::Uid::effective().is_root(),
            "this test makes a network namespace and iptables rules: run it as root"
        );
        let worker = std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare the netns");
            let listing = || {
                let out = Command::new("iptables")
                    .args(["-w", "5", "-t", "nat", "-S"])
                    .output()
                    .expect("iptables -S");
                assert!(out.status.success(), "{out:?}");
                String::from_utf8_lossy(&out.stdout).into_owned()
            };
            let iptables = Iptables::default();
            // A uid that is not root's: the proxy's user need not exist on the host.
            let first = rules("10.43.0.0/16", "65534");
            assert!(iptables.install(&first).expect("installed"));
            let after_install = listing();
            assert!(
                after_install.contains("-A OUTPUT -d 10.43.0.0/16 -p tcp -m owner ! --uid-owner 65534 -j PIMESH-K3S-SERVICES"),
                "{after_install}"
            );
            assert!(
                after_install.contains(
                    "-A PREROUTING -d 10.43.0.0/16 -i cni0 -p tcp -j PIMESH-K3S-SERVICES"
                ),
                "{after_install}"
            );
            assert!(
                after_install.contains(
                    "-A PIMESH-K3S-SERVICES -d 10.43.0.0/16 -p tcp -j REDIRECT --to-ports 4140"
                ),
                "{after_install}"
            );
            assert!(
                !iptables.install(&first).expect("again"),
                "nothing to change"
            );
            assert_eq!(listing(), after_install, "no second jump, no second rule");

            // Someone else's rule put first (as kube-proxy would) and a stray rule in the
            // chain: the jump goes back on top, the chain back to its one rule.
            let run = |args: &[&str]| {
                let status = Command::new("iptables")
                    .args(args)
                    .status()
                    .expect("iptables");
                assert!(status.success(), "{args:?}");
            };
            run(&["-t", "nat", "-N", "KUBE-SERVICES"]);
            run(&["-t", "nat", "-I", "OUTPUT", "1", "-j", "KUBE-SERVICES"]);
            run(&["-t", "nat", "-A", CHAIN, "-j", "RETURN"]);
            assert!(iptables.install(&first).expect("repaired"));
            let repaired = listing();
            let output: Vec<&str> = repaired
                .lines()
                .filter(|line| line.starts_with("-A OUTPUT"))
                .collect();
            assert_eq!(output.len(), 2, "{repaired}");
            assert!(output[0].ends_with("-j PIMESH-K3S-SERVICES"), "{repaired}");
            assert_eq!(
                repaired.matches(&format!("-A {CHAIN} ")).count(),
                1,
                "{repaired}"
            );

            // A new range replaces the old jump and rule.
            let second = rules("10.96.0.0/12", "65534");
            assert!(iptables.install(&second).expect("moved"));
            let moved = listing();
            assert!(!moved.contains("10.43.0.0/16"), "{moved}");
            assert_eq!(jumps_in(&moved, "OUTPUT").len(), 1, "{moved}");
            assert_eq!(jumps_in(&moved, "PREROUTING").len(), 1, "{moved}");

            assert!(iptables.remove().expect("removed"));
            let removed = listing();
            assert!(!removed.contains(CHAIN), "{removed}");
            assert!(
                removed.contains("-A OUTPUT -j KUBE-SERVICES"),
                "others' rules stay"
            );
            assert!(!iptables.remove().expect("nothing left"));
        });
        if let Err(panic) = worker.join() {
            std::panic::resume_unwind(panic);
        }
    }
}
