//! The one place where an error becomes an HTTP response.
//!
//! Every failure a client can see is an [`ApiError`]: an OpenAI-shaped body
//! (`{"error":{"message","type","param","code"}}`, all four keys always present), a status
//! from SPEC §3, and the headers that go with it (`Retry-After`, `WWW-Authenticate`,
//! `x-should-retry`). Domain modules keep their own error types and convert into this one;
//! nothing else in the crate builds an error response, and building one has no side effect
//! (logging happens once, in the request-log middleware, which reads the [`ErrorKind`] this
//! module leaves in the response extensions).

use std::borrow::Cow;
use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// OpenAI's `error.type` values that imagegate uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorType {
    InvalidRequest,
    Requests,
    InsufficientQuota,
    Upstream,
    Server,
}

impl ErrorType {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorType::InvalidRequest => "invalid_request_error",
            ErrorType::Requests => "requests",
            ErrorType::InsufficientQuota => "insufficient_quota",
            ErrorType::Upstream => "upstream_error",
            ErrorType::Server => "server_error",
        }
    }
}

/// What kind of failure a response was, for the request log and metrics (`error_kind`).
/// Left in the response extensions by [`ApiError::into_response`].
#[derive(Debug, Clone, Copy)]
pub struct ErrorKind(pub &'static str);

/// A client-visible failure. Cheap to build, no side effects.
#[derive(Debug, Clone)]
pub struct ApiError {
    status: StatusCode,
    error_type: ErrorType,
    message: Cow<'static, str>,
    param: Option<Cow<'static, str>>,
    code: Option<&'static str>,
    retry_after: Option<Duration>,
    should_retry: Option<bool>,
}

impl ApiError {
    fn new(
        status: StatusCode,
        error_type: ErrorType,
        message: impl Into<Cow<'static, str>>,
    ) -> Self {
        ApiError {
            status,
            error_type,
            message: message.into(),
            param: None,
            code: None,
            retry_after: None,
            should_retry: None,
        }
    }

    pub fn with_param(mut self, param: impl Into<Cow<'static, str>>) -> Self {
        self.param = Some(param.into());
        self
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn with_retry_after(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }

    /// 400 `invalid_request_error`, naming the offending field when there is one.
    pub fn invalid_request(message: impl Into<Cow<'static, str>>, param: Option<&str>) -> Self {
        let mut e = ApiError::new(StatusCode::BAD_REQUEST, ErrorType::InvalidRequest, message);
        e.param = param.map(|p| Cow::Owned(p.to_owned()));
        e
    }

    pub fn unsupported_media_type() -> Self {
        ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ErrorType::InvalidRequest,
            "Content-Type must be application/json",
        )
        .with_code("unsupported_media_type")
    }

    pub fn unsupported_encoding() -> Self {
        ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ErrorType::InvalidRequest,
            "Content-Encoding is not supported: send the JSON body uncompressed.",
        )
        .with_code("unsupported_media_type")
    }

    /// 408 for a body that did not arrive within `server.body_read_timeout_secs`: the
    /// client stalled, not the gateway, so not a 5xx.
    pub fn body_timeout() -> Self {
        ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            ErrorType::InvalidRequest,
            "The request body did not arrive in time.",
        )
        .with_code("body_timeout")
    }

    pub fn request_too_large(limit: usize) -> Self {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorType::InvalidRequest,
            format!("request body is larger than the limit of {limit} bytes"),
        )
        .with_code("request_too_large")
    }

    /// 401 for a missing, malformed, unknown or revoked client key. One message for all of
    /// them, so the answer does not tell a prober which case it hit.
    pub fn invalid_api_key() -> Self {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            ErrorType::InvalidRequest,
            "Incorrect or missing API key. Send it as 'Authorization: Bearer <key>'.",
        )
        .with_code("invalid_api_key")
    }

    pub fn model_not_found(model: &str) -> Self {
        // The name is echoed back so a client can spot its typo; it is bounded so an
        // attacker cannot make the gateway reflect a large payload.
        let shown: String = model.chars().take(128).collect();
        ApiError::new(
            StatusCode::NOT_FOUND,
            ErrorType::InvalidRequest,
            format!("The model '{shown}' does not exist or you do not have access to it."),
        )
        .with_param("model")
        .with_code("model_not_found")
    }

    pub fn not_found(code: &'static str, message: &'static str) -> Self {
        ApiError::new(StatusCode::NOT_FOUND, ErrorType::InvalidRequest, message).with_code(code)
    }

    pub fn route_not_found() -> Self {
        ApiError::new(
            StatusCode::NOT_FOUND,
            ErrorType::InvalidRequest,
            "Unknown route.",
        )
        .with_code("not_found")
    }

    pub fn method_not_allowed() -> Self {
        ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            ErrorType::InvalidRequest,
            "Method not allowed on this route.",
        )
        .with_code("method_not_allowed")
    }

    pub fn upstream(status: StatusCode, code: &'static str, message: &'static str) -> Self {
        ApiError::new(status, ErrorType::Upstream, message).with_code(code)
    }

    /// 429 because a client rate limit (requests, images or concurrency) was hit.
    pub fn rate_limited(message: impl Into<Cow<'static, str>>, retry_after: Duration) -> Self {
        ApiError::new(StatusCode::TOO_MANY_REQUESTS, ErrorType::Requests, message)
            .with_code("rate_limit_exceeded")
            .with_retry_after(retry_after)
    }

    /// 429 for an exhausted quota or budget. SDKs stop retrying on `x-should-retry: false`,
    /// which the `insufficient_quota` type sets: waiting seconds will not help.
    pub fn insufficient_quota(message: impl Into<Cow<'static, str>>) -> Self {
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            ErrorType::InsufficientQuota,
            message,
        )
        .with_code("insufficient_quota")
    }

    /// 401 for the admin routes (a missing or wrong admin token).
    pub fn invalid_admin_token() -> Self {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            ErrorType::InvalidRequest,
            "Admin routes need 'Authorization: Bearer <admin token>'.",
        )
        .with_code("invalid_admin_token")
    }

    pub fn request_timeout() -> Self {
        ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            ErrorType::Server,
            "The request took longer than the gateway allows.",
        )
        .with_code("request_timeout")
    }

    /// 404 for a task id that does not exist, expired, or belongs to another client: one
    /// answer for all three, so task ids cannot be probed.
    pub fn task_not_found() -> Self {
        ApiError::not_found(
            "task_not_found",
            "No task with this id exists for your API key (unknown, expired, or another client's).",
        )
    }

    /// 409: the `Idempotency-Key` already names a task with a different request.
    pub fn idempotency_conflict() -> Self {
        ApiError::new(
            StatusCode::CONFLICT,
            ErrorType::InvalidRequest,
            "This Idempotency-Key was already used with a different request body; use a new key for a new request.",
        )
        .with_code("idempotency_key_reused")
    }

    /// 503: `tasks.max_queued` tasks are waiting already.
    pub fn task_queue_full(retry_after: Duration) -> Self {
        ApiError::unavailable(
            "task_queue_full",
            "Too many async tasks are waiting; retry after the delay in Retry-After.",
        )
        .with_retry_after(retry_after)
    }

    /// The error of a task that restarts kept interrupting.
    pub fn internal_task_interrupted() -> Self {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorType::Server,
            "The task was interrupted by gateway restarts too many times and was stopped; its quota was refunded. Submit it again.",
        )
        .with_code("task_interrupted")
    }

    /// The error of a native task the upstream did not finish within `tasks.native_timeout_secs`.
    pub fn task_timed_out() -> Self {
        ApiError::upstream(
            StatusCode::GATEWAY_TIMEOUT,
            "upstream_timeout",
            "The upstream provider did not finish the task in time; its quota was refunded.",
        )
    }

    pub fn unavailable(code: &'static str, message: &'static str) -> Self {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, ErrorType::Server, message).with_code(code)
    }

    /// A generic 500. The cause is logged by the caller at the point it is known; the client
    /// gets no internal detail.
    pub fn internal() -> Self {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorType::Server,
            "The gateway hit an internal error. Retry, and contact the operators with the x-request-id if it persists.",
        )
        .with_code("internal_error")
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }

    pub fn code(&self) -> Option<&'static str> {
        self.code
    }

    pub fn param(&self) -> Option<&str> {
        self.param.as_deref()
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    pub fn error_type(&self) -> ErrorType {
        self.error_type
    }

    /// The JSON body, also used for failed async tasks (`error` field).
    pub fn body(&self) -> ErrorObject<'_> {
        ErrorObject {
            message: &self.message,
            r#type: self.error_type.as_str(),
            param: self.param.as_deref(),
            code: self.code,
        }
    }

    fn kind(&self) -> &'static str {
        self.code.unwrap_or(self.error_type.as_str())
    }
}

impl From<crate::usage::ReserveError> for ApiError {
    fn from(e: crate::usage::ReserveError) -> Self {
        match &e {
            crate::usage::ReserveError::Exhausted { .. } => {
                ApiError::insufficient_quota(e.client_message())
            }
            crate::usage::ReserveError::Unavailable(_) => ApiError::unavailable(
                "usage_unavailable",
                "Usage accounting is temporarily unavailable; retry shortly.",
            )
            .with_retry_after(std::time::Duration::from_secs(5)),
        }
    }
}

/// OpenAI's `Error` object; `param` and `code` serialise as `null` when absent because the
/// published schema requires the keys.
#[derive(Debug, Serialize)]
pub struct ErrorObject<'a> {
    pub message: &'a str,
    pub r#type: &'static str,
    pub param: Option<&'a str>,
    pub code: Option<&'static str>,
}

#[derive(Serialize)]
struct ErrorEnvelope<'a> {
    error: ErrorObject<'a>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::to_vec(&ErrorEnvelope { error: self.body() })
            .unwrap_or_else(|_| br#"{"error":{"message":"internal error","type":"server_error","param":null,"code":null}}"#.to_vec());
        let mut response = (self.status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if self.status == StatusCode::UNAUTHORIZED {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(after) = self.retry_after {
            // Retry-After is whole seconds, rounded up so a client that honours it is never early.
            let millis = after.as_millis();
            let secs = millis.div_ceil(1000).max(1);
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs as u64));
            headers.insert("retry-after-ms", HeaderValue::from(millis.max(1) as u64));
        }
        if let Some(retry) = self.should_retry.or(match self.error_type {
            ErrorType::InsufficientQuota => Some(false),
            _ => None,
        }) {
            headers.insert(
                "x-should-retry",
                HeaderValue::from_static(if retry { "true" } else { "false" }),
            );
        }
        response.extensions_mut().insert(ErrorKind(self.kind()));
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn body_json(response: Response) -> serde_json::Value {
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[tokio::test]
    async fn error_body_always_has_all_four_keys() {
        let response = ApiError::internal().into_response();
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let json = body_json(response).await;
        let error = json["error"].as_object().unwrap();
        for key in ["message", "type", "param", "code"] {
            assert!(error.contains_key(key), "missing {key}");
        }
        assert!(error["param"].is_null());
    }

    #[tokio::test]
    async fn retry_after_rounds_up_to_whole_seconds() {
        let response =
            ApiError::rate_limited("slow down", Duration::from_millis(1200)).into_response();
        assert_eq!(response.headers()[header::RETRY_AFTER], "2");
        assert_eq!(response.headers()["retry-after-ms"], "1200");
    }

    #[tokio::test]
    async fn unauthorized_carries_www_authenticate() {
        let response = ApiError::invalid_api_key().into_response();
        assert_eq!(response.headers()[header::WWW_AUTHENTICATE], "Bearer");
        let json = body_json(response).await;
        assert_eq!(json["error"]["code"], "invalid_api_key");
    }
}
