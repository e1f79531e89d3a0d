//! How a server node announces itself on the LAN: the DNS-SD service [`SERVICE_TYPE`]
//! (mDNS), one instance per server node named after the node, whose SRV port is its first
//! control replica's port and whose TXT record says which site it serves.
//!
//! | TXT key | value |
//! |---|---|
//! | `site` | the site's name |
//! | `anchor` | the first 16 hex digits of the anchor's SHA-256 (the join token's pin) |
//! | `role` | `server` |
//! | `replicas` | how many control replicas it runs (ports `port`, `port+1`, ...) |
//! | `dhcp` | `none` when the node's LAN has shown no DHCP server (see [`Announcement::lan_without_dhcp`]); absent otherwise |
//!
//! An announcement is a hint, never trust: a joining node still checks the pin on the
//! bundle the server hands out before it sends anything secret. The TXT only saves it
//! dialling servers of other sites.

use std::collections::BTreeMap;
use std::fmt;

use pimesh_schema::DnsLabel;

use crate::Role;

/// The DNS-SD service type of Pimesh server nodes.
pub const SERVICE_TYPE: &str = "_pimesh._tcp.local.";

/// How many hex digits of the pin the TXT record carries.
const PIN_PREFIX_DIGITS: usize = 16;

/// What one server node announces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announcement {
    pub node: DnsLabel,
    pub site: DnsLabel,
    /// The first [`PIN_PREFIX_DIGITS`] hex digits of the anchor pin.
    pub anchor_prefix: String,
    pub role: Role,
    /// The first control replica's port (the SRV port).
    pub port: u16,
    pub replicas: u8,
    /// The node has held only an IPv4 link-local address on the LAN for the whole lease
    /// grace a joining board would wait: the LAN has no DHCP server, and a board plugged
    /// in may join over its link-local address at once. Read leniently: a `dhcp` value
    /// other than `none` (a later version's) means false.
    pub lan_without_dhcp: bool,
}

/// Why a DNS-SD answer is not a usable announcement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AnnouncementError {
    Missing(&'static str),
    Invalid { key: &'static str, value: String },
}

impl fmt::Display for AnnouncementError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AnnouncementError::Missing(key) => write!(f, "the TXT record has no `{key}`"),
            AnnouncementError::Invalid { key, value } => {
                write!(f, "the TXT record's `{key}` is not usable: {value:?}")
            }
        }
    }
}

impl std::error::Error for AnnouncementError {}

impl Announcement {
    /// The announcement of a server node of `site` whose anchor hashes to `pin`.
    pub fn server(site: DnsLabel, node: DnsLabel, pin: &[u8; 32], port: u16, replicas: u8) -> Self {
        Announcement {
            node,
            site,
            anchor_prefix: crate::hex(pin)[..PIN_PREFIX_DIGITS].to_owned(),
            role: Role::Server,
            port,
            replicas,
            lan_without_dhcp: false,
        }
    }

    /// The TXT record's key/value pairs.
    pub fn txt(&self) -> Vec<(String, String)> {
        let mut txt = vec![
            ("site".into(), self.site.as_str().to_owned()),
            ("anchor".into(), self.anchor_prefix.clone()),
            ("role".into(), self.role.as_str().to_owned()),
            ("replicas".into(), self.replicas.to_string()),
        ];
        if self.lan_without_dhcp {
            txt.push(("dhcp".into(), "none".into()));
        }
        txt
    }

    /// Reads an answer: the instance's node name, its SRV port and TXT pairs.
    pub fn parse<'a>(
        node: &str,
        port: u16,
        txt: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Announcement, AnnouncementError> {
        let txt: BTreeMap<&str, &str> = txt.into_iter().collect();
        let get = |key: &'static str| txt.get(key).copied().ok_or(AnnouncementError::Missing(key));
        let invalid = |key: &'static str, value: &str| AnnouncementError::Invalid {
            key,
            value: value.to_owned(),
        };
        let node = DnsLabel::try_from(node.to_owned()).map_err(|_| invalid("instance", node))?;
        let site_text = get("site")?;
        let site =
            DnsLabel::try_from(site_text.to_owned()).map_err(|_| invalid("site", site_text))?;
        let anchor_prefix = get("anchor")?;
        if anchor_prefix.len() != PIN_PREFIX_DIGITS
            || !anchor_prefix.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return Err(invalid("anchor", anchor_prefix));
        }
        let role = match get("role")? {
            "server" => Role::Server,
            "agent" => Role::Agent,
            other => return Err(invalid("role", other)),
        };
        let replicas_text = get("replicas")?;
        let replicas: u8 = replicas_text
            .parse()
            .ok()
            .filter(|n| (1..=9).contains(n))
            .ok_or_else(|| invalid("replicas", replicas_text))?;
        if port == 0 {
            return Err(invalid("port", "0"));
        }
        Ok(Announcement {
            node,
            site,
            anchor_prefix: anchor_prefix.to_ascii_lowercase(),
            role,
            port,
            replicas,
            lan_without_dhcp: txt.get("dhcp") == Some(&"none"),
        })
    }

    /// Whether this announcement is for `site` with the anchor pinned by `pin`.
    pub fn matches(&self, site: &DnsLabel, pin: &[u8; 32]) -> bool {
        &self.site == site && crate::hex(pin).starts_with(&self.anchor_prefix)
    }

    /// The ports of the announced node's replicas.
    pub fn replica_ports(&self) -> impl Iterator<Item = u16> + '_ {
        (0..u16::from(self.replicas)).filter_map(|i| self.port.checked_add(i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn label(text: &str) -> DnsLabel {
        DnsLabel::try_from(text.to_owned()).expect("label")
    }

    #[test]
    fn an_announcement_reads_back_from_its_txt_record() {
        let pin = [0xab; 32];
        let sent = Announcement::server(label("depot-7"), label("pi-a"), &pin, 8086, 3);
        let txt = sent.txt();
        let pairs = txt.iter().map(|(k, v)| (k.as_str(), v.as_str()));
        let read = Announcement::parse("pi-a", 8086, pairs).expect("parse");
        assert_eq!(read, sent);
        assert!(read.matches(&label("depot-7"), &pin));
        assert!(!read.matches(&label("depot-8"), &pin));
        assert!(!read.matches(&label("depot-7"), &[0xac; 32]));
        assert_eq!(
            read.replica_ports().collect::<Vec<_>>(),
            vec![8086, 8087, 8088]
        );
        assert!(!read.lan_without_dhcp);
        assert!(!txt.iter().any(|(key, _)| key == "dhcp"));
    }

    #[test]
    fn a_lan_without_dhcp_is_announced_and_other_values_read_as_unknown() {
        let mut sent = Announcement::server(label("depot-7"), label("pi-a"), &[0xab; 32], 8086, 3);
        sent.lan_without_dhcp = true;
        let txt = sent.txt();
        assert!(txt.contains(&("dhcp".to_owned(), "none".to_owned())));
        let pairs = txt.iter().map(|(k, v)| (k.as_str(), v.as_str()));
        assert_eq!(Announcement::parse("pi-a", 8086, pairs), Ok(sent.clone()));
        let later = txt.iter().map(|(k, v)| {
            let v = if k == "dhcp" {
                "some-later-value"
            } else {
                v.as_str()
            };
            (k.as_str(), v)
        });
        let read = Announcement::parse("pi-a", 8086, later).expect("parse");
        assert!(!read.lan_without_dhcp);
    }

    #[test]
    fn a_broken_answer_names_what_is_wrong() {
        let good = [
            ("site", "depot-7"),
            ("anchor", "abababababababab"),
            ("role", "server"),
            ("replicas", "3"),
        ];
        let parse = |node: &str, port: u16, txt: &[(&'static str, &'static str)]| {
            Announcement::parse(node, port, txt.iter().copied())
        };
        assert_eq!(
            parse("pi-a", 8086, &good[1..]),
            Err(AnnouncementError::Missing("site"))
        );
        let mut bad = good;
        bad[1] = ("anchor", "xyz");
        assert!(matches!(
            parse("pi-a", 8086, &bad),
            Err(AnnouncementError::Invalid { key: "anchor", .. })
        ));
        bad = good;
        bad[3] = ("replicas", "12");
        assert!(matches!(
            parse("pi-a", 8086, &bad),
            Err(AnnouncementError::Invalid {
                key: "replicas",
                ..
            })
        ));
        assert!(matches!(
            parse("Not A Label", 8086, &good),
            Err(AnnouncementError::Invalid {
                key: "instance",
                ..
            })
        ));
        assert!(matches!(
            parse("pi-a", 0, &good),
            Err(AnnouncementError::Invalid { key: "port", .. })
        ));
    }
}
