//! The `process_*` metrics every Prometheus client library exports, under the names the
//! Go and Java clients give them, read from `/proc/self` on each scrape:
//! `process_cpu_seconds_total`, `process_resident_memory_bytes`,
//! `process_virtual_memory_bytes`, `process_open_fds`, `process_max_fds` and
//! `process_start_time_seconds`.
//!
//! Invariant: a value that cannot be read (no `/proc`, an unexpected format) is left out
//! of the scrape rather than reported as 0.

use std::fmt;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

/// Register with `registry.register_collector(Box::new(ProcessCollector))`.
#[derive(Debug, Default, Clone, Copy)]
pub struct ProcessCollector;

/// What one scrape read.
#[derive(Debug, Default, PartialEq)]
struct Reading {
    cpu_seconds: Option<f64>,
    resident_bytes: Option<i64>,
    virtual_bytes: Option<i64>,
    open_fds: Option<i64>,
    max_fds: Option<i64>,
    start_time_seconds: Option<f64>,
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let reading = read();
        if let Some(seconds) = reading.cpu_seconds {
            let counter = ConstCounter::new(seconds);
            counter.encode(encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds",
                None,
                counter.metric_type(),
            )?)?;
        }
        let gauges: [(&str, &str, Option<i64>); 4] = [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                reading.resident_bytes,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                reading.virtual_bytes,
            ),
            (
                "process_open_fds",
                "Number of open file descriptors",
                reading.open_fds,
            ),
            (
                "process_max_fds",
                "Maximum number of open file descriptors",
                reading.max_fds,
            ),
        ];
        for (name, help, value) in gauges {
            if let Some(value) = value {
                let gauge = ConstGauge::new(value);
                gauge.encode(encoder.encode_descriptor(
                    name,
                    help,
                    None,
                    gauge.metric_type(),
                )?)?;
            }
        }
        if let Some(start) = reading.start_time_seconds {
            let gauge = ConstGauge::new(start);
            gauge.encode(encoder.encode_descriptor(
                "process_start_time_seconds",
                "Start time of the process since the Unix epoch in seconds",
                None,
                gauge.metric_type(),
            )?)?;
        }
        Ok(())
    }
}

fn read() -> Reading {
    use nix::unistd::{sysconf, SysconfVar};
    let ticks = sysconf(SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .filter(|t| *t > 0);
    let page = sysconf(SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .filter(|p| *p > 0);
    let boot_time = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|text| boot_time(&text));
    let mut reading = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .map(|text| from_stat(&text, ticks, page, boot_time))
        .unwrap_or_default();
    reading.open_fds = std::fs::read_dir("/proc/self/fd")
        .ok()
        .map(|entries| i64::try_from(entries.count()).unwrap_or(i64::MAX));
    reading.max_fds = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .ok()
        .map(|(soft, _)| i64::try_from(soft).unwrap_or(i64::MAX));
    reading
}

/// `btime` of `/proc/stat`: when the system booted, in seconds since the Unix epoch.
fn boot_time(stat: &str) -> Option<u64> {
    stat.lines()
        .find_map(|line| line.strip_prefix("btime "))
        .and_then(|value| value.trim().parse().ok())
}

/// The values of `/proc/self/stat` (see proc(5)): the fields after the command name,
/// which may itself hold spaces and parentheses, so the split is after its last `)`.
fn from_stat(stat: &str, ticks: Option<i64>, page: Option<i64>, boot: Option<u64>) -> Reading {
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return Reading::default();
    };
    // `rest` starts with field 3 (state): field n is at index n - 3.
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let number = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
    #[allow(clippy::cast_precision_loss)] // clock ticks: far below 2^52
    let seconds = |value: u64| ticks.map(|t| value as f64 / t as f64);
    Reading {
        cpu_seconds: number(14)
            .zip(number(15))
            .and_then(|(user, system)| seconds(user + system)),
        start_time_seconds: number(22)
            .and_then(seconds)
            .zip(boot)
            .map(|(since_boot, boot)| since_boot + u64_to_f64(boot)),
        virtual_bytes: number(23).and_then(|v| i64::try_from(v).ok()),
        resident_bytes: number(24)
            .zip(page)
            .and_then(|(pages, page)| i64::try_from(pages).ok()?.checked_mul(page)),
        ..Reading::default()
    }
}

#[allow(clippy::cast_precision_loss)] // seconds since the epoch: far below 2^52
fn u64_to_f64(value: u64) -> f64 {
    value as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::registry::Registry;

    #[test]
    fn stat_fields_are_read_after_the_command_name() {
        // A command name with a space and a parenthesis, as proc(5) allows.
        let stat = "4242 (pimesh (x) y) S 1 4242 4242 0 -1 4194560 900 0 0 0 \
                    150 50 0 0 20 0 3 0 1000 123456789 2000 18446744073709551615";
        let reading = from_stat(stat, Some(100), Some(4096), Some(1_800_000_000));
        assert_eq!(reading.cpu_seconds, Some(2.0));
        assert_eq!(reading.start_time_seconds, Some(1_800_000_010.0));
        assert_eq!(reading.virtual_bytes, Some(123_456_789));
        assert_eq!(reading.resident_bytes, Some(2000 * 4096));
        assert_eq!(
            from_stat("garbage", Some(100), None, None),
            Reading::default()
        );
        assert_eq!(
            boot_time("cpu 1 2\nbtime 1800000000\n"),
            Some(1_800_000_000)
        );
    }

    #[test]
    fn a_scrape_of_this_process_has_every_process_metric() {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(ProcessCollector));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        for name in [
            "process_cpu_seconds_total ",
            "process_resident_memory_bytes ",
            "process_virtual_memory_bytes ",
            "process_open_fds ",
            "process_max_fds ",
            "process_start_time_seconds ",
        ] {
            assert!(text.contains(&format!("\n{name}")), "{name}: {text}");
        }
    }
}
