//! The generation pipeline, in the order a request goes through it:
//!
//! 1. validate: the body against the model's rules and the client's rights;
//! 2. admit: the client's rate limits (requests, images, concurrency), atomically;
//! 3. cache: serve an identical earlier answer, or join an identical call in flight;
//! 4. otherwise, in its own task so a client disconnect cannot cut it short:
//!    quota reserve (durable before the upstream is called) → upstream (key pool, retries,
//!    failover) → usage commit of what was produced, or refund → the cache stores a success.
//!
//! A cache hit or a coalesced answer spends no quota; it is recorded as cached usage.
//!
//! Every stage is a call into the module that owns it; this file only fixes the order.

use std::sync::Arc;

use serde_json::{Map, Value};
use tracing::Instrument;

use crate::app::Gateway;
use crate::auth::AuthenticatedClient;
use crate::cache::{CacheOutcome, CachePolicy};
use crate::error::ApiError;
use crate::rate_limit::{RateHeaders, RateLimitError};
use crate::telemetry::metrics::{CacheLabels, ImageLabels, RateLimitedLabels};
use crate::telemetry::{RequestFacts, loggable_prompt};
use crate::upstream::UpstreamResponse;
use crate::usage::{ReserveError, ReserveRequest};
use crate::validate::validate;

/// A finished generation and how it was obtained.
pub struct Generated {
    pub response: UpstreamResponse,
    pub cache: CacheOutcome,
}

/// What the HTTP layer needs besides the result: the rate-limit headers (on successes and
/// failures alike) and facts for the request log, recorded as they become known so a failure
/// still logs how far the request got.
#[derive(Default)]
pub struct Trace {
    pub facts: RequestFacts,
    pub rate_headers: Option<RateHeaders>,
}

/// Runs one synchronous generation for `client`.
pub async fn generate(
    gateway: &Gateway,
    client: &AuthenticatedClient,
    body: &Map<String, Value>,
    cache_control: Option<&str>,
    trace: &mut Trace,
) -> Result<Generated, ApiError> {
    let runtime = gateway.runtime();
    let request = validate(body, &runtime.models, client)?;
    trace.facts.model = Some(Arc::from(request.model.name()));
    trace.facts.prompt = loggable_prompt(runtime.config.log.prompts, &request.prompt);
    if request.is_async {
        return Err(ApiError::invalid_request(
            "async: true is not available on this gateway yet; omit it for a synchronous answer",
            Some("async"),
        ));
    }

    let admission = gateway.limits.admit(&client.id, request.n).map_err(|e| {
        trace.rate_headers = e.headers().cloned();
        if let RateLimitError::Limited { limit, .. } = &e {
            gateway
                .metrics
                .rate_limited
                .get_or_create(&RateLimitedLabels {
                    client: client.id.to_string(),
                    limit: limit.as_str(),
                })
                .inc();
        }
        ApiError::from(e)
    })?;
    trace.rate_headers = Some(admission.headers);

    let policy = CachePolicy::from_request(
        cache_control,
        client.limits.cache,
        runtime.config.cache.enabled,
    );
    let key = gateway.cache.key(&request, &client.id);
    let work = {
        let runtime = Arc::clone(&runtime);
        let metrics = Arc::clone(&gateway.metrics);
        let ledger = gateway.ledger.clone();
        let client = AuthenticatedClient::clone(client);
        let request = request.clone();
        let permit = admission.permit;
        async move {
            // The client's concurrency slot stays taken until the upstream call is over, even
            // if the client has gone.
            let _permit = permit;
            let reservation = ledger
                .reserve(ReserveRequest {
                    client: client.id.as_str(),
                    limits: &client.limits,
                    model: request.model.name(),
                    size: &request.size,
                    quality: &request.quality,
                    images: request.n,
                    unit_price: request.model.price(&request.quality),
                })
                .await
                .map_err(|e| {
                    if let ReserveError::Unavailable(cause) = &e {
                        tracing::error!(error = %cause, "quota reservation could not be made durable; request refused");
                    }
                    ApiError::from(e)
                })?;
            let response = match runtime.upstreams.generate(&request, client.id.as_str()).await {
                Ok(response) => response,
                Err(e) => {
                    tracing::warn!(error = %e, kind = e.kind(), "upstream call failed");
                    if let Err(refund) = reservation.refund().await {
                        tracing::error!(error = %refund, "refund not recorded; it is settled as charged on restart");
                    }
                    return Err(ApiError::from(e));
                }
            };
            let produced = u32::try_from(response.images).unwrap_or(u32::MAX);
            if let Err(e) = reservation.commit(produced).await {
                // The client still gets its images: the reservation stays on disk and is
                // charged in full on the next start, so usage is never under-counted.
                tracing::error!(error = %e, "usage commit not recorded; charged on restart");
            }
            let client_id = &client.id;
            metrics
                .images
                .get_or_create(&ImageLabels {
                    client: client_id.to_string(),
                    model: request.model.name().to_owned(),
                    size: request.size.clone(),
                    quality: request.quality.clone(),
                })
                .inc_by(response.images as u64);
            Ok(response)
        }
        .instrument(tracing::Span::current())
    };
    let (result, outcome) = gateway.cache.get_or_generate(key, policy, work).await;
    trace.facts.cache = Some(outcome.as_str());
    gateway
        .metrics
        .cache_requests
        .get_or_create(&CacheLabels {
            outcome: outcome.as_str(),
        })
        .inc();
    let response = result?;
    if matches!(outcome, CacheOutcome::Hit | CacheOutcome::Coalesced) {
        gateway
            .ledger
            .record_cached(
                client.id.as_str(),
                request.model.name(),
                &request.size,
                &request.quality,
                u32::try_from(response.images).unwrap_or(u32::MAX),
            )
            .await;
    }
    trace.facts.upstream = Some(Arc::clone(&response.upstream));
    trace.facts.upstream_key = Some(Arc::clone(&response.key_id));
    trace.facts.images = Some(response.images);
    Ok(Generated {
        response,
        cache: outcome,
    })
}
