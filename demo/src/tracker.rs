//! `fleetman-position-tracker`: consumes `fleetman-queue` (through the mesh proxy's local
//! port), keeps each vehicle's latest position and a short history, and serves them:
//! `GET /vehicles` (JSON) and `GET /vehicles/ws` (a WebSocket pushing positions as they
//! arrive, each message a JSON array of positions; the first one all vehicles).

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde::Serialize;
use tokio::io::{AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;
use tokio::sync::broadcast;
use tokio_tungstenite::tungstenite::Message;
use tracing::{debug, info, warn};

use crate::net::{self, Body, Shutdown};
use crate::position::Position;
use crate::queue::{read_line, MAX_LINE};
use crate::ws;

/// Positions kept per vehicle.
pub const HISTORY: usize = 20;
/// Vehicles kept at most; positions of others are dropped.
pub const MAX_VEHICLES: usize = 1000;

#[derive(Debug, Serialize, Clone)]
pub struct Vehicle {
    #[serde(flatten)]
    pub latest: Position,
    /// Earlier positions, oldest first, as `[lat, lon]`.
    pub history: VecDeque<[f64; 2]>,
}

pub struct Tracker {
    vehicles: Mutex<BTreeMap<String, Vehicle>>,
    updates: broadcast::Sender<Position>,
    shutdown: Shutdown,
}

impl Tracker {
    pub fn new(shutdown: Shutdown) -> Arc<Tracker> {
        Arc::new(Tracker {
            vehicles: Mutex::new(BTreeMap::new()),
            updates: broadcast::channel(256).0,
            shutdown,
        })
    }

    fn vehicles(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Vehicle>> {
        self.vehicles
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn record(&self, position: Position) {
        {
            let mut vehicles = self.vehicles();
            let full = vehicles.len() >= MAX_VEHICLES;
            match vehicles.get_mut(&position.vehicle) {
                Some(vehicle) => {
                    if vehicle.history.len() >= HISTORY {
                        vehicle.history.pop_front();
                    }
                    vehicle
                        .history
                        .push_back([vehicle.latest.lat, vehicle.latest.lon]);
                    vehicle.latest = position.clone();
                }
                None if full => {
                    debug!(
                        "{MAX_VEHICLES} vehicles tracked already: {} dropped",
                        position.vehicle
                    );
                    return;
                }
                None => {
                    vehicles.insert(
                        position.vehicle.clone(),
                        Vehicle {
                            latest: position.clone(),
                            history: VecDeque::new(),
                        },
                    );
                }
            }
        }
        let _ = self.updates.send(position);
    }

    pub fn snapshot(&self) -> Vec<Vehicle> {
        self.vehicles().values().cloned().collect()
    }

    pub async fn handle(self: Arc<Self>, request: Request<Incoming>) -> Response<Body> {
        if request.method() != Method::GET {
            return net::error(StatusCode::METHOD_NOT_ALLOWED, "only GET is served");
        }
        match request.uri().path() {
            "/vehicles" => net::json(StatusCode::OK, &self.snapshot()),
            "/vehicles/ws" => {
                let tracker = Arc::clone(&self);
                ws::accept(request, move |socket| tracker.push(socket))
            }
            "/healthz" => net::respond(StatusCode::OK, "text/plain", "ok\n"),
            other => net::not_found(other),
        }
    }

    /// Sends all vehicles, then each position as it arrives, until the client leaves.
    async fn push(self: Arc<Self>, mut socket: ws::ServerSocket) {
        let mut updates = self.updates.subscribe();
        let mut shutdown = self.shutdown.clone();
        let first: Vec<Position> = self.snapshot().into_iter().map(|v| v.latest).collect();
        if send_json(&mut socket, &first).await.is_err() {
            return;
        }
        loop {
            tokio::select! {
                update = updates.recv() => {
                    let batch = match update {
                        Ok(position) => vec![position],
                        // Behind: send everything as it is now rather than what was missed.
                        Err(broadcast::error::RecvError::Lagged(_)) => {
                            self.snapshot().into_iter().map(|v| v.latest).collect()
                        }
                        Err(broadcast::error::RecvError::Closed) => return,
                    };
                    if send_json(&mut socket, &batch).await.is_err() {
                        return;
                    }
                }
                message = socket.next() => match message {
                    Some(Ok(Message::Close(_)) | Err(_)) | None => return,
                    Some(Ok(_)) => {}
                },
                () = shutdown.wait() => {
                    let _ = socket.close(None).await;
                    return;
                }
            }
        }
    }
}

async fn send_json(socket: &mut ws::ServerSocket, value: &impl Serialize) -> Result<(), ()> {
    let text = serde_json::to_string(value).map_err(|_| ())?;
    tokio::time::timeout(Duration::from_secs(5), socket.send(Message::text(text)))
        .await
        .map_err(|_| ())?
        .map_err(|_| ())
}

/// Subscribes to the queue at `queue` (the proxy's local port for `fleetman-queue`) and
/// records every position until shutdown, reconnecting with backoff.
pub async fn consume(tracker: Arc<Tracker>, queue: String) {
    let mut shutdown = tracker.shutdown.clone();
    let mut backoff = Duration::from_millis(250);
    while !shutdown.is_set() {
        let err = match subscribe(&tracker, &queue, &mut shutdown).await {
            Ok(received) if received > 0 => {
                backoff = Duration::from_millis(250);
                "the connection closed".to_owned()
            }
            Ok(_) => "the connection closed before any message".to_owned(),
            Err(err) => err,
        };
        if shutdown.is_set() {
            return;
        }
        warn!("fleetman-queue at {queue} (the mesh proxy's local port): {err}; reconnecting in {backoff:?}");
        if !shutdown.sleep(backoff).await {
            return;
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

async fn subscribe(tracker: &Tracker, queue: &str, shutdown: &mut Shutdown) -> Result<u64, String> {
    let mut stream = TcpStream::connect(queue)
        .await
        .map_err(|err| format!("connect: {err}"))?;
    stream
        .write_all(b"SUB\n")
        .await
        .map_err(|err| format!("write: {err}"))?;
    info!("subscribed to fleetman-queue at {queue}");
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    let mut received = 0u64;
    loop {
        tokio::select! {
            read = read_line(&mut reader, &mut line, MAX_LINE) => {
                if read?.is_none() {
                    return Ok(received);
                }
                match Position::parse(&line) {
                    Ok(position) => {
                        received += 1;
                        tracker.record(position);
                    }
                    Err(err) => debug!("a message from fleetman-queue skipped: {err}"),
                }
            }
            () = shutdown.wait() => return Ok(received),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn keeps_the_latest_position_and_a_bounded_history() {
        let (_stop, shutdown) = Shutdown::manual();
        let tracker = Tracker::new(shutdown);
        for i in 0..50u32 {
            tracker.record(Position {
                vehicle: "truck-01".into(),
                lat: 53.0 + f64::from(i) / 1000.0,
                lon: -1.4,
                at: u64::from(i),
                speed_kmh: 0.0,
            });
        }
        let vehicles = tracker.snapshot();
        assert_eq!(vehicles.len(), 1);
        assert_eq!(vehicles[0].latest.at, 49);
        assert_eq!(vehicles[0].history.len(), HISTORY);
        let json = serde_json::to_value(&vehicles[0]).unwrap();
        assert_eq!(json["vehicle"], "truck-01");
        assert!(json["history"].is_array());
    }
}
