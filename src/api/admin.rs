//! The admin listener's routes: liveness, readiness, metrics, the token-protected `/admin`
//! views of usage and upstream keys, and the `/admin/` dashboard page.
//!
//! The dashboard page is static (HTML, CSS and script in one file, no data in it) and is
//! served without the token: a browser navigation cannot carry a bearer header, and the
//! alternatives (a token in the URL, a cookie) would put it in logs or open the JSON endpoints
//! to cross-site requests. The page asks for the token, keeps it in `sessionStorage` and sends
//! it as `Authorization: Bearer` to `/admin/usage` and `/admin/upstreams`, which stay gated.

use std::sync::LazyLock;
use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use base64::Engine as _;
use sha2::{Digest, Sha256};

use axum::Json;
use axum::extract::Query;
use axum::extract::rejection::QueryRejection;
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
/// upstream key usable, the ledger writable, and not draining for shutdown.
pub async fn readyz(State(state): State<AppState>) -> (StatusCode, &'static str) {
    match readiness(&state).await {
        Ok(()) => (StatusCode::OK, "ready\n"),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
    }
}

/// What `/readyz` answers, shared with the `imagegate_ready` gauge so the two never disagree.
async fn readiness(state: &AppState) -> Result<(), &'static str> {
    if state.draining.load(Ordering::Acquire) {
        return Err("draining\n");
    }
    if !state.runtime().upstreams.any_usable() {
        return Err("no usable upstream key\n");
    }
    if let Err(e) = state.ledger.check_writable().await {
        tracing::warn!(error = %e, "not ready: the usage ledger cannot record");
        return Err("usage storage not writable\n");
    }
    Ok(())
}

/// Prometheus scrape: state gauges are refreshed from their owners first.
pub async fn metrics(State(state): State<AppState>) -> Response {
    state.cache.settle().await;
    let runtime = state.runtime();
    let usage = match state
        .ledger
        .report(&runtime.config.client_limits(), None, 1)
        .await
    {
        Ok(report) => Some(report),
        Err(e) => {
            tracing::warn!(error = %e, "quota gauges not refreshed: usage report failed");
            None
        }
    };
    let ready = readiness(&state).await.is_ok();
    let text = state.metrics.scrape(&metrics::ScrapeState {
        cache: &state.cache.stats(),
        pools: &runtime.upstreams.status(),
        usage: usage.as_ref(),
        tasks: state.tasks.gauges(),
        ready,
    });
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static(metrics::CONTENT_TYPE),
        )],
        text,
    )
        .into_response()
}

/// The dashboard: one self-contained file, compiled in (no build step, no external assets).
const DASHBOARD_HTML: &str = include_str!("dashboard.html");

/// The page's Content-Security-Policy. Only the page's own inline script and style may run
/// (allowed by their SHA-256, computed once from the file, so an edit cannot forget to update
/// it), and it may only talk to this origin: an injected script or a CDN reference would not
/// run, and the token cannot be sent elsewhere.
static DASHBOARD_CSP: LazyLock<String> = LazyLock::new(|| {
    let hash = |open: &str, close: &str| {
        let body = DASHBOARD_HTML
            .split_once(open)
            .and_then(|(_, rest)| rest.split_once(close))
            .map_or("", |(inner, _)| inner);
        base64::engine::general_purpose::STANDARD.encode(Sha256::digest(body.as_bytes()))
    };
    format!(
        "default-src 'none'; script-src 'sha256-{}'; style-src 'sha256-{}'; connect-src 'self'; \
         img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        hash("<script>", "</script>"),
        hash("<style>", "</style>"),
    )
});

/// `GET /admin/`: the ops dashboard page (no data in it; see the module docs for why it is
/// served without the token).
pub async fn dashboard() -> Response {
    let csp = HeaderValue::from_str(&DASHBOARD_CSP)
        .unwrap_or_else(|_| HeaderValue::from_static("default-src 'none'"));
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            ),
            (header::CONTENT_SECURITY_POLICY, csp),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
            (
                header::REFERRER_POLICY,
                HeaderValue::from_static("no-referrer"),
            ),
        ],
        DASHBOARD_HTML,
    )
        .into_response()
}

/// `GET /admin`: to `/admin/`, where the page's relative API paths resolve under `/admin/`.
pub async fn dashboard_redirect() -> Redirect {
    Redirect::permanent("/admin/")
}

#[derive(Deserialize)]
pub struct UsageQuery {
    client: Option<String>,
    days: Option<u32>,
}

/// `GET /admin/usage[?client=ID][&days=N]`: per client, usage per window, limits, remaining,
/// spend, and the last `days` (default 14) days.
pub async fn usage(
    State(state): State<AppState>,
    query: Result<Query<UsageQuery>, QueryRejection>,
) -> Response {
    // axum's own rejection is plain text; every error here is OpenAI-shaped.
    let Ok(Query(query)) = query else {
        return ApiError::invalid_request(
            "The query string is invalid: `client` is a client id and `days` a whole number of days.",
            Some("days"),
        )
        .into_response();
    };
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dashboard_is_one_self_contained_file() {
        assert_eq!(DASHBOARD_HTML.matches("<script").count(), 1);
        assert_eq!(DASHBOARD_HTML.matches("<style").count(), 1);
        for external in ["http://", "https://", "src=", "@import", "url("] {
            // The SVG namespace URI is an identifier, not a fetch.
            let uses = DASHBOARD_HTML
                .matches(external)
                .count()
                .saturating_sub(usize::from(external == "http://"));
            assert_eq!(uses, 0, "the dashboard references `{external}`");
        }
        assert!(DASHBOARD_HTML.contains("http://www.w3.org/2000/svg"));
        // The token goes in a header, never a URL.
        assert!(!DASHBOARD_HTML.contains("?token"));
        assert!(DASHBOARD_HTML.contains("sessionStorage"));
    }

    #[test]
    fn the_csp_allows_exactly_the_inline_script_and_style() {
        let script = DASHBOARD_HTML
            .split_once("<script>")
            .and_then(|(_, r)| r.split_once("</script>"))
            .unwrap()
            .0;
        let hash = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(script));
        assert!(DASHBOARD_CSP.contains(&format!("script-src 'sha256-{hash}'")));
        assert!(DASHBOARD_CSP.starts_with("default-src 'none';"));
        assert!(DASHBOARD_CSP.contains("connect-src 'self'"));
    }
}
