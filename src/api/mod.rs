//! The HTTP boundary: handlers, the JSON body extractor, client authentication middleware and
//! the JSON fallbacks. Everything here translates between HTTP and the domain modules; no
//! domain rule lives here.

pub mod admin;
pub mod images;
pub mod models;
pub mod tasks;

use axum::body::Bytes;
use axum::extract::{FromRequest, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value};

use crate::app::AppState;
use crate::error::ApiError;
use crate::telemetry::RequestFacts;

/// A request body that is a JSON object. Every way a body can fail to be one (wrong content
/// type, too large, empty, not JSON, not an object) becomes an OpenAI-shaped [`ApiError`].
pub struct JsonObject(pub Map<String, Value>);

impl FromRequest<AppState> for JsonObject {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, ApiError> {
        let is_json = request
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"));
        if !is_json {
            return Err(ApiError::unsupported_media_type());
        }
        let bytes = Bytes::from_request(request, state)
            .await
            .map_err(|rejection| {
                if rejection.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::request_too_large(state.server.max_body_bytes)
                } else {
                    ApiError::invalid_request("The request body could not be read.", None)
                }
            })?;
        if bytes.trim_ascii().is_empty() {
            return Err(ApiError::invalid_request(
                "The request body is empty; expected a JSON object.",
                None,
            ));
        }
        match serde_json::from_slice::<Value>(&bytes) {
            Ok(Value::Object(map)) => Ok(JsonObject(map)),
            Ok(_) => Err(ApiError::invalid_request(
                "The request body must be a JSON object.",
                None,
            )),
            Err(e) => Err(ApiError::invalid_request(
                format!(
                    "The request body is not valid JSON (line {}, column {}).",
                    e.line(),
                    e.column()
                ),
                None,
            )),
        }
    }
}

/// Authenticates the client key before the handler (and before the body is read), and names
/// the client in the request's log facts.
pub async fn require_client(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    let client = match state.runtime().clients.authenticate(
        request
            .headers()
            .get(header::AUTHORIZATION)
            .map(|v| v.as_bytes()),
    ) {
        Ok(client) => client,
        Err(e) => return e.into_response(),
    };
    let id = client.id.clone();
    request.extensions_mut().insert(client);
    let mut response = next.run(request).await;
    let extensions = response.extensions_mut();
    match extensions.get_mut::<RequestFacts>() {
        Some(facts) => facts.client = Some(id),
        None => {
            extensions.insert(RequestFacts {
                client: Some(id),
                ..RequestFacts::default()
            });
        }
    }
    response
}

/// Lets only the admin token through to `/admin` routes. Without a configured token, nobody.
pub async fn require_admin(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    let allowed = match (presented, &state.runtime().admin_token) {
        (Some(token), Some(expected)) => {
            use secrecy::ExposeSecret;
            use subtle::ConstantTimeEq;
            bool::from(token.as_bytes().ct_eq(expected.expose_secret().as_bytes()))
        }
        _ => false,
    };
    if !allowed {
        return ApiError::invalid_admin_token().into_response();
    }
    next.run(request).await
}

pub async fn route_not_found() -> ApiError {
    ApiError::route_not_found()
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::method_not_allowed()
}
