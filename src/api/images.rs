//! `POST /v1/images/generations`.

use axum::Extension;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::JsonObject;
use crate::app::AppState;
use crate::auth::AuthenticatedClient;
use crate::error::ApiError;
use crate::generate::generate;
use crate::telemetry::RequestFacts;

pub async fn create_generation(
    State(state): State<AppState>,
    Extension(client): Extension<AuthenticatedClient>,
    body: Result<JsonObject, ApiError>,
) -> Response {
    let mut facts = RequestFacts::default();
    let result = match body {
        Ok(JsonObject(body)) => generate(&state, &client, &body, &mut facts).await,
        Err(e) => Err(e),
    };
    let mut response = match result {
        Ok(generated) => {
            // The upstream's bytes go out as they came: no parse-and-reserialise of b64 images.
            let mut response = (StatusCode::OK, generated.body).into_response();
            let headers = response.headers_mut();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            if let Some(id) = generated.upstream_request_id {
                headers.insert("x-upstream-request-id", id);
            }
            response
        }
        Err(e) => e.into_response(),
    };
    response.extensions_mut().insert(facts);
    response
}
