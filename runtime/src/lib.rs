//! What every Pimesh daemon shares: structured logs to the journal (stderr off a node),
//! `Type=notify` readiness, status and watchdog, shutdown on SIGTERM, the `/live` and
//! `/ready` health endpoints, giving freed heap back to the kernel, and the mechanisms
//! each daemon would otherwise write again: retry pauses ([`backoff`]), files reloaded when
//! they change ([`watched`]), the HTTP accept loop with its limits ([`serve`], [`per_source`]), JSON answers and bounded request
//! bodies ([`answer`]), the
//! command line's conventions ([`cli`]), atomic file replacement ([`atomic_file`]) and the
//! `process_*` metrics ([`process_metrics`]).

pub mod answer;
pub mod atomic_file;
pub mod backoff;
pub mod cli;
pub mod health;
pub mod logging;
pub mod memory;
pub mod notify;
pub mod per_source;
pub mod process_metrics;
pub mod serve;
pub mod watched;

/// `err` and its sources, joined by ": ": where clients such as reqwest and hyper put the
/// useful part (the TLS alert, the refused connection) of an error whose own message is
/// vague ("error sending request").
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Resolves on SIGTERM (systemd stopping the unit) or SIGINT (a terminal).
pub fn shutdown_signal() -> impl std::future::Future<Output = std::io::Result<()>> {
    use tokio::signal::unix::{signal, SignalKind};
    // The handlers are installed here, not when the future is first polled: a SIGTERM
    // that arrives before the caller's first await must not take the default action.
    let term = signal(SignalKind::terminate());
    let interrupt = signal(SignalKind::interrupt());
    async move {
        let (mut term, mut interrupt) = (term?, interrupt?);
        tokio::select! {
            _ = term.recv() => {}
            _ = interrupt.recv() => {}
        }
        Ok(())
    }
}

/// How many threads a daemon's runtime has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Threads {
    /// One thread: the node daemons, whose footprint matters most on a Pi.
    One,
    /// One per core: servers with many concurrent clients (cargo feature `multi-thread`).
    #[cfg(feature = "multi-thread")]
    PerCore,
}

/// Runs a daemon: installs logging, starts the async runtime, and drives `main` to the
/// end. A failure is logged, shown as the unit's status, and exits with status 1.
///
/// A panic anywhere in the daemon, on any thread or task, ends the process (systemd then
/// restarts it), whether it was built to unwind or to abort: a task that panicked never
/// leaves a daemon running without it.
pub fn run<F, E>(threads: Threads, main: F) -> std::process::ExitCode
where
    F: std::future::Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    logging::init();
    // Not in this crate's own tests, which call `run` inside the test harness's process.
    #[cfg(not(test))]
    end_process_on_panic();
    let runtime = match threads {
        Threads::One => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        #[cfg(feature = "multi-thread")]
        Threads::PerCore => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build(),
    };
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(err) => {
            tracing::error!(%err, "cannot start the async runtime");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(main) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(message) => {
            tracing::error!("{message}");
            notify::status(&format!("failed: {message}"));
            std::process::ExitCode::FAILURE
        }
    }
}

/// Makes every panic of this process fatal: the standard hook reports the message and
/// location on stderr (which systemd writes to the journal), then the process aborts.
/// Under `panic = "abort"` that is what happens anyway; under unwinding, tokio would
/// otherwise catch a task's panic and the daemon would go on without that task.
fn end_process_on_panic() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        std::process::abort();
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_takes_any_displayable_error_and_fails_with_it() {
        let code = |code: std::process::ExitCode| format!("{code:?}");
        let ok = run(Threads::One, async { Ok::<(), std::io::Error>(()) });
        assert_eq!(code(ok), code(std::process::ExitCode::SUCCESS));
        let typed = run(Threads::One, async {
            Err::<(), _>(std::io::Error::other("cannot listen"))
        });
        assert_eq!(code(typed), code(std::process::ExitCode::FAILURE));
        let boxed = run(Threads::One, async {
            Err::<(), Box<dyn std::error::Error + Send + Sync>>("no seed".into())
        });
        assert_eq!(code(boxed), code(std::process::ExitCode::FAILURE));
    }

    /// Set in the copy of this test binary that [`a_panicking_task_ends_the_daemon`] runs.
    const PANIC_CHILD: &str = "PIMESH_RUNTIME_TEST_PANIC_CHILD";

    #[test]
    fn a_panicking_task_ends_the_daemon() {
        if std::env::var_os(PANIC_CHILD).is_some() {
            // The daemon: a task panics while the main future goes on. Without the hook
            // (this test binary unwinds) tokio would catch the panic and the process would
            // live on, to exit 0 after the pause.
            end_process_on_panic();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            runtime.block_on(async {
                let _ = tokio::spawn(async { panic!("a key task failed") }).await;
                tokio::time::sleep(std::time::Duration::from_secs(30)).await;
            });
            std::process::exit(0);
        }
        let output = std::process::Command::new(std::env::current_exe().expect("test binary"))
            .args([
                "--exact",
                "tests::a_panicking_task_ends_the_daemon",
                "--nocapture",
            ])
            .env(PANIC_CHILD, "1")
            .output()
            .expect("run the test binary");
        let stderr = String::from_utf8_lossy(&output.stderr);
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            output.status.signal(),
            Some(libc::SIGABRT),
            "{:?}, stderr: {stderr}",
            output.status
        );
        assert!(stderr.contains("a key task failed"), "stderr: {stderr}");
    }
}
