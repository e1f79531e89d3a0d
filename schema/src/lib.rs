//! Typed Pimesh configuration files.
//!
//! Every file Pimesh reads is TOML decoded into the types of this crate with unknown keys
//! refused. Every failure is a [`ConfigError`] that names the file, the line and column,
//! the key, and what was expected, so that an operator can fix a file on an SD card
//! without reading source code.

pub mod cluster;
mod error;
pub mod kube_services;
mod load;
mod names;
mod position;
pub mod routes;
pub mod seed;
mod spiffe;
pub mod supervisor;

pub use error::{ConfigError, ValueError};
pub use load::parse_toml;
pub use names::{DnsLabel, NameError};
pub use seed::{
    Central, DatastoreChoice, InterfaceName, JoinToken, PemCertificates, Role, Seed, SeedK3s,
    SigningKey, SshPublicKey,
};
pub use spiffe::{SpiffeId, Workload};
pub use supervisor::{
    HealSettings, ManagedUnit, OtaSettings, ProbeUrl, SupervisorConfig, UnitName,
};
