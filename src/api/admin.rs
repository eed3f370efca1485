//! The admin listener's routes: liveness, readiness, metrics, and the token-protected
//! `/admin` views of usage and upstream keys.

use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use axum::Json;
use axum::extract::Query;
use serde::Deserialize;

use crate::app::AppState;
use crate::error::ApiError;
use crate::telemetry::metrics;
use crate::usage::MAX_REPORT_DAYS;

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
    if let Err(e) = state.ledger.check_writable().await {
        tracing::warn!(error = %e, "not ready: the usage ledger cannot record");
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "usage storage not writable\n",
        );
    }
    (StatusCode::OK, "ready\n")
}

/// Prometheus scrape: state gauges are refreshed from their owners first.
pub async fn metrics(State(state): State<AppState>) -> Response {
    state.cache.settle().await;
    state.metrics.set_cache(&state.cache.stats());
    let runtime = state.runtime();
    state.metrics.set_pools(&runtime.upstreams.status());
    state.tasks.observe();
    match state
        .ledger
        .report(&runtime.config.client_limits(), None, 1)
        .await
    {
        Ok(report) => state.metrics.set_quotas(&report),
        Err(e) => tracing::warn!(error = %e, "quota gauges not refreshed: usage report failed"),
    }
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static(metrics::CONTENT_TYPE),
        )],
        state.metrics.encode(),
    )
        .into_response()
}

#[derive(Deserialize)]
pub struct UsageQuery {
    client: Option<String>,
    days: Option<u32>,
}

/// `GET /admin/usage[?client=ID][&days=N]`: per client, usage per window, limits, remaining,
/// spend, and the last `days` (default 14) days.
pub async fn usage(State(state): State<AppState>, Query(query): Query<UsageQuery>) -> Response {
    let runtime = state.runtime();
    let clients = runtime.config.client_limits();
    if let Some(only) = &query.client
        && !clients.iter().any(|(id, _)| id == only)
    {
        return ApiError::not_found("client_not_found", "No configured client has this id.")
            .with_param("client")
            .into_response();
    }
    let days = query.days.unwrap_or(14).clamp(1, MAX_REPORT_DAYS);
    match state
        .ledger
        .report(&clients, query.client.as_deref(), days)
        .await
    {
        Ok(report) => Json(report).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "usage report failed");
            ApiError::internal().into_response()
        }
    }
}

/// `GET /admin/upstreams`: every upstream's key pool: key states, load, recent outcomes, and
/// what the upstream last said about its own limits.
pub async fn upstreams(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(serde_json::json!({ "upstreams": state.runtime().upstreams.status() }))
}
