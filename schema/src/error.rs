use std::fmt;
use std::path::{Path, PathBuf};

/// A configuration file that could not be used, located as precisely as the input allows.
///
/// `line` and `column` are 1-based and present whenever the fault can be tied to a place in
/// the text; `key` is the dotted path of the offending key (`central.url`,
/// `ssh_authorized_keys[1]`) whenever the fault belongs to one key.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub key: Option<String>,
    /// What is wrong and what was expected instead.
    pub message: String,
}

impl ConfigError {
    /// An error about the whole file (unreadable, missing).
    pub fn file(file: &Path, message: impl Into<String>) -> Self {
        ConfigError {
            file: file.to_path_buf(),
            line: None,
            column: None,
            key: None,
            message: message.into(),
        }
    }

    /// An error about the key at `path` of the TOML `text` (for example
    /// `["proxy", "header_timeout"]`), located at its line when it is written there.
    pub fn at_path(file: &Path, text: &str, path: &[&str], message: impl Into<String>) -> Self {
        ConfigError::at_key(
            file,
            text,
            crate::position::locate(text, path),
            &crate::position::key_name(path),
            message,
        )
    }

    /// An error about `key`, located at byte offset `at` of `text` when known.
    pub fn at_key(
        file: &Path,
        text: &str,
        at: Option<usize>,
        key: &str,
        message: impl Into<String>,
    ) -> Self {
        let (line, column) = match at {
            Some(offset) => {
                let (line, column) = crate::position::line_column(text, offset);
                (Some(line), Some(column))
            }
            None => (None, None),
        };
        ConfigError {
            file: file.to_path_buf(),
            line,
            column,
            key: Some(key.to_owned()),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(column) = self.column {
                write!(f, ":{column}")?;
            }
        }
        if let Some(key) = &self.key {
            write!(f, ": key `{key}`")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_file_line_key_and_message() {
        let err = ConfigError::at_key(
            Path::new("/boot/firmware/pimesh.toml"),
            "site = \"x\"\nrole = \"captain\"\n",
            Some(18),
            "role",
            "expected `init` or `join`",
        );
        assert_eq!(
            err.to_string(),
            "/boot/firmware/pimesh.toml:2:8: key `role`: expected `init` or `join`"
        );
    }
}

/// Why a configuration value is not of its type: what was expected, and what was found.
///
/// Deserializing a file turns it into a [`ConfigError`] that names the key and the place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValueError(pub(crate) String);

impl ValueError {
    /// `message` says what was expected and what was found instead.
    pub fn new(message: impl Into<String>) -> ValueError {
        ValueError(message.into())
    }
}

impl fmt::Display for ValueError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ValueError {}
