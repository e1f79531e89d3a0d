//! gRPC responses classified as Linkerd classifies them: a response whose `grpc-status`
//! (in its trailers, or in its headers for a trailers-only response) is not 0 is a
//! failure, and so is a gRPC response whose body fails (a reset, a cut connection) or ends
//! without a `grpc-status`. A gRPC response is one whose `content-type` starts with
//! `application/grpc`; any other response is classified by its HTTP status alone.
//!
//! The verdict on a streamed gRPC response is known only when its body ends, so the body
//! is wrapped ([`on_end`]) and the metrics and the balancer hear about it then. Other
//! responses are recorded at their head, as before, and are not wrapped.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderMap, CONTENT_TYPE};
use http::Response;
use http_body_util::BodyExt as _;
use hyper::body::{Frame, SizeHint};

use super::requests::{GrpcEnd, RouteMetrics};
use crate::outbound::balance::Pick;
use crate::transport::mesh_http::Body;

/// The trailer (or header) carrying a gRPC call's status.
pub const GRPC_STATUS: &str = "grpc-status";

/// Whether `headers` are a gRPC message's.
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("application/grpc"))
}

/// The `grpc-status` in `headers`, if any.
pub fn status_in(headers: &HeaderMap) -> Option<u32> {
    headers.get(GRPC_STATUS)?.to_str().ok()?.trim().parse().ok()
}

/// Records `response` in `metrics` — at once, or for a gRPC response with a body, when
/// the body ends — with `latency` to its head.
pub fn record(
    response: Response<Body>,
    metrics: &RouteMetrics,
    latency: Duration,
) -> Response<Body> {
    let status = response.status().as_u16();
    if !is_grpc(response.headers()) {
        metrics.response(status, latency);
        return response;
    }
    metrics.latency(latency);
    if let Some(code) = status_in(response.headers()) {
        metrics.grpc_end(status, GrpcEnd::Status(code));
        return response;
    }
    let metrics = metrics.clone();
    response.map(|body| on_end(body, move |end| metrics.grpc_end(status, end)))
}

/// Records how the endpoint of `pick` answered with `headers` and `body` (after
/// `latency`): a success at once for a response that is not gRPC; for a gRPC response, as
/// its `grpc-status` says, when it is known. A cancelled call records nothing.
pub fn judge<E>(pick: Pick<E>, latency: Duration, headers: &HeaderMap, body: Body) -> Body
where
    E: Send + Sync + Unpin + 'static,
{
    if !is_grpc(headers) {
        pick.success(latency);
        return body;
    }
    let verdict = move |end| match end {
        GrpcEnd::Status(0) => pick.success(latency),
        GrpcEnd::Status(_) | GrpcEnd::NoStatus | GrpcEnd::Error => pick.failure(),
        GrpcEnd::Dropped => drop(pick),
    };
    match status_in(headers) {
        Some(code) => {
            verdict(GrpcEnd::Status(code));
            body
        }
        None => on_end(body, verdict),
    }
}

/// `body`, calling `done` once with how it ended.
pub fn on_end<F>(body: Body, done: F) -> Body
where
    F: FnOnce(GrpcEnd) + Send + Sync + Unpin + 'static,
{
    OnEnd {
        body,
        done: Some(done),
    }
    .boxed()
}

struct OnEnd<F: FnOnce(GrpcEnd)> {
    body: Body,
    done: Option<F>,
}

impl<F: FnOnce(GrpcEnd)> OnEnd<F> {
    fn finish(&mut self, end: GrpcEnd) {
        if let Some(done) = self.done.take() {
            done(end);
        }
    }
}

impl<F: FnOnce(GrpcEnd)> Drop for OnEnd<F> {
    fn drop(&mut self) {
        self.finish(GrpcEnd::Dropped);
    }
}

impl<F: FnOnce(GrpcEnd) + Unpin> hyper::body::Body for OnEnd<F> {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref() {
                    this.finish(status_in(trailers).map_or(GrpcEnd::NoStatus, GrpcEnd::Status));
                }
            }
            Poll::Ready(Some(Err(_))) => this.finish(GrpcEnd::Error),
            Poll::Ready(None) => this.finish(GrpcEnd::NoStatus),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        // Until the verdict is in, the end is polled for, so that it is seen.
        self.done.is_none() && self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use http::HeaderValue;
    use http_body_util::{BodyExt as _, StreamBody};

    use super::*;

    fn body_of(frames: Vec<Frame<Bytes>>) -> Body {
        let stream = futures_util::stream::iter(frames.into_iter().map(Ok::<_, hyper::Error>));
        StreamBody::new(stream).boxed()
    }

    fn ends(body: Body) -> (Body, Arc<Mutex<Vec<GrpcEnd>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&seen);
        let body = on_end(body, move |end| log.lock().unwrap().push(end));
        (body, seen)
    }

    #[tokio::test]
    async fn the_status_comes_from_the_trailers_once() {
        let mut trailers = HeaderMap::new();
        trailers.insert(GRPC_STATUS, HeaderValue::from_static("14"));
        let (body, seen) = ends(body_of(vec![
            Frame::data(Bytes::from_static(b"msg")),
            Frame::trailers(trailers),
        ]));
        let collected = body.collect().await.unwrap();
        assert_eq!(collected.trailers().unwrap()[GRPC_STATUS], "14");
        assert_eq!(*seen.lock().unwrap(), [GrpcEnd::Status(14)]);
    }

    #[tokio::test]
    async fn an_end_without_status_and_a_drop_are_told_apart() {
        let (body, seen) = ends(body_of(vec![Frame::data(Bytes::from_static(b"msg"))]));
        body.collect().await.unwrap();
        assert_eq!(*seen.lock().unwrap(), [GrpcEnd::NoStatus]);

        let (body, seen) = ends(body_of(vec![Frame::data(Bytes::from_static(b"msg"))]));
        drop(body);
        assert_eq!(*seen.lock().unwrap(), [GrpcEnd::Dropped]);
    }
}
