//! A small client of the Kubernetes API, as K3s serves it on a node, for the few reads
//! Pimesh makes: K3s's readiness, its Nodes, and the Services and EndpointSlices the mesh
//! carries.
//!
//! - [`kubeconfig`]: a kubeconfig read as an HTTPS client (its CA, its client identity);
//! - [`objects`]: the fields of Namespaces, Services and EndpointSlices that Pimesh uses,
//!   typed, everything else ignored;
//! - [`lease`]: one Lease as a lock (the only writes).
//!
//! Not a general client: no watches. Callers list and compare.

pub mod kubeconfig;
pub mod lease;
pub mod objects;

pub use kubeconfig::{ApiError, KubeClient, KubeconfigError};
pub use lease::{release, try_acquire, LeaseOutcome};
