//! The admin listener's routes: liveness and readiness.

use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::StatusCode;

use crate::app::AppState;

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
