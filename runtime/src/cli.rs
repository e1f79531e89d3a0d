//! The command line of every daemon: clap's derive API (no hand-written parser), with the
//! checks several daemons share.
//!
//! Conventions, for every daemon: `--flag value` and `--flag=value` both work; a flag given
//! twice keeps its last value (`args_override_self`); a usage error exits 2 with a message
//! naming the flag and the value (`clap::Error::exit`); `--help` prints the help and exits
//! 0.

use std::ffi::OsStr;
use std::path::PathBuf;

use clap::builder::TypedValueParser;
use clap::error::ErrorKind;

/// A path that is not empty: `--config ""` is a mistake, not "here". The path need not be
/// UTF-8.
#[derive(Debug, Clone, Copy)]
pub struct NonEmptyPath;

impl TypedValueParser for NonEmptyPath {
    type Value = PathBuf;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &OsStr,
    ) -> Result<PathBuf, clap::Error> {
        if value.is_empty() {
            let flag = arg.map_or_else(|| "the argument".to_owned(), ToString::to_string);
            let message =
                format!("invalid value '' for '{flag}': expected a path, found an empty string\n");
            return Err(clap::Error::raw(ErrorKind::InvalidValue, message).with_cmd(cmd));
        }
        Ok(PathBuf::from(value))
    }
}

/// A usage error of `cmd` that clap's own checks cannot express (a flag required unless
/// another says otherwise, a value that depends on another): exits 2 like theirs.
pub fn usage_error(cmd: &mut clap::Command, message: impl std::fmt::Display) -> clap::Error {
    cmd.error(ErrorKind::ValueValidation, message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    #[command(name = "daemon", args_override_self = true)]
    struct Cli {
        /// A file.
        #[arg(long, value_name = "PATH", value_parser = NonEmptyPath)]
        config: Option<PathBuf>,
    }

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("daemon").chain(args.iter().copied()))
    }

    #[test]
    fn an_empty_path_is_refused_by_flag_and_a_repeated_flag_keeps_its_last_value() {
        let err = parse(&["--config", ""]).expect_err("empty");
        assert_eq!(err.kind(), ErrorKind::InvalidValue);
        assert_eq!(err.exit_code(), 2);
        let text = err.to_string();
        assert!(
            text.contains("--config") && text.contains("empty string"),
            "{text}"
        );
        let cli = parse(&["--config=/a", "--config", "/b"]).expect("valid");
        assert_eq!(cli.config, Some(PathBuf::from("/b")));
    }

    #[test]
    fn non_utf8_paths_are_kept_as_given() {
        use std::os::unix::ffi::OsStrExt as _;
        let raw = OsStr::from_bytes(b"/tmp/\xff.toml");
        let cli = Cli::try_parse_from([OsStr::new("daemon"), OsStr::new("--config"), raw])
            .expect("valid");
        assert_eq!(cli.config.as_deref().map(|p| p.as_os_str()), Some(raw));
    }

    #[test]
    fn a_usage_error_exits_2_and_says_what() {
        use clap::CommandFactory as _;
        let err = usage_error(&mut Cli::command(), "--config is required");
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("--config is required"));
    }
}
