//! Route tables and the middleware stack, composed in one place.
//!
//! Outermost first, each layer sees what the ones before it set up:
//! request id → request log → panic catcher → request timeout → body limit → client auth
//! → handler. Rate limits and quotas are part of the generation pipeline, after auth.

use std::any::Any;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::middleware::{Next, from_fn, from_fn_with_state};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;

use crate::api::{self, admin, images, models, tasks};
use crate::app::AppState;
use crate::error::ApiError;
use crate::telemetry::http::{log_request, request_id};

/// The public, OpenAI-compatible listener. Every route requires a client key.
pub fn public(state: AppState) -> Router {
    let max_body = state.server.max_body_bytes;
    Router::new()
        .route("/v1/images/generations", post(images::create_generation))
        .route("/v1/models", get(models::list_models))
        .route("/v1/models/{id}", get(models::get_model))
        .route("/v1/tasks/{id}", get(tasks::get_task))
        // Only matched routes authenticate: unknown paths answer 404 without revealing more.
        .route_layer(from_fn_with_state(state.clone(), api::require_client))
        .fallback(api::route_not_found)
        .method_not_allowed_fallback(api::method_not_allowed)
        .layer(
            ServiceBuilder::new()
                // First, so the log line, errors and the response all carry the same id.
                .layer(from_fn(request_id))
                // Outside the panic catcher and the timeout, so those requests are logged too.
                .layer(from_fn_with_state(Arc::clone(&state.metrics), log_request))
                // A handler panic becomes an OpenAI-shaped 500 instead of a dropped connection.
                .layer(CatchPanicLayer::custom(panic_response))
                // The whole request, including the upstream call; answers 504, never 408
                // (which SDKs retry blindly).
                .layer(from_fn_with_state(state.clone(), request_timeout))
                // Read by the body extractor, which turns an overrun into a JSON 413.
                .layer(DefaultBodyLimit::max(max_body)),
        )
        .with_state(state)
}

/// The admin listener: health, readiness and metrics for probes and Prometheus (open, like
/// every such endpoint; keep the listener private), the `/admin` JSON views behind the admin
/// token, and the dashboard page (static, no data; it asks for the token itself).
pub fn admin(state: AppState) -> Router {
    let protected = Router::new()
        .route("/admin/usage", get(admin::usage))
        .route("/admin/upstreams", get(admin::upstreams))
        .route_layer(from_fn_with_state(state.clone(), api::require_admin));
    // Who looked at the admin views (and who was refused) is logged like any request; probes
    // and scrapes are not, or they would drown the log every few seconds.
    let logged = Router::new()
        .route("/admin/", get(admin::dashboard))
        .route("/admin", get(admin::dashboard_redirect))
        .merge(protected)
        .route_layer(from_fn_with_state(Arc::clone(&state.metrics), log_request));
    Router::new()
        .route("/healthz", get(admin::healthz))
        .route("/readyz", get(admin::readyz))
        .route("/metrics", get(admin::metrics))
        .merge(logged)
        .fallback(api::route_not_found)
        .method_not_allowed_fallback(api::method_not_allowed)
        .layer(
            ServiceBuilder::new()
                .layer(from_fn(request_id))
                .layer(CatchPanicLayer::custom(panic_response)),
        )
        .with_state(state)
}

async fn request_timeout(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let limit = Duration::from_secs(state.server.request_timeout_secs);
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::request_timeout().into_response(),
    }
}

fn panic_response(panic: Box<dyn Any + Send + 'static>) -> Response {
    let detail = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_default();
    tracing::error!(panic = %detail, "handler panicked");
    ApiError::internal().into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    #[tokio::test]
    async fn a_panicking_handler_becomes_an_openai_shaped_500() {
        async fn boom() -> &'static str {
            panic!("boom")
        }
        let app = Router::new()
            .route("/boom", get(boom))
            .layer(CatchPanicLayer::custom(panic_response));
        let response = app
            .oneshot(Request::builder().uri("/boom").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), 500);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["error"]["type"], "server_error");
        assert!(
            !json.to_string().contains("boom"),
            "panic text stays in the logs"
        );
    }
}
