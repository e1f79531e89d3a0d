//! Giving freed heap memory back to the kernel.
//!
//! After a burst (a thousand connections or requests at once) the allocator keeps the
//! memory it freed for reuse: glibc returns only the free space at the top of its heap, so
//! a daemon's resident size stays at the burst's peak for as long as one live allocation
//! sits above the freed ones. On a Pi that is memory the other daemons and K3s lack.
//! [`spawn_trimmer`] asks glibc (`malloc_trim(0)`) at an interval to release every whole
//! free page of its arenas; the pages come back (as fresh zero pages) when they are used
//! again.
//!
//! Invariant: trimming never changes what is allocated, only which free pages stay
//! resident. Elsewhere than on glibc it does nothing.

use std::time::Duration;

/// How often a daemon trims: soon after a burst, rarely enough that pages released under a
/// steady load are not faulted back in all the time.
pub const TRIM_EVERY: Duration = Duration::from_secs(2);

/// Releases the free pages of every allocator arena now; returns whether any were released.
///
/// The workspace's one `unsafe` block: an FFI call into glibc.
#[allow(unsafe_code)]
pub fn trim() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim takes no pointer and is thread-safe: it takes each arena's
        // lock while it walks that arena's free chunks.
        unsafe { libc::malloc_trim(0) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Trims every `every` for the life of the runtime.
pub fn spawn_trimmer(every: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            trim();
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The resident size of this process in KiB.
    fn rss_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn freed_pages_below_a_live_allocation_are_given_back() {
        // 16 MiB in small blocks, each touched, then one block kept at the top of the
        // heap so that the ones below cannot be returned by shrinking the heap.
        let mut blocks: Vec<Vec<u8>> = (0..4096).map(|_| vec![1u8; 4096]).collect();
        let keep = vec![1u8; 4096];
        let before_free = rss_kib();
        blocks.clear();
        blocks.shrink_to_fit();
        let after_free = rss_kib();
        trim();
        let after_trim = rss_kib();
        assert!(
            after_trim + 8 * 1024 < after_free,
            "trimming gives back the freed 16 MiB: {before_free} KiB with the blocks, \
             {after_free} KiB freed, {after_trim} KiB trimmed"
        );
        drop(keep);
    }
}
