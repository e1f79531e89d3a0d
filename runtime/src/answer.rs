//! Requests and answers of the daemons' small JSON APIs (the supervisor's status, the
//! replicas' identity and discovery API, the central server).
//!
//! Invariants: every error answer is `{"error": "<message>"}` with `Content-Type:
//! application/json`, the message saying what was expected; a request body is read only up
//! to its limit, and a body that declares a larger length is refused before any of it is
//! read (so a client that sent `Expect: 100-continue` never sends it).

use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::{Body as _, Bytes, Incoming};
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

/// The body, or 413 when it is (or says it will be) larger than `limit`; 400 when it
/// cannot be read.
pub async fn read_body(request: Request<Incoming>, limit: usize) -> Result<Bytes, Refusal> {
    let too_large = || {
        let message = format!("body larger than {limit} bytes");
        Refusal(StatusCode::PAYLOAD_TOO_LARGE, message)
    };
    if request.body().size_hint().lower() > limit as u64 {
        return Err(too_large());
    }
    match Limited::new(request.into_body(), limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(err)
            if err
                .downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(too_large())
        }
        Err(err) => Err(Refusal(
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
}
