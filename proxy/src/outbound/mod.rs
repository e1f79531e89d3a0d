//! The outbound side: connections from local apps — through the HTTP proxy port (routed
//! by authority), a service's local port, or transparently redirected by iptables — sent
//! on to the node that runs the chosen service, over a pooled mTLS HTTP/2 connection to
//! that node's proxy.
//!
//! Per HTTP request, in order: route (unknown service → 503), split (weighted backend),
//! faults (delay, then abort), trace context, endpoint choice (power of two choices over
//! peak-EWMA latency), send with the service's timeout (→ 504), retries of connect
//! failures and of failed idempotent bodyless requests within the retry budget, and a
//! 502 naming the peer when the node cannot be reached. Opaque TCP rides a CONNECT stream,
//! an upgrade (WebSocket) an extended CONNECT stream.
//!
//! - `requests`: HTTP/1 and HTTP/2 from a client, request by request;
//! - `faults`: the delays and aborts a service's config injects;
//! - `tunnel`: opaque TCP to a service, and intercepted connections to anything else;
//! - `upgrade`: HTTP/1.1 upgrades (WebSocket) and HTTP/2 extended CONNECTs, carried as
//!   extended CONNECTs to the node and copied both ways once the app switched protocols;
//! - `balance`: which endpoint of a service takes a request or connection;
//! - `budget`: how many retries the requests of a service allow;
//! - `metrics`: splits, faults and retries, counted.

pub mod balance;
pub mod budget;
mod faults;
pub mod metrics;
mod requests;
mod tunnel;
mod upgrade;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;
use pimesh_schema::cluster::Protocol;
use tokio::net::TcpStream;

use crate::context::{Admitted, Context};
use crate::transport::detect::{detect, Detected};
use crate::transport::drain;
use requests::serve_http;
use tunnel::{passthrough, tunnel};

/// How long a client connection may stay silent before an `auto` service treats it as
/// opaque TCP (a server-speaks-first protocol).
pub const DETECT_TIMEOUT: Duration = Duration::from_secs(1);

/// How many other endpoints a request tries when a node cannot be reached (nothing was
/// sent, so this is safe for any request), within the retry budget.
const MAX_REDIALS: u8 = 2;

/// How a client connection reached the outbound side.
#[derive(Debug, Clone)]
pub enum Entry {
    /// The HTTP proxy port: each request names its service in its authority.
    HttpProxy,
    /// A service's local port.
    Binding(String),
    /// Redirected by iptables; the client dialled this address.
    Intercepted(SocketAddr),
}

/// The HTTP version a client spoke; the app on the far side is spoken to in the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClientProto {
    H1,
    H2,
}

impl ClientProto {
    fn header(self) -> HeaderValue {
        match self {
            ClientProto::H1 => HeaderValue::from_static("h1"),
            ClientProto::H2 => HeaderValue::from_static("h2"),
        }
    }
}

/// Serves one client connection until it closes or the drain finishes it.
pub async fn serve(
    context: Arc<Context>,
    stream: TcpStream,
    entry: Entry,
    admitted: Admitted,
    drain: drain::Watch,
) {
    let _admitted = admitted;
    let _ = stream.set_nodelay(true);
    let table = context.table();
    let fixed = match &entry {
        Entry::HttpProxy => None,
        Entry::Binding(name) => match table.by_name(name.as_str()) {
            Some(route) => Some(Arc::clone(route)),
            // The binding went away in a reload between accept and here.
            None => return,
        },
        Entry::Intercepted(dst) => match table.by_original_dst(*dst) {
            Some(route) => Some(Arc::clone(route)),
            None => return passthrough(stream, *dst).await,
        },
    };
    let protocol = fixed.as_ref().map(|route| route.protocol);
    let detected = match protocol {
        Some(Protocol::Tcp) => Detected::Opaque,
        _ => detect(&stream, DETECT_TIMEOUT).await,
    };
    // Only an `auto` service's port carries what is not HTTP as opaque TCP. On the proxy
    // port and an `http` service's port, HTTP/1 answers garbage with 400 and silence with
    // the header timeout.
    let opaque_allowed = matches!(protocol, Some(Protocol::Auto | Protocol::Tcp));
    match (detected, fixed) {
        (Detected::Closed, _) => {}
        // Boxed: a task's future is as large as its largest state, and each idle client
        // connection holds one; the states differ a lot in size.
        (Detected::Http2, fixed) => {
            Box::pin(serve_http(context, stream, fixed, ClientProto::H2, drain)).await
        }
        (Detected::Opaque | Detected::Silent, Some(route)) if opaque_allowed => {
            Box::pin(tunnel(context, stream, route, drain)).await
        }
        (_, fixed) => Box::pin(serve_http(context, stream, fixed, ClientProto::H1, drain)).await,
    }
}
