//! The last lines a unit wrote to the journal, for the status of a unit being healed
//! after it failed or hung:
//! why K3s (or any unit) exited is in its own log, and an operator reading `/status`
//! should not need a shell on the node to see it.
//!
//! Invariants: read with `journalctl` (the journal's own reader; its file format is not
//! ours to parse), at most [`LINES`] lines of at most [`LINE_BYTES`] bytes each, within
//! [`READ_TIMEOUT`]; a failure to read is a one-line note in place of the lines, never an
//! error of the heal.

use std::process::Command;
use std::time::Duration;

/// Lines kept.
pub const LINES: usize = 10;
/// A longer line is cut (with `…`).
pub const LINE_BYTES: usize = 300;
/// The longest wait for `journalctl`.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// The last [`LINES`] lines `unit` logged (its messages, without time or host).
pub async fn last_lines(unit: &str) -> Vec<String> {
    let unit = unit.to_owned();
    let read = tokio::task::spawn_blocking(move || {
        Command::new("journalctl")
            .args(["--no-pager", "--quiet", "--output=cat", "--lines"])
            .arg(LINES.to_string())
            .arg("--unit")
            .arg(&unit)
            .output()
    });
    match tokio::time::timeout(READ_TIMEOUT, read).await {
        Ok(Ok(Ok(output))) if output.status.success() => {
            lines_of(&String::from_utf8_lossy(&output.stdout))
        }
        Ok(Ok(Ok(output))) => vec![format!(
            "(journalctl failed: {})",
            String::from_utf8_lossy(&output.stderr).trim()
        )],
        Ok(Ok(Err(err))) => vec![format!("(cannot run journalctl: {err})")],
        Ok(Err(err)) => vec![format!("(cannot run journalctl: {err})")],
        Err(_) => vec![format!(
            "(journalctl did not answer within {} s)",
            READ_TIMEOUT.as_secs()
        )],
    }
}

/// The last [`LINES`] non-empty lines of `text`, each cut to [`LINE_BYTES`].
fn lines_of(text: &str) -> Vec<String> {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(LINES)..]
        .iter()
        .map(|line| cut(line))
        .collect()
}

fn cut(line: &str) -> String {
    if line.len() <= LINE_BYTES {
        return line.to_owned();
    }
    let mut end = LINE_BYTES;
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &line[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_lines_are_kept_and_long_ones_cut() {
        let text: String = (1..=15).map(|n| format!("line {n}\n\n")).collect();
        let lines = lines_of(&text);
        assert_eq!(lines.len(), LINES);
        assert_eq!(lines.first().map(String::as_str), Some("line 6"));
        assert_eq!(lines.last().map(String::as_str), Some("line 15"));
        let long = "é".repeat(400);
        let cut = lines_of(&long);
        assert!(cut[0].ends_with('…') && cut[0].len() <= LINE_BYTES + '…'.len_utf8());
    }

    #[tokio::test]
    async fn a_unit_without_a_journal_gives_lines_or_a_note_never_an_error() {
        // On a build machine journalctl may be missing or the unit unknown: either way
        // the answer is at most LINES lines.
        let lines = last_lines("pimesh-no-such-unit.service").await;
        assert!(lines.len() <= LINES, "{lines:?}");
    }
}
