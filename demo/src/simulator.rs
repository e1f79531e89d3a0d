//! `fleetman-position-simulator`: moves vehicles along fixed routes around Sheffield and
//! publishes each one's position every 500 ms to `fleetman-queue`, as JSON lines over a
//! raw TCP connection to the queue's local port on the mesh proxy (the proxy carries it to
//! the queue's node in a tunnel).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;
use tracing::{info, warn};

use crate::net::Shutdown;
use crate::position::Position;

pub const TICK: Duration = Duration::from_millis(500);

/// Closed routes (lat, lon): each vehicle drives its route round and round.
const ROUTES: [&[(f64, f64)]; 4] = [
    // City centre loop.
    &[
        (53.3811, -1.4701),
        (53.3840, -1.4620),
        (53.3790, -1.4560),
        (53.3745, -1.4650),
        (53.3770, -1.4740),
    ],
    // Out to Hillsborough and back.
    &[
        (53.3830, -1.4750),
        (53.3920, -1.4900),
        (53.4030, -1.5000),
        (53.3960, -1.5080),
        (53.3860, -1.4880),
    ],
    // The Parkway east.
    &[
        (53.3790, -1.4560),
        (53.3800, -1.4300),
        (53.3750, -1.3980),
        (53.3680, -1.4150),
        (53.3720, -1.4420),
    ],
    // South to Meadowhead.
    &[
        (53.3740, -1.4700),
        (53.3600, -1.4780),
        (53.3450, -1.4800),
        (53.3380, -1.4680),
        (53.3560, -1.4600),
    ],
];

/// How far a vehicle goes per tick, in route segments.
const STEP: f64 = 0.025;

/// One simulated vehicle.
#[derive(Debug, Clone)]
pub struct Vehicle {
    pub name: String,
    route: &'static [(f64, f64)],
    /// Position along the route in segments, `0 ≤ progress < route.len()`.
    progress: f64,
    step: f64,
}

impl Vehicle {
    /// The `i`-th of the fleet: routes are shared round-robin, each vehicle starting at
    /// its own place and speed.
    pub fn nth(i: usize) -> Vehicle {
        let route = ROUTES[i % ROUTES.len()];
        let lap = route.len() as f64;
        let spread = (i / ROUTES.len()) as f64;
        Vehicle {
            name: format!("truck-{:02}", i + 1),
            route,
            progress: (spread * 2.3 + i as f64 * 0.7) % lap,
            step: STEP * (1.0 + (i % 3) as f64 * 0.3),
        }
    }

    /// Where it is now.
    pub fn position(&self, at: u64) -> Position {
        let n = self.route.len();
        let segment = (self.progress.floor() as usize) % n;
        let t = self.progress - self.progress.floor();
        let (a, b) = (self.route[segment], self.route[(segment + 1) % n]);
        // ~70 km per degree of latitude here; 1 km per degree-ish is not needed: an estimate.
        let km_per_tick = ((b.0 - a.0).powi(2) + (b.1 - a.1).powi(2)).sqrt() * 90.0 * self.step;
        Position {
            vehicle: self.name.clone(),
            lat: a.0 + (b.0 - a.0) * t,
            lon: a.1 + (b.1 - a.1) * t,
            at,
            speed_kmh: (km_per_tick * 3600.0 / TICK.as_secs_f64() * 100.0).round() / 100.0,
        }
    }

    pub fn advance(&mut self) {
        self.progress = (self.progress + self.step) % self.route.len() as f64;
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Publishes `count` vehicles to the queue at `queue` (the proxy's local port for
/// `fleetman-queue`) until shutdown, reconnecting with backoff.
pub async fn run(queue: String, count: usize, mut shutdown: Shutdown) {
    let mut fleet: Vec<Vehicle> = (0..count).map(Vehicle::nth).collect();
    let mut backoff = Duration::from_millis(250);
    while !shutdown.is_set() {
        match publish(&queue, &mut fleet, &mut shutdown).await {
            Ok(()) => return,
            Err(err) => {
                warn!("fleetman-queue at {queue} (the mesh proxy's local port): {err}; retrying in {backoff:?}");
                if !shutdown.sleep(backoff).await {
                    return;
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

async fn publish(
    queue: &str,
    fleet: &mut [Vehicle],
    shutdown: &mut Shutdown,
) -> Result<(), String> {
    let mut stream = TcpStream::connect(queue)
        .await
        .map_err(|err| format!("connect: {err}"))?;
    let _ = stream.set_nodelay(true);
    stream
        .write_all(b"PUB\n")
        .await
        .map_err(|err| format!("write: {err}"))?;
    info!(
        "publishing {} vehicles to fleetman-queue at {queue}",
        fleet.len()
    );
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.wait() => return Ok(()),
        }
        let at = now_ms();
        let mut batch = Vec::new();
        for vehicle in fleet.iter_mut() {
            let position = vehicle.position(at);
            serde_json::to_writer(&mut batch, &position).map_err(|err| err.to_string())?;
            batch.push(b'\n');
            vehicle.advance();
        }
        tokio::time::timeout(Duration::from_secs(5), stream.write_all(&batch))
            .await
            .map_err(|_| "the queue took no data for 5 s".to_owned())?
            .map_err(|err| format!("write: {err}"))?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vehicles_move_along_their_routes_and_stay_in_town() {
        let mut fleet: Vec<Vehicle> = (0..8).map(Vehicle::nth).collect();
        let names: std::collections::BTreeSet<_> = fleet.iter().map(|v| v.name.clone()).collect();
        assert_eq!(names.len(), 8);
        for vehicle in &mut fleet {
            let before = vehicle.position(0);
            for _ in 0..1000 {
                vehicle.advance();
                let p = vehicle.position(0);
                assert!(
                    (53.3..53.45).contains(&p.lat) && (-1.55..-1.35).contains(&p.lon),
                    "{p:?}"
                );
            }
            vehicle.advance();
            assert_ne!(before, vehicle.position(0), "{} moved", vehicle.name);
        }
    }
}
