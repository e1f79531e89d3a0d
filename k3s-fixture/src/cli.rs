//! The command line after the subcommand, parsed as K3s's CLI library (urfave/cli, on Go's
//! `flag` package) parses it: `-name` or `--name`, the value after `=` or in the next
//! argument, a boolean flag alone meaning true, parsing stopping at `--` or at the first
//! argument that is not a flag. An unknown flag is an error naming it as Go does
//! (`flag provided but not defined: -name`).

use crate::flags::{flags, Kind, Subcommand};

/// The flags given, in order, by long name, and the arguments after them.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Parsed {
    pub values: Vec<(String, String)>,
    pub positional: Vec<String>,
    /// `-h`/`--help` was given.
    pub help: bool,
}

/// Parses `args` (the words after the subcommand) for `command`.
pub fn parse(command: Subcommand, args: &[String]) -> Result<Parsed, String> {
    let set = flags(command);
    let mut parsed = Parsed::default();
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        if arg == "--" {
            parsed.positional.extend(rest.cloned());
            break;
        }
        if arg.len() < 2 || !arg.starts_with('-') {
            parsed.positional.push(arg.clone());
            parsed.positional.extend(rest.cloned());
            break;
        }
        let body = arg.strip_prefix("--").unwrap_or_else(|| &arg[1..]);
        if body.is_empty() || body.starts_with('-') || body.starts_with('=') {
            return Err(format!("bad flag syntax: {arg}"));
        }
        let (name, inline) = match body.split_once('=') {
            Some((name, value)) => (name, Some(value.to_owned())),
            None => (body, None),
        };
        if name == "h" || name == "help" {
            parsed.help = true;
            continue;
        }
        let Some((long, kind)) = set.lookup(command, name) else {
            return Err(format!("flag provided but not defined: -{name}"));
        };
        let value = match (kind, inline) {
            (Kind::Bool, Some(value)) => {
                parse_bool(&value).map(|b| b.to_string()).ok_or_else(|| {
                    format!("invalid boolean value {value:?} for -{name}: parse error")
                })?
            }
            (Kind::Bool, None) => "true".to_owned(),
            (_, Some(value)) => value,
            (_, None) => rest
                .next()
                .cloned()
                .ok_or_else(|| format!("flag needs an argument: -{name}"))?,
        };
        parsed.values.push((long, value));
    }
    Ok(parsed)
}

/// A boolean as Go's `strconv.ParseBool` reads it.
pub fn parse_bool(text: &str) -> Option<bool> {
    match text {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(words: &[&str]) -> Vec<String> {
        words.iter().map(|w| (*w).to_owned()).collect()
    }

    fn pair(name: &str, value: &str) -> (String, String) {
        (name.to_owned(), value.to_owned())
    }

    #[test]
    fn flags_take_values_as_go_does() {
        let parsed = parse(
            Subcommand::Server,
            &args(&[
                "--token=abc",
                "-d",
                "/tmp/k",
                "--cluster-init",
                "--tls-san",
                "a",
                "--tls-san=b",
                "-o=/tmp/k.yaml",
                "--debug=false",
                "extra",
                "--not-parsed",
            ]),
        )
        .unwrap();
        assert_eq!(
            parsed.values,
            vec![
                pair("token", "abc"),
                pair("data-dir", "/tmp/k"),
                pair("cluster-init", "true"),
                pair("tls-san", "a"),
                pair("tls-san", "b"),
                pair("write-kubeconfig", "/tmp/k.yaml"),
                pair("debug", "false"),
            ]
        );
        assert_eq!(parsed.positional, args(&["extra", "--not-parsed"]));
    }

    #[test]
    fn unknown_and_incomplete_flags_are_errors() {
        assert_eq!(
            parse(Subcommand::Agent, &args(&["--disable=traefik"])),
            Err("flag provided but not defined: -disable".to_owned())
        );
        assert_eq!(
            parse(Subcommand::Agent, &args(&["-o", "x"])),
            Err("flag provided but not defined: -o".to_owned())
        );
        assert_eq!(
            parse(Subcommand::Server, &args(&["--token"])),
            Err("flag needs an argument: -token".to_owned())
        );
        assert!(parse(Subcommand::Server, &args(&["--cluster-init=maybe"]))
            .unwrap_err()
            .contains("invalid boolean value"));
    }
}
