//! HTTP middleware: request ids and the one log line per request.

use std::time::Instant;

use std::sync::Arc;

use axum::extract::{MatchedPath, Request, State};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument;

use super::metrics::{HttpLabels, Metrics, RouteLabels};
use super::{RequestFacts, RequestLine, is_valid_request_id};
use crate::error::ErrorKind;

pub const REQUEST_ID: &str = "x-request-id";

/// The request's id: the client's if well-formed, else a new one. Set on the request (so
/// handlers and the log see it) and on the response.
#[derive(Debug, Clone)]
pub struct RequestId(pub HeaderValue);

/// Assigns the request id before anything else runs, so every later layer can use it.
pub async fn request_id(mut request: Request, next: Next) -> Response {
    let id = request
        .headers()
        .get(REQUEST_ID)
        .filter(|v| is_valid_request_id(v.as_bytes()))
        // A copy, not a clone: a cloned value is a slice of the connection's whole read
        // buffer, which this request would then keep alive until it ends (seconds, for an
        // image), one buffer per request in flight.
        .and_then(|v| HeaderValue::from_bytes(v.as_bytes()).ok())
        .unwrap_or_else(new_request_id);
    request.headers_mut().insert(REQUEST_ID, id.clone());
    request.extensions_mut().insert(RequestId(id.clone()));
    let mut response = next.run(request).await;
    response.headers_mut().insert(REQUEST_ID, id);
    response
}

fn new_request_id() -> HeaderValue {
    let bytes: [u8; 16] = rand::random();
    let mut text = String::with_capacity(36);
    text.push_str("req_");
    text.push_str(&hex::encode(bytes));
    HeaderValue::try_from(text).unwrap_or_else(|_| HeaderValue::from_static("req_unknown"))
}

/// Runs the request inside a span carrying its id, then writes its one log line (and its HTTP
/// metrics) from the facts the handler and any error left in the response.
pub async fn log_request(
    State(metrics): State<Arc<Metrics>>,
    request: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let method = request.method().clone();
    let request_id = request
        .extensions()
        .get::<RequestId>()
        .and_then(|id| id.0.to_str().ok())
        .unwrap_or("")
        .to_owned();
    // The span shows in the pretty format's prefix of every event inside the request; the
    // JSON format does not print spans, so it is not made there (it costs a formatting of its
    // fields per request).
    let response = if super::json_request_lines() {
        next.run(request).await
    } else {
        let span = tracing::info_span!("request", request_id = %request_id);
        next.run(request).instrument(span).await
    };

    let latency_ms = started.elapsed().as_secs_f64() * 1000.0;
    let status = response.status().as_u16();
    let facts = response.extensions().get::<RequestFacts>();
    let error_kind = response.extensions().get::<ErrorKind>().map(|k| k.0);
    let f = |get: fn(&RequestFacts) -> Option<&str>| facts.and_then(get);
    let line = RequestLine {
        request_id: &request_id,
        method: method.as_str(),
        route: &route,
        status,
        latency_ms: (latency_ms * 1000.0).round() / 1000.0,
        client: f(|x| x.client.as_ref().map(|c| c.as_str())),
        model: f(|x| x.model.as_deref()),
        upstream: f(|x| x.upstream.as_deref()),
        upstream_key: f(|x| x.upstream_key.as_deref()),
        cache: f(|x| x.cache),
        images: facts.and_then(|x| x.images),
        prompt: f(|x| x.prompt.as_deref()),
        error_kind,
    };
    line.log();
    let client = facts
        .and_then(|x| x.client.as_ref())
        .map_or("-", |c| c.as_str())
        .to_owned();
    metrics
        .http_requests
        .get_or_create(&HttpLabels {
            route: route.clone(),
            status,
            client,
        })
        .inc();
    metrics
        .http_request_duration
        .get_or_create(&RouteLabels { route })
        .observe(latency_ms / 1000.0);
    response
}
