//! Helpers shared by pimeshctl's integration tests.

use std::process::{Command, Output};

/// Runs the pimeshctl binary under test with `args`.
pub fn pimeshctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pimeshctl"))
        .args(args)
        .output()
        .expect("run pimeshctl")
}

/// A command's output as text, for assertions and failure messages.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}
