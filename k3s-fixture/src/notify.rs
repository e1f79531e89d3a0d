//! systemd's readiness notification (`Type=notify`): `READY=1` once the fixture is up.
//! Nothing is sent when `NOTIFY_SOCKET` is absent.

use sd_notify::NotifyState;

/// Tells systemd the service is ready, with a status line.
pub fn ready(status: &str) {
    if let Err(err) = sd_notify::notify(&[NotifyState::Ready, NotifyState::Status(status)]) {
        crate::log::warn(&format!("cannot notify systemd: {err}"));
    }
}
