//! Where in a configuration file's text a key or a byte offset is, for errors that name
//! the line, the column and the dotted key.

/// 1-based line and column (in characters) of byte `offset` in `text`; offsets past the end
/// or inside a character are clamped to the nearest preceding character boundary.
pub(crate) fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_and_column_are_one_based() {
        let text = "a = 1\nbb = \"é2\"\n";
        assert_eq!(line_column(text, 0), (1, 1));
        assert_eq!(line_column(text, 6), (2, 1));
        // the byte after 'é' (two bytes) is the 8th character of line 2
        let after_e = text.find('2').unwrap_or_default();
        assert_eq!(line_column(text, after_e), (2, 8));
        assert_eq!(line_column(text, 10_000), (3, 1));
    }
}
