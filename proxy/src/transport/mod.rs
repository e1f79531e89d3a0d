//! How bytes reach and leave the proxy, whatever the service: the listeners and their
//! accept loops (`listeners`), the pooled mTLS HTTP/2 connections to other nodes' proxies
//! (`peers`), the protocol a client speaks (`detect`), the destination of an intercepted
//! connection (`original_dst`), the budget of inbound TLS handshakes in progress
//! (`handshakes`), opaque streams copied both ways (`splice`), upgraded HTTP connections
//! copied both ways with bounded buffers (`upgraded`), the HTTP
//! conventions of the mesh's own hops (`mesh_http`), the graceful end of every
//! connection on SIGTERM (`drain`), and the connections' metrics (`metrics`).

pub mod detect;
pub mod drain;
pub mod handshakes;
pub mod listeners;
pub mod mesh_http;
pub mod metrics;
pub mod original_dst;
pub mod peers;
pub mod splice;
pub mod upgraded;
