//! The table every Pimesh benchmark prints its figures in (`bench/README.md`):
//!
//! ```text
//! == bench-NAME ==
//! # what was measured and how (setup lines)
//! | what                           | figure | unit |
//! |--------------------------------|-------:|------|
//! | config change → every proxy, p50 |   6.21 | ms   |
//! # notes on the run
//! ```
//!
//! One figure per row, the number alone in `figure`, its unit in `unit`; everything that
//! is not a figure is a `# ` line. `table.py` prints the same for the Python benchmarks.

use std::fmt::Display;
use std::time::Duration;

/// The figures of one benchmark, printed by [`Table::print`].
#[derive(Debug, Default)]
pub struct Table {
    name: String,
    setup: Vec<String>,
    rows: Vec<[String; 3]>,
    notes: Vec<String>,
}

impl Table {
    /// The table of `bench-<name>`.
    pub fn new(name: &str) -> Table {
        Table {
            name: name.to_owned(),
            ..Table::default()
        }
    }

    /// A line on how the figures were taken, printed above them.
    pub fn setup(&mut self, line: impl Into<String>) {
        self.setup.push(line.into());
    }

    /// One figure: what it is, the number, its unit.
    pub fn row(&mut self, what: impl Into<String>, figure: impl Display, unit: &str) {
        self.rows
            .push([what.into(), figure.to_string(), unit.to_owned()]);
    }

    /// A duration in milliseconds, two decimals.
    pub fn row_ms(&mut self, what: impl Into<String>, duration: Duration) {
        self.row(
            what,
            format!("{:.2}", duration.as_secs_f64() * 1000.0),
            "ms",
        );
    }

    /// p50, p99 and max of `samples` in milliseconds, and their count.
    pub fn row_percentiles(&mut self, what: &str, samples: &[Duration]) {
        let mut sorted = samples.to_vec();
        sorted.sort();
        self.row_ms(format!("{what}, p50"), percentile(&sorted, 0.50));
        self.row_ms(format!("{what}, p99"), percentile(&sorted, 0.99));
        self.row_ms(
            format!("{what}, max"),
            sorted.last().copied().unwrap_or_default(),
        );
        self.row(format!("{what}, samples"), sorted.len(), "count");
    }

    /// A line on the run, printed below the figures.
    pub fn note(&mut self, line: impl Into<String>) {
        self.notes.push(line.into());
    }

    /// The table as text.
    pub fn render(&self) -> String {
        let mut out = format!("== bench-{} ==\n", self.name);
        for line in &self.setup {
            out.push_str(&format!("# {line}\n"));
        }
        let header = ["what".to_owned(), "figure".to_owned(), "unit".to_owned()];
        let width = |column: usize| {
            self.rows
                .iter()
                .chain(std::iter::once(&header))
                .map(|row| row[column].chars().count())
                .max()
                .unwrap_or(0)
        };
        let (what, figure, unit) = (width(0), width(1), width(2));
        let line = |row: &[String; 3]| {
            format!(
                "| {:<what$} | {:>figure$} | {:<unit$} |\n",
                row[0], row[1], row[2]
            )
        };
        out.push_str(&line(&header));
        out.push_str(&format!(
            "|{}|{}:|{}|\n",
            "-".repeat(what + 2),
            "-".repeat(figure + 1),
            "-".repeat(unit + 2)
        ));
        for row in &self.rows {
            out.push_str(&line(row));
        }
        for note in &self.notes {
            out.push_str(&format!("# {note}\n"));
        }
        out
    }

    /// Prints the table on stdout.
    pub fn print(&self) {
        print!("{}", self.render());
    }
}

/// The `p` quantile (0 to 1) of `sorted` by the nearest-rank method; zero when empty.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Whether cargo runs the program as a benchmark (`cargo bench` passes `--bench`), and
/// the program's own arguments. Run any other way (`cargo test --benches`), a benchmark
/// says how to run it and measures nothing.
pub fn bench_args() -> Option<Vec<String>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !args.iter().any(|arg| arg == "--bench") {
        println!("not run: benchmarks run with `cargo bench` (see bench/README.md)");
        return None;
    }
    Some(args.into_iter().filter(|arg| arg != "--bench").collect())
}

/// Reads `argv` as `--name N` pairs into `counts` (each a flag and where its whole
/// number goes); an unknown flag, or a flag without a whole number, is an error naming it.
pub fn whole_number_flags(
    argv: &[String],
    counts: &mut [(&str, &mut usize)],
) -> Result<(), String> {
    let mut it = argv.iter();
    while let Some(flag) = it.next() {
        let Some((_, slot)) = counts.iter_mut().find(|(name, _)| name == flag) else {
            return Err(format!("unknown argument {flag}"));
        };
        **slot = it
            .next()
            .and_then(|value| value.parse().ok())
            .ok_or_else(|| format!("{flag} needs a whole number"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_take_whole_numbers_and_name_what_is_wrong() {
        let argv = |text: &str| text.split(' ').map(str::to_owned).collect::<Vec<_>>();
        let (mut nodes, mut rounds) = (1, 2);
        whole_number_flags(
            &argv("--nodes 30"),
            &mut [("--nodes", &mut nodes), ("--rounds", &mut rounds)],
        )
        .expect("valid");
        assert_eq!((nodes, rounds), (30, 2));
        let err = whole_number_flags(&argv("--nodes x"), &mut [("--nodes", &mut nodes)]);
        assert_eq!(err, Err("--nodes needs a whole number".to_owned()));
        let err = whole_number_flags(&argv("--sites 3"), &mut [("--nodes", &mut nodes)]);
        assert_eq!(err, Err("unknown argument --sites".to_owned()));
    }

    #[test]
    fn a_table_has_its_header_setup_rows_and_notes_in_that_order() {
        let mut table = Table::new("demo");
        table.setup("two proxies");
        table.row("requests/s", 1234, "req/s");
        table.row_ms("latency", Duration::from_micros(1500));
        table.note("quiet machine");
        assert_eq!(
            table.render(),
            "== bench-demo ==\n\
             # two proxies\n\
             | what       | figure | unit  |\n\
             |------------|-------:|-------|\n\
             | requests/s |   1234 | req/s |\n\
             | latency    |   1.50 | ms    |\n\
             # quiet machine\n"
        );
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let samples: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&samples, 0.50), Duration::from_millis(50));
        assert_eq!(percentile(&samples, 0.99), Duration::from_millis(99));
        assert_eq!(percentile(&[], 0.5), Duration::ZERO);
    }
}
