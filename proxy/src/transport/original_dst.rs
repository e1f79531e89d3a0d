//! Transparent interception: a connection that iptables `REDIRECT`ed to the outbound
//! port still knows where its client meant to go (`SO_ORIGINAL_DST`).

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use nix::sys::socket::{getsockopt, sockopt::OriginalDst};
use tokio::net::TcpStream;

/// The destination the client dialled, when netfilter redirected the connection here;
/// `None` when it connected to the proxy's port directly (or the socket is not IPv4, or
/// the kernel has no record of a redirect).
pub fn original_dst(stream: &TcpStream) -> Option<SocketAddr> {
    let raw = getsockopt(stream, OriginalDst).ok()?;
    let ip = Ipv4Addr::from(u32::from_be(raw.sin_addr.s_addr));
    let dst = SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be(raw.sin_port)));
    let local = stream.local_addr().ok()?;
    (dst != local).then_some(dst)
}
