//! What both directions of the HTTP path share: the body type of every request the proxy
//! sends on, bodies that hold a resource until they end, the mesh's own headers,
//! hop-by-hop header removal, and the proxy's error responses.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery};
use http::{Response, StatusCode, Uri};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Empty, Full};

/// The body of every request the proxy sends on.
pub type Body = BoxBody<Bytes, hyper::Error>;

/// Names why the proxy (not the app) answered with an error.
pub const ERROR_HEADER: HeaderName = HeaderName::from_static("pimesh-proxy-error");
/// Set by the outbound proxy on each request to a peer: the concrete service chosen.
pub const DST_HEADER: HeaderName = HeaderName::from_static("pimesh-dst");
/// Set by the outbound proxy: the HTTP version the client spoke (`h1` or `h2`), which the
/// inbound proxy speaks to the app.
pub const PROTO_HEADER: HeaderName = HeaderName::from_static("pimesh-proto");
/// Set by the outbound proxy on an upgrade it carries as an extended CONNECT, when the
/// client's method was not `GET`: the method the inbound proxy sends the app.
pub const UPGRADE_METHOD_HEADER: HeaderName = HeaderName::from_static("pimesh-upgrade-method");
/// Set by the inbound proxy when the app refused an upgrade: the status the app answered,
/// which the outbound proxy gives the client (the extended CONNECT's own status cannot be
/// a 2xx, which would open the tunnel).
pub const UPGRADE_STATUS_HEADER: HeaderName = HeaderName::from_static("pimesh-upgrade-status");
/// Set on responses the proxy made up because of an injected fault.
pub const FAULT_HEADER: HeaderName = HeaderName::from_static("pimesh-fault");

/// `body`, keeping `held` until the body is dropped: what a response holds while its
/// client reads it (a stream lease, a service's in-flight permit).
pub fn holding<B, T>(body: B, held: T) -> Body
where
    B: hyper::body::Body<Data = Bytes, Error = hyper::Error> + Send + Sync + Unpin + 'static,
    T: Send + Sync + Unpin + 'static,
{
    Held { body, _held: held }.boxed()
}

struct Held<B, T> {
    body: B,
    _held: T,
}

impl<B, T> hyper::body::Body for Held<B, T>
where
    B: hyper::body::Body<Data = Bytes, Error = hyper::Error> + Unpin,
    T: Unpin,
{
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

pub fn full(text: impl Into<Bytes>) -> Body {
    Full::new(text.into())
        .map_err(|never| match never {})
        .boxed()
}

/// A response made by the proxy: `status`, the reason in [`ERROR_HEADER`] and the body.
pub fn error_response(status: StatusCode, reason: &str) -> Response<Body> {
    let mut response = Response::new(full(format!("{reason}\n")));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(ERROR_HEADER, header_value(reason));
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// `text` as a header value: control characters and non-ASCII become `?`.
pub fn header_value(text: &str) -> HeaderValue {
    let clean: String = text
        .chars()
        .map(|c| {
            if c.is_ascii() && !c.is_ascii_control() {
                c
            } else {
                '?'
            }
        })
        .collect();
    HeaderValue::from_str(&clean).unwrap_or_else(|_| HeaderValue::from_static("error"))
}

/// `http://<authority><path and query of uri>`: the absolute form a request takes on its
/// next hop (HTTP/2 needs scheme and authority; the app's client needs its address).
pub fn rebase<A>(uri: &Uri, authority: A) -> Result<Uri, http::Error>
where
    Authority: TryFrom<A>,
    <Authority as TryFrom<A>>::Error: Into<http::Error>,
{
    Uri::builder()
        .scheme("http")
        .authority(authority)
        .path_and_query(path_of(uri))
        .build()
}

/// The origin form of `uri`: the request target an HTTP/1.1 request to an origin server
/// carries (RFC 9112 §3.2.1).
pub fn origin_form(uri: &Uri) -> Uri {
    Uri::from(path_of(uri))
}

/// The path and query of `uri`, `/` when it has none.
fn path_of(uri: &Uri) -> PathAndQuery {
    uri.path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"))
}

/// Removes the headers that describe one connection, not the message (RFC 9110 §7.6.1),
/// including those the `Connection` header names. HTTP/2 refuses them outright.
///
/// `TE: trailers` stays: HTTP/2 allows it, and gRPC requires it end to end.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one pass over the names (no hashing) settles that.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    let te_trailers = headers
        .get_all(header::TE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("trailers"));
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    // Only the names present: a removal of an absent name still hashes it.
    let present: Vec<HeaderName> = headers
        .keys()
        .filter(|n| is_hop_by_hop(n))
        .cloned()
        .collect();
    for name in present {
        headers.remove(name);
    }
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// Whether `name` is one of the headers [`strip_hop_by_hop`] removes by name. A header
/// that `Connection` names is found through `Connection` itself.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == header::CONNECTION
        || name == header::TRANSFER_ENCODING
        || name == header::UPGRADE
        || name == header::TE
        || name == header::PROXY_AUTHORIZATION
        || name.as_str() == "keep-alive"
        || name.as_str() == "proxy-connection"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_headers_go_with_those_they_name() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-hop"),
        );
        headers.insert("x-hop", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        headers.insert("x-end", HeaderValue::from_static("2"));
        strip_hop_by_hop(&mut headers);
        let left: Vec<_> = headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["x-end"]);
    }

    #[test]
    fn te_trailers_stays_and_other_te_goes() {
        let mut headers = HeaderMap::new();
        headers.insert(header::TE, HeaderValue::from_static("gzip, trailers"));
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers[header::TE], "trailers");
        let mut headers = HeaderMap::new();
        headers.insert(header::TE, HeaderValue::from_static("gzip"));
        strip_hop_by_hop(&mut headers);
        assert!(!headers.contains_key(header::TE));
    }

    #[test]
    fn reasons_become_valid_header_values() {
        let response = error_response(StatusCode::SERVICE_UNAVAILABLE, "no route to \"x\"\n\u{e9}");
        assert_eq!(response.status(), 503);
        assert_eq!(response.headers()[ERROR_HEADER], "no route to \"x\"??");
    }
}
