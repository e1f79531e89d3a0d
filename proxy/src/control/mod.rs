//! The proxy's clients of the control replicas (`--control`): the workload identity they
//! sign for the node and renew (`enroll`), and the site config they stream with live node
//! addresses (`discovery`). Both talk mutual TLS with the identity in use, fail over from
//! replica to replica of one live set (`replicas`: the start list and every server's
//! replicas the discovery documents list), and keep what they last received under
//! `--state-dir`, so that a proxy serves with every replica down.

pub mod discovery;
pub mod enroll;
pub mod replicas;
