//! Requests and answers of the daemons' small JSON APIs (the supervisor's status, the
//! replicas' identity and discovery API, the central server).
//!
//! Invariants: every error answer is `{"error": "<message>"}` with `Content-Type:
//! application/json`, the message saying what was expected; a request body is read only up
//! to its limit, and a body that declares a larger length is refused before any of it is
//! read (so a client that sent `Expect: 100-continue` never sends it); a body that has not
//! arrived whole within [`BODY_TIMEOUT`] is refused (408), so a client that declares a
//! body and never sends it cannot hold the connection and its memory.

use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::{Body, Bytes, Incoming};
use hyper::{header, Request, Response, StatusCode};

/// A request refused: the status to answer with and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal(pub StatusCode, pub String);

impl Refusal {
    /// The error answer (see [`error`]).
    pub fn into_response(self) -> Response<Full<Bytes>> {
        error(self.0, &self.1)
    }
}

/// `body`, already JSON, with `code`.
pub fn json(code: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = code;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

/// `value` as JSON, with `code`.
pub fn json_value(code: StatusCode, value: &serde_json::Value) -> Response<Full<Bytes>> {
    json(code, value.to_string())
}

/// `{"error": message}` with `code`.
pub fn error(code: StatusCode, message: &str) -> Response<Full<Bytes>> {
    json_value(code, &serde_json::json!({ "error": message }))
}

/// The most a request body may take to arrive, from the end of its head.
pub const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The body, or 413 when it is (or says it will be) larger than `limit`; 408 when it has
/// not arrived within [`BODY_TIMEOUT`]; 400 when it cannot be read.
pub async fn read_body(request: Request<Incoming>, limit: usize) -> Result<Bytes, Refusal> {
    read_body_within(request.into_body(), limit, BODY_TIMEOUT).await
}

/// [`read_body`] of `body` with `timeout` in place of [`BODY_TIMEOUT`].
pub async fn read_body_within<B>(
    body: B,
    limit: usize,
    timeout: std::time::Duration,
) -> Result<Bytes, Refusal>
where
    B: Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let too_large = || {
        let message = format!("body larger than {limit} bytes");
        Refusal(StatusCode::PAYLOAD_TOO_LARGE, message)
    };
    if body.size_hint().lower() > limit as u64 {
        return Err(too_large());
    }
    let collected = tokio::time::timeout(timeout, Limited::new(body, limit).collect()).await;
    match collected {
        Err(_) => Err(Refusal(
            StatusCode::REQUEST_TIMEOUT,
            format!("the body did not arrive within {} s", timeout.as_secs()),
        )),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(err))
            if err
                .downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(too_large())
        }
        Ok(Err(err)) => Err(Refusal(
            StatusCode::BAD_REQUEST,
            format!("cannot read the body: {err}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_error_answer_is_json_with_the_message() {
        let response = error(StatusCode::FORBIDDEN, "not a node of site \"depot-7\"");
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
        assert_eq!(
            response.headers().get(header::CONTENT_TYPE),
            Some(&header::HeaderValue::from_static("application/json"))
        );
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        let value: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(value["error"], "not a node of site \"depot-7\"");
    }

    /// A body that declared its length and never sends a byte of it.
    struct Stalled;

    impl Body for Stalled {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
            std::task::Poll::Pending
        }
    }

    #[tokio::test]
    async fn a_body_that_never_arrives_is_refused_when_its_time_is_up() {
        let refused = read_body_within(Stalled, 1024, std::time::Duration::from_millis(50))
            .await
            .expect_err("never arrives");
        assert_eq!(refused.0, StatusCode::REQUEST_TIMEOUT, "{refused:?}");
        let whole = read_body_within(
            Full::new(Bytes::from_static(b"{}")),
            1024,
            std::time::Duration::from_millis(50),
        )
        .await
        .expect("a body that is there");
        assert_eq!(&whole[..], b"{}");
    }
}
