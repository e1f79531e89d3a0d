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
                let (line, column) = crate::error::line_column(text, span.start);
                error.line = Some(line);
                error.column = Some(column);
            }
            error
        }
    }
}

/// The dotted name of the key at `path`, written as serde_path_to_error writes it (array
/// indices in brackets: `services.a.split[0].service`), so that every error names keys
/// the same way.
pub(crate) fn key_name(path: &[&str]) -> String {
    let mut name = String::new();
    for segment in path {
        if segment.parse::<usize>().is_ok() {
            name.push_str(&format!("[{segment}]"));
        } else {
            if !name.is_empty() {
                name.push('.');
            }
            name.push_str(segment);
        }
    }
    name
}

/// Byte offset in `text` of the value at `path` (table keys; array indices as decimal
/// strings), for errors found only once the whole file is read, such as a field that
/// names another. `None` when the text does not parse or the path is absent.
pub(crate) fn locate(text: &str, path: &[&str]) -> Option<usize> {
    use toml::de::{DeTable, DeValue};
    let root = DeTable::parse(text).ok()?;
    let (first, rest) = path.split_first()?;
    let mut value = root.get_ref().get(*first)?;
    for segment in rest {
        value = match value.get_ref() {
            DeValue::Table(table) => table.get(*segment)?,
            DeValue::Array(array) => array.get(segment.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(value.span().start)
}
