use std::path::Path;

use serde::de::DeserializeOwned;

use crate::ConfigError;

/// Decodes `text`, the contents of `file`, as TOML into `T`.
///
/// Syntax errors, type mismatches, unknown keys and values refused by a field's own
/// validation all come back as a [`ConfigError`] with the line, column and dotted key path.
pub fn parse_toml<T: DeserializeOwned>(file: &Path, text: &str) -> Result<T, ConfigError> {
    let deserializer =
        toml::Deserializer::parse(text).map_err(|err| toml_error(file, text, &err, None))?;
    serde_path_to_error::deserialize(deserializer).map_err(|err| {
        let path = err.path().to_string();
        let key = (path != ".").then_some(path);
        toml_error(file, text, err.inner(), key)
    })
}

fn toml_error(file: &Path, text: &str, err: &toml::de::Error, key: Option<String>) -> ConfigError {
    let message = err.message().trim_end().to_owned();
    match key {
        Some(key) => ConfigError::at_key(file, text, err.span().map(|s| s.start), &key, message),
        None => {
            let mut error = ConfigError::file(file, message);
            if let Some(span) = err.span() {
                let (line, column) = crate::position::line_column(text, span.start);
                error.line = Some(line);
                error.column = Some(column);
            }
            error
        }
    }
}
