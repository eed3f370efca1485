//! The generation pipeline, in the order a request goes through it.
//!
//! validate → upstream, for now. Later stages (cache lookup, quota reservation, usage commit,
//! cache insert) slot into this one function in that order, so the whole path stays readable
//! top to bottom.

use std::sync::Arc;

use serde_json::{Map, Value};

use crate::app::Gateway;
use crate::auth::AuthenticatedClient;
use crate::error::ApiError;
use crate::telemetry::{RequestFacts, loggable_prompt};
use crate::upstream::UpstreamResponse;
use crate::validate::validate;

/// Runs one synchronous generation for `client`. Facts for the request log are recorded in
/// `facts` as they become known, so a failure still logs how far the request got.
pub async fn generate(
    gateway: &Gateway,
    client: &AuthenticatedClient,
    body: &Map<String, Value>,
    facts: &mut RequestFacts,
) -> Result<UpstreamResponse, ApiError> {
    let runtime = gateway.runtime();
    let request = validate(body, &runtime.models, client)?;
    facts.model = Some(Arc::from(request.model.name()));
    facts.prompt = loggable_prompt(runtime.config.log.prompts, &request.prompt);
    if request.is_async {
        return Err(ApiError::invalid_request(
            "async: true is not available on this gateway yet; omit it for a synchronous answer",
            Some("async"),
        ));
    }

    let response = runtime
        .upstreams
        .generate(&request, client.id.as_str())
        .await
        .map_err(|e| {
            tracing::warn!(error = %e, kind = e.kind(), "upstream call failed");
            ApiError::from(e)
        })?;
    facts.upstream = Some(Arc::clone(&response.upstream));
    facts.upstream_key = Some(Arc::clone(&response.key_id));
    facts.images = Some(response.images);
    Ok(response)
}
