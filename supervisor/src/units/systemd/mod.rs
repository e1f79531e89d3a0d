//! The supervisor's connection to systemd over the system D-Bus: unit control, unit
//! properties, and the signals that report their changes.
//!
//! A [`Systemd`] is one connection. When the bus goes away (D-Bus restarted) its streams
//! end and its calls fail; the caller drops it and connects again with
//! [`Systemd::connect`], which subscribes afresh.

mod proxies;

use std::time::Duration;

use futures_util::StreamExt as _;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use zbus::fdo::PropertiesProxy;
use zbus::proxy::CacheProperties;
use zbus::zvariant::OwnedObjectPath;
use zbus::Connection;

use crate::units::heal::UnitState;
pub use proxies::{ManagerProxy, ServiceProxy, UnitProxy};

/// Every D-Bus call gives up after this long: a stuck bus must not stall the event loop.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether `err` is systemd's own answer to a call (it refused the job: nothing was
/// queued), rather than a call whose fate is unknown (the bus lost, the call timed out).
pub fn refused(err: &zbus::Error) -> bool {
    matches!(err, zbus::Error::MethodError(..) | zbus::Error::FDO(_))
}

/// What the watchers report to the event loop.
#[derive(Debug)]
pub enum BusEvent {
    /// A property of the managed unit at this index changed (read it again).
    UnitChanged(usize),
    /// A job of `unit` finished with `result`.
    JobRemoved { unit: String, result: String },
    /// A signal stream ended: the connection is gone.
    Lost(&'static str),
}

/// One connection to systemd, subscribed to its signals.
pub struct Systemd {
    connection: Connection,
    manager: ManagerProxy<'static>,
}

impl Systemd {
    /// Connects to the system bus and subscribes to systemd's signals.
    pub async fn connect() -> zbus::Result<Systemd> {
        let systemd = Systemd::connect_unsubscribed().await?;
        systemd.manager.subscribe().await?;
        Ok(systemd)
    }

    /// Connects to the system bus for method calls only (no signals are sent to it).
    pub async fn connect_unsubscribed() -> zbus::Result<Systemd> {
        let connection = zbus::connection::Builder::system()?
            .method_timeout(CALL_TIMEOUT)
            .build()
            .await?;
        let manager = ManagerProxy::builder(&connection)
            .cache_properties(CacheProperties::No)
            .build()
            .await?;
        Ok(Systemd {
            connection,
            manager,
        })
    }

    /// Restarts `unit` if it is running (`TryRestartUnit`), over a connection of its own:
    /// for a restart outside the keeper (a unit whose start-time input changed).
    pub async fn try_restart(unit: &str) -> zbus::Result<()> {
        Systemd::connect_unsubscribed()
            .await?
            .manager()
            .try_restart_unit(unit, "replace")
            .await
            .map(drop)
    }

    pub fn manager(&self) -> &ManagerProxy<'static> {
        &self.manager
    }

    /// The unit's object path, loading the unit if needed.
    pub async fn load_unit(&self, name: &str) -> zbus::Result<OwnedObjectPath> {
        self.manager.load_unit(name).await
    }

    /// The unit's object path and state when systemd has it loaded; `None` for a unit
    /// that does not exist (its `LoadState` is `not-found` or similar).
    pub async fn loaded_unit(
        &self,
        name: &str,
    ) -> zbus::Result<Option<(OwnedObjectPath, UnitState)>> {
        let path = self.load_unit(name).await?;
        let state = self.read_state(&path).await?;
        Ok((state.load_state == "loaded").then_some((path, state)))
    }

    /// Reads the unit's properties afresh. `Service` properties are read only for a unit
    /// that is loaded (a missing unit has none).
    pub async fn read_state(&self, path: &OwnedObjectPath) -> zbus::Result<UnitState> {
        let unit = UnitProxy::builder(&self.connection)
            .path(path.clone())?
            .cache_properties(CacheProperties::No)
            .build()
            .await?;
        let mut state = UnitState {
            load_state: unit.load_state().await?,
            active_state: unit.active_state().await?,
            sub_state: unit.sub_state().await?,
            ..UnitState::default()
        };
        if state.load_state == "loaded" {
            let service = ServiceProxy::builder(&self.connection)
                .path(path.clone())?
                .cache_properties(CacheProperties::No)
                .build()
                .await?;
            state.result = service.result().await?;
            state.n_restarts = service.n_restarts().await?;
            state.main_pid = service.main_pid().await?;
            state.exec_main_status = service.exec_main_status().await?;
        }
        Ok(state)
    }

    /// Starts tasks (in `watchers`) that turn systemd's signals into [`BusEvent`]s:
    /// `PropertiesChanged` of each `(index, path)` in `units`, and `JobRemoved`.
    pub async fn watch(
        &self,
        units: &[(usize, OwnedObjectPath)],
        events: &mpsc::UnboundedSender<BusEvent>,
        watchers: &mut JoinSet<()>,
    ) -> zbus::Result<()> {
        let mut jobs = self.manager.receive_job_removed().await?;
        let sender = events.clone();
        watchers.spawn(async move {
            while let Some(signal) = jobs.next().await {
                if let Ok(args) = signal.args() {
                    let event = BusEvent::JobRemoved {
                        unit: args.unit().to_string(),
                        result: args.result().to_string(),
                    };
                    if sender.send(event).is_err() {
                        return;
                    }
                }
            }
            let _ = sender.send(BusEvent::Lost("JobRemoved stream ended"));
        });
        for (index, path) in units.iter().cloned() {
            let properties = PropertiesProxy::builder(&self.connection)
                .destination("org.freedesktop.systemd1")?
                .path(path)?
                .cache_properties(CacheProperties::No)
                .build()
                .await?;
            let mut changes = properties.receive_properties_changed().await?;
            let sender = events.clone();
            watchers.spawn(async move {
                while changes.next().await.is_some() {
                    if sender.send(BusEvent::UnitChanged(index)).is_err() {
                        return;
                    }
                }
                let _ = sender.send(BusEvent::Lost("PropertiesChanged stream ended"));
            });
        }
        Ok(())
    }
}
