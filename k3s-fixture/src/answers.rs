//! The kube-apiserver's answer shapes the fixture's HTTP handlers give (`Status` objects,
//! JSON and text bodies) and the query parameters they read.

use bytes::Bytes;
use http::{header, Response, StatusCode};
use http_body_util::Full;
use serde_json::json;

/// The percent-decoded value of query parameter `name`.
pub(crate) fn query(uri: &http::Uri, name: &str) -> Result<Option<String>, String> {
    let decode = |text: &str| -> Result<String, String> {
        let mut bytes = Vec::with_capacity(text.len());
        let mut input = text.bytes();
        while let Some(b) = input.next() {
            bytes.push(match b {
                b'+' => b' ',
                b'%' => {
                    let hex: Vec<u8> = input.by_ref().take(2).collect();
                    std::str::from_utf8(&hex)
                        .ok()
                        .filter(|h| h.len() == 2)
                        .and_then(|h| u8::from_str_radix(h, 16).ok())
                        .ok_or_else(|| format!("invalid escape in query {text:?}"))?
                }
                b => b,
            });
        }
        String::from_utf8(bytes).map_err(|_| format!("query {text:?} is not UTF-8"))
    };
    for pair in uri.query().unwrap_or_default().split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if decode(key)? == name {
            return decode(value).map(Some);
        }
    }
    Ok(None)
}

pub(crate) fn text(code: StatusCode, body: &str) -> Response<Full<Bytes>> {
    respond(code, "text/plain; charset=utf-8", body.to_owned())
}

pub(crate) fn json_response(code: StatusCode, value: &serde_json::Value) -> Response<Full<Bytes>> {
    respond(code, "application/json", value.to_string())
}

pub(crate) fn respond(code: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = code;
    if let Ok(value) = header::HeaderValue::from_str(content_type) {
        response.headers_mut().insert(header::CONTENT_TYPE, value);
    }
    response
}

/// A kube-apiserver `Status` (keys in kube-apiserver's order).
pub(crate) fn status(
    code: StatusCode,
    reason: &str,
    message: &str,
    details: Option<serde_json::Value>,
) -> Response<Full<Bytes>> {
    let quote = |s: &str| serde_json::Value::from(s).to_string();
    let details = details.map_or(String::new(), |d| format!(",\"details\":{d}"));
    let body = format!(
        "{{\"kind\":\"Status\",\"apiVersion\":\"v1\",\"status\":\"Failure\",\"message\":{},\"reason\":{}{details},\"code\":{}}}",
        quote(message),
        quote(reason),
        code.as_u16()
    );
    respond(code, "application/json", body)
}

pub(crate) fn not_found(resource: &str, name: &str) -> Response<Full<Bytes>> {
    status(
        StatusCode::NOT_FOUND,
        "NotFound",
        &format!("{resource} \"{name}\" not found"),
        Some(json!({"name": name, "kind": resource})),
    )
}

pub(crate) fn method_not_allowed() -> Response<Full<Bytes>> {
    status(
        StatusCode::METHOD_NOT_ALLOWED,
        "MethodNotAllowed",
        "the server does not allow this method on the requested resource",
        None,
    )
}

pub(crate) fn forbidden(message: &str) -> Response<Full<Bytes>> {
    status(StatusCode::FORBIDDEN, "Forbidden", message, None)
}

pub(crate) fn bad_request(message: &str) -> Response<Full<Bytes>> {
    status(StatusCode::BAD_REQUEST, "BadRequest", message, None)
}
