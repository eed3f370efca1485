//! `POST /v1/images/generations`.

use axum::Extension;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::JsonObject;
use crate::app::AppState;
use crate::auth::AuthenticatedClient;
use crate::error::ApiError;
use crate::generate::{Trace, generate};

pub async fn create_generation(
    State(state): State<AppState>,
    Extension(client): Extension<AuthenticatedClient>,
    headers: HeaderMap,
    body: Result<JsonObject, ApiError>,
) -> Response {
    let mut trace = Trace::default();
    let cache_control = cache_control(&headers);
    let result = match body {
        Ok(JsonObject(body)) => {
            generate(&state, &client, &body, cache_control.as_deref(), &mut trace).await
        }
        Err(e) => Err(e),
    };
    let mut response = match result {
        Ok(generated) => {
            // The upstream's bytes go out as they came: no parse-and-reserialise of b64 images.
            let mut response = (StatusCode::OK, generated.response.body).into_response();
            let headers = response.headers_mut();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            if let Some(id) = generated.response.upstream_request_id {
                headers.insert("x-upstream-request-id", id);
            }
            response
        }
        Err(e) => e.into_response(),
    };
    let headers = response.headers_mut();
    if let Some(rate) = &trace.rate_headers {
        rate.apply(headers);
    }
    if let Some(cache) = trace.facts.cache {
        headers.insert("x-imagegate-cache", HeaderValue::from_static(cache));
    }
    response.extensions_mut().insert(trace.facts);
    response
}

/// Every `Cache-Control` line joined, as one directive list.
fn cache_control(headers: &HeaderMap) -> Option<String> {
    let values: Vec<&str> = headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    (!values.is_empty()).then(|| values.join(","))
}
