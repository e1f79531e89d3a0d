//! The watchdog over systemd's real notification protocol (a datagram socket named by
//! `NOTIFY_SOCKET`, the interval in `WATCHDOG_USEC`): pings arrive while every key task
//! beats, and stop while one of them does not. One test in its own process: the protocol
//! is configured by environment variables, which are process-wide.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers fail loudly

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use pimesh_runtime::notify::{spawn_watchdog_fed_by, Heartbeat};

/// The watchdog pings received within `window`.
fn pings_within(socket: &UnixDatagram, window: Duration) -> usize {
    let deadline = Instant::now() + window;
    let mut pings = 0;
    let mut buffer = [0u8; 256];
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        socket
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .expect("timeout");
        match socket.recv(&mut buffer) {
            Ok(len) if buffer[..len].starts_with(b"WATCHDOG=1") => pings += 1,
            Ok(_) => {}
            Err(_) => break,
        }
    }
    pings
}

#[test]
fn pings_stop_while_one_key_task_is_stuck_and_resume_when_it_beats_again() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("notify");
    let socket = UnixDatagram::bind(&path).expect("bind");
    std::env::set_var("NOTIFY_SOCKET", &path);
    // 800 ms: a task is stuck once it has not beaten for 400 ms; pings every 200 ms.
    std::env::set_var("WATCHDOG_USEC", "800000");
    std::env::remove_var("WATCHDOG_PID");

    let beating = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    {
        let beating = std::sync::Arc::clone(&beating);
        // The daemons' runtime: one thread, the watchdog a task beside the key tasks.
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                let (turning, stuck) = (Heartbeat::new(), Heartbeat::new());
                let _watchdog = spawn_watchdog_fed_by(vec![
                    ("turning", std::sync::Arc::clone(&turning)),
                    ("stuck", std::sync::Arc::clone(&stuck)),
                ])
                .expect("a watchdog is set");
                loop {
                    turning.beat();
                    if beating.load(std::sync::atomic::Ordering::Relaxed) {
                        stuck.beat();
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            });
        });
    }
    assert!(
        pings_within(&socket, Duration::from_secs(2)) >= 3,
        "pings while every task beats"
    );
    beating.store(false, std::sync::atomic::Ordering::Relaxed);
    // The pings already due may still arrive while the task's silence is younger than
    // half the interval; after that, none.
    pings_within(&socket, Duration::from_millis(600));
    assert_eq!(
        pings_within(&socket, Duration::from_secs(2)),
        0,
        "no ping while a key task is stuck (the runtime and its timers still run)"
    );
    beating.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(
        pings_within(&socket, Duration::from_secs(2)) >= 3,
        "pings again once it beats"
    );
}
