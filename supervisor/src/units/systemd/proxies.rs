//! Typed D-Bus proxies for the parts of systemd's API the supervisor uses
//! (`org.freedesktop.systemd1(5)`). Property names that do not follow D-Bus' usual
//! capitalisation (`MainPID`, `NRestarts`) are spelled out.

use zbus::zvariant::{ObjectPath, OwnedObjectPath};

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Manager",
    default_service = "org.freedesktop.systemd1",
    default_path = "/org/freedesktop/systemd1",
    gen_blocking = false
)]
pub trait Manager {
    /// Enqueues a start job; returns the job's object path.
    fn start_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;

    fn stop_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;

    fn restart_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;

    /// Restarts the unit if it runs; does nothing otherwise.
    fn try_restart_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;

    /// Asks the unit to reload its configuration (`ExecReload=`).
    fn reload_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;

    /// Clears the failed state and the start rate limit counter.
    fn reset_failed_unit(&self, name: &str) -> zbus::Result<()>;

    /// The object path of a loaded unit; fails for a unit not loaded.
    fn get_unit(&self, name: &str) -> zbus::Result<OwnedObjectPath>;

    /// Loads the unit if needed and returns its object path (also for a unit that has no
    /// unit file: its `LoadState` is then `not-found`).
    fn load_unit(&self, name: &str) -> zbus::Result<OwnedObjectPath>;

    /// Creates and starts a transient unit `name` with the settings `properties` (a unit
    /// file's keys, e.g. `What`, `ExecStart`); it lives until it stops or the node
    /// reboots. `aux`: further transient units started with it. Returns the start job.
    fn start_transient_unit(
        &self,
        name: &str,
        mode: &str,
        properties: &[(&str, zbus::zvariant::Value<'_>)],
        aux: &[(&str, Vec<(&str, zbus::zvariant::Value<'_>)>)],
    ) -> zbus::Result<OwnedObjectPath>;

    /// Asks systemd to emit unit and job signals to this connection.
    fn subscribe(&self) -> zbus::Result<()>;

    /// A job finished; `result` is `done`, `canceled`, `timeout`, `failed`, `dependency`
    /// or `skipped`.
    #[zbus(signal)]
    fn job_removed(
        &self,
        id: u32,
        job: ObjectPath<'_>,
        unit: &str,
        result: &str,
    ) -> zbus::Result<()>;
}

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Unit",
    default_service = "org.freedesktop.systemd1",
    gen_blocking = false
)]
pub trait Unit {
    #[zbus(property)]
    fn load_state(&self) -> zbus::Result<String>;

    #[zbus(property)]
    fn active_state(&self) -> zbus::Result<String>;

    #[zbus(property)]
    fn sub_state(&self) -> zbus::Result<String>;
}

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Service",
    default_service = "org.freedesktop.systemd1",
    gen_blocking = false
)]
pub trait Service {
    #[zbus(property)]
    fn result(&self) -> zbus::Result<String>;

    #[zbus(property, name = "NRestarts")]
    fn n_restarts(&self) -> zbus::Result<u32>;

    #[zbus(property, name = "MainPID")]
    fn main_pid(&self) -> zbus::Result<u32>;

    #[zbus(property)]
    fn exec_main_status(&self) -> zbus::Result<i32>;
}
