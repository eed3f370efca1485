//! `POST /v1/images/generations`: a synchronous generation, or with `"async": true` a task.

use axum::Extension;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::JsonObject;
use super::tasks::task_response;
use crate::app::AppState;
use crate::auth::AuthenticatedClient;
use crate::error::ApiError;
use crate::generate::{Created, Options, Trace, create_generation as create};

/// Set on every generation answer (names parsed once, at compile time).
const UPSTREAM_REQUEST_ID: HeaderName = HeaderName::from_static("x-upstream-request-id");
const CACHE_OUTCOME: HeaderName = HeaderName::from_static("x-imagegate-cache");

/// Longest `Idempotency-Key` accepted (Stripe's limit; keys are usually UUIDs).
const MAX_IDEMPOTENCY_KEY: usize = 255;

pub async fn create_generation(
    State(state): State<AppState>,
    Extension(client): Extension<AuthenticatedClient>,
    headers: HeaderMap,
    body: Result<JsonObject, ApiError>,
) -> Response {
    let mut trace = Trace::default();
    let cache_control = cache_control(&headers);
    let idempotency_key = idempotency_key(&headers).map(|key| key.map(str::to_owned));
    // The header values are slices of the connection's read buffer: dropped before the
    // generation is awaited, so that buffer is not kept alive for the seconds an image takes.
    drop(headers);
    let result = match (body, idempotency_key) {
        (Ok(JsonObject(body)), Ok(idempotency_key)) => {
            let options = Options {
                cache_control: cache_control.as_deref(),
                idempotency_key: idempotency_key.as_deref(),
            };
            create(&state, &client, &body, options, &mut trace).await
        }
        (Err(e), _) | (_, Err(e)) => Err(e),
    };
    let mut response = match result {
        Ok(Created::Image(generated)) => {
            // The upstream's bytes go out as they came: no parse-and-reserialise of b64 images.
            let mut response = (StatusCode::OK, generated.response.body).into_response();
            let headers = response.headers_mut();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            if let Some(id) = generated.response.upstream_request_id {
                headers.insert(UPSTREAM_REQUEST_ID, id);
            }
            response
        }
        Ok(Created::Task(submitted)) => {
            let mut response = task_response(StatusCode::ACCEPTED, &submitted.view);
            let headers = response.headers_mut();
            if let Ok(location) = HeaderValue::try_from(format!("/v1/tasks/{}", submitted.id)) {
                headers.insert(header::LOCATION, location);
            }
            if submitted.replayed {
                headers.insert("idempotent-replayed", HeaderValue::from_static("true"));
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
        headers.insert(CACHE_OUTCOME, HeaderValue::from_static(cache));
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

/// The `Idempotency-Key` header: 1–255 visible ASCII characters, or absent.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<&str>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    match value.to_str() {
        Ok(key)
            if !key.is_empty()
                && key.len() <= MAX_IDEMPOTENCY_KEY
                && key.bytes().all(|b| b.is_ascii_graphic()) =>
        {
            Ok(Some(key))
        }
        _ => Err(ApiError::invalid_request(
            format!(
                "The Idempotency-Key header must be 1 to {MAX_IDEMPOTENCY_KEY} visible ASCII characters."
            ),
            None,
        )
        .with_code("invalid_idempotency_key")),
    }
}
