//! The admin listener's routes: liveness, readiness, metrics.

use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::app::AppState;
use crate::telemetry::metrics;

/// The process is up and answering.
pub async fn healthz() -> &'static str {
    "ok\n"
}

/// Ready to take traffic: config loaded (it is, or the process would not be here), at least one
/// upstream key configured, and not draining for shutdown.
pub async fn readyz(State(state): State<AppState>) -> (StatusCode, &'static str) {
    if state.draining.load(Ordering::Acquire) {
        return (StatusCode::SERVICE_UNAVAILABLE, "draining\n");
    }
    if !state.runtime().upstreams.any_usable() {
        return (StatusCode::SERVICE_UNAVAILABLE, "no usable upstream key\n");
    }
    (StatusCode::OK, "ready\n")
}

/// Prometheus scrape: state gauges are refreshed from their owners first.
pub async fn metrics(State(state): State<AppState>) -> Response {
    state.cache.settle().await;
    state.metrics.set_cache(&state.cache.stats());
    state.metrics.set_pools(&state.runtime().upstreams.status());
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static(metrics::CONTENT_TYPE),
        )],
        state.metrics.encode(),
    )
        .into_response()
}
