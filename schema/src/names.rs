use std::fmt;

/// A DNS label as used for site and node names: 1 to 63 characters of `a-z`, `0-9` and `-`,
/// neither starting nor ending with `-`. Holding one is proof that the name is usable as a
/// hostname, in a SPIFFE ID and in a file name.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct DnsLabel(String);

/// Why a string is not a [`DnsLabel`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameError(String);

impl fmt::Display for NameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NameError {}

impl DnsLabel {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for DnsLabel {
    type Error = NameError;

    fn try_from(name: String) -> Result<Self, NameError> {
        if name.is_empty() || name.len() > 63 {
            return Err(NameError(format!(
                "expected a name of 1 to 63 characters, found {} characters",
                name.len()
            )));
        }
        if let Some(bad) = name
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
        {
            return Err(NameError(format!(
                "expected only lowercase letters, digits and '-', found {bad:?} in {name:?}"
            )));
        }
        if name.starts_with('-') || name.ends_with('-') {
            return Err(NameError(format!(
                "expected a name that neither starts nor ends with '-', found {name:?}"
            )));
        }
        Ok(DnsLabel(name))
    }
}

impl From<DnsLabel> for String {
    fn from(label: DnsLabel) -> String {
        label.0
    }
}

impl fmt::Display for DnsLabel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_hostname_labels() {
        for ok in ["a", "pi-01", "fleet-depot-7", &"x".repeat(63)] {
            assert!(DnsLabel::try_from(ok.to_owned()).is_ok(), "{ok}");
        }
    }

    #[test]
    fn refuses_what_is_no_hostname() {
        for bad in ["", "-a", "a-", "Pi", "a_b", "a.b", "dépôt", &"x".repeat(64)] {
            assert!(DnsLabel::try_from(bad.to_owned()).is_err(), "{bad}");
        }
    }
}
