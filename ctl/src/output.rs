//! `-o table|json|yaml`: how a read command prints what it read. JSON and YAML print the
//! command's own serialisable answer (a documented, stable shape); the table is the
//! command's own rendering of the same answer.

use serde::Serialize;

use crate::Failure;

#[derive(Debug, Clone, Copy, Default, clap::ValueEnum)]
pub enum OutputFormat {
    /// Columns for a person.
    #[default]
    Table,
    /// Pretty-printed JSON, for scripts.
    Json,
    Yaml,
}

impl OutputFormat {
    /// `value` as this format says, `table` making the table.
    pub fn render<T: Serialize>(
        self,
        value: &T,
        table: impl Fn(&T) -> String,
    ) -> Result<String, Failure> {
        Ok(match self {
            OutputFormat::Table => table(value),
            OutputFormat::Json => serde_json::to_string_pretty(value)? + "\n",
            OutputFormat::Yaml => serde_yaml_ng::to_string(value)?,
        })
    }
}
