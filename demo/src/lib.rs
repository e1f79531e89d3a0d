//! `pimesh-demo`: a Fleetman-style app for the mesh, one part per module (the binary has a
//! subcommand per part, see `demo/README.md`), and a small headless-Chromium driver
//! ([`browser`], [`check`]) that checks the page from outside.

pub mod browser;
pub mod check;
pub mod gateway;
pub mod mesh;
pub mod net;
pub use pimesh_meshstats as numbers;
pub mod position;
pub mod queue;
pub mod simulator;
pub mod staff;
pub mod trace;
pub mod tracker;
pub mod webapp;
pub mod ws;

/// The mesh's service names (as in `configs/cluster.example.toml`).
pub const WEBAPP: &str = "fleetman-webapp";
pub const GATEWAY: &str = "fleetman-api-gateway";
pub const TRACKER: &str = "fleetman-position-tracker";
pub const STAFF: &str = "fleetman-staff-service";
