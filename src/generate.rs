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
//! `"async": true` splits the same pipeline in two. [`submit`] does steps 1–2 and the quota
//! reservation (held by the new task's id), stores the task durably and answers 202; later a
//! worker runs [`run_task`]: the request is validated again against the config of that moment,
//! then step 3 and the upstream call (or, for a `tasks = "native"` upstream, the upstream's own
//! async submit and a poller), and the task records the outcome and settles its reservation.
//!
//! Every stage is a call into the module that owns it; this file only fixes the order.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use tracing::Instrument;

use crate::app::{Gateway, Runtime};
use crate::auth::{AuthenticatedClient, Client};
use crate::cache::{CacheOutcome, CachePolicy};
use crate::config::TaskMode;
use crate::error::ApiError;
use crate::rate_limit::{Admission, RateHeaders, RateLimitError};
use crate::storage::StorageError;
use crate::tasks::{Inserted, Job, NativeRef, TaskId, TaskRecord, TaskState, TaskView, unix_now};
use crate::telemetry::metrics::{CacheLabels, RateLimitedLabels};
use crate::telemetry::{RequestFacts, loggable_prompt};
use crate::upstream::{UpstreamResponse, forwarded_body};
use crate::usage::{ReserveError, ReserveRequest};
use crate::validate::{ValidRequest, validate};

/// What the client sent besides the body.
#[derive(Debug, Default, Clone, Copy)]
pub struct Options<'a> {
    /// `Cache-Control`, every line joined.
    pub cache_control: Option<&'a str>,
    /// `Idempotency-Key` (async submits).
    pub idempotency_key: Option<&'a str>,
}

/// What a generation request produced.
pub enum Created {
    /// A synchronous answer.
    Image(Generated),
    /// An async task (new, or the one an `Idempotency-Key` already named).
    Task(Submitted),
}

/// An accepted async task.
pub struct Submitted {
    pub id: TaskId,
    /// The task as its client sees it now.
    pub view: TaskView,
    /// The `Idempotency-Key` named this task already; nothing new was queued or spent.
    pub replayed: bool,
}

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

/// `POST /v1/images/generations` for `client`: a synchronous generation, or with
/// `"async": true` a task.
pub async fn create_generation(
    gateway: &Gateway,
    client: &AuthenticatedClient,
    body: &Map<String, Value>,
    options: Options<'_>,
    trace: &mut Trace,
) -> Result<Created, ApiError> {
    let runtime = gateway.runtime();
    let request = validate(body, &runtime.models, client)?;
    trace.facts.model = Some(Arc::from(request.model.name()));
    trace.facts.prompt = loggable_prompt(runtime.config.log.prompts, &request.prompt);
    if request.is_async {
        // Boxed so that the (rarer, larger) async path does not size every sync request's
        // future.
        Box::pin(submit(
            gateway, &runtime, client, body, &request, options, trace,
        ))
        .await
        .map(Created::Task)
    } else {
        generate(gateway, &runtime, client, request, options, trace)
            .await
            .map(Created::Image)
    }
}

/// The client's rate limits for one request of `images` images: both dimensions and a
/// concurrency slot, atomically; a refusal consumes nothing.
fn admit(
    gateway: &Gateway,
    client: &AuthenticatedClient,
    images: u32,
    trace: &mut Trace,
) -> Result<Admission, ApiError> {
    let admission = gateway.limits.admit(&client.id, images).map_err(|e| {
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
    trace.rate_headers = Some(admission.headers.clone());
    Ok(admission)
}

/// The quota `request` claims for `client`: `n` images at the model's price for its quality,
/// held by `holder` across restarts when it is an async task.
fn quota_claim<'a>(
    client: &'a Client,
    request: &'a ValidRequest,
    holder: Option<&'a str>,
) -> ReserveRequest<'a> {
    ReserveRequest {
        client: client.id.as_str(),
        limits: &client.limits,
        model: request.model.name(),
        size: &request.size,
        quality: &request.quality,
        images: request.n,
        unit_price: request.model.price(&request.quality),
        holder,
    }
}

fn reserve_error(e: ReserveError) -> ApiError {
    if let ReserveError::Unavailable(cause) = &e {
        tracing::error!(error = %cause, "quota reservation could not be made durable; request refused");
    }
    ApiError::from(e)
}

/// Runs one synchronous generation for `client`.
async fn generate(
    gateway: &Gateway,
    runtime: &Arc<Runtime>,
    client: &AuthenticatedClient,
    request: ValidRequest,
    options: Options<'_>,
    trace: &mut Trace,
) -> Result<Generated, ApiError> {
    let admission = admit(gateway, client, request.n, trace)?;
    let policy = CachePolicy::from_request(
        options.cache_control,
        client.limits.cache,
        runtime.config.cache.enabled,
    );
    let key = gateway.cache.key(&request, &client.id);
    // Boxed: an async block's whole state machine would otherwise be laid out inline in this
    // request's future too (it is moved out into the generation task, but its space stays),
    // about 9 KiB per request in flight for nothing.
    let work = {
        let runtime = Arc::clone(runtime);
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
                .reserve(quota_claim(&client, &request, None))
                .await
                .map_err(reserve_error)?;
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
            // Settled now, durable a moment later: the answer does not wait for the fsync
            // (the reservation on disk already covers these images if the process dies).
            reservation.commit_unwaited(produced);
            metrics.count_images(client.id.as_str(), &request, produced);
            Ok(response)
        }
        .instrument(tracing::Span::current())
        .boxed()
    };
    let (result, outcome) = gateway.cache.get_or_generate(key, policy, work).await;
    trace.facts.cache = Some(outcome.as_str());
    count_cache_outcome(gateway, outcome);
    let response = result?;
    if matches!(outcome, CacheOutcome::Hit | CacheOutcome::Coalesced) {
        gateway.ledger.record_cached(
            client.id.as_str(),
            request.model.name(),
            &request.size,
            &request.quality,
            u32::try_from(response.images).unwrap_or(u32::MAX),
        );
    }
    trace.facts.upstream = Some(Arc::clone(&response.upstream));
    trace.facts.upstream_key = Some(Arc::clone(&response.key_id));
    trace.facts.images = Some(response.images);
    Ok(Generated {
        response,
        cache: outcome,
    })
}

fn count_cache_outcome(gateway: &Gateway, outcome: CacheOutcome) {
    gateway
        .metrics
        .cache_requests
        .get_or_create(&CacheLabels {
            outcome: outcome.as_str(),
        })
        .inc();
}

/// What tells one idempotent request from another: the model and everything forwarded.
fn request_hash(request: &ValidRequest) -> [u8; 32] {
    let mut hash = Sha256::new();
    hash.update(request.model.name().as_bytes());
    hash.update([0]);
    hash.update(forwarded_body(request));
    hash.finalize().into()
}

fn task_storage_error(e: StorageError) -> ApiError {
    tracing::error!(error = %e, "task storage failed");
    ApiError::unavailable(
        "task_storage_unavailable",
        "Async tasks cannot be stored right now; retry shortly.",
    )
    .with_retry_after(Duration::from_secs(5))
}

/// The answer for a submit whose `Idempotency-Key` already names `existing`.
fn replay(
    gateway: &Gateway,
    existing: &TaskRecord,
    hash: &[u8; 32],
) -> Result<Submitted, ApiError> {
    if existing.request_hash != *hash {
        return Err(ApiError::idempotency_conflict());
    }
    Ok(Submitted {
        id: existing.id.clone(),
        view: gateway.tasks.view_of(existing),
        replayed: true,
    })
}

/// The front half of an async request: rate limits and a quota reservation exactly as for a
/// sync one, then a durable task and a place in the queue. A refused submit creates nothing
/// and spends nothing.
async fn submit(
    gateway: &Gateway,
    runtime: &Runtime,
    client: &AuthenticatedClient,
    body: &Map<String, Value>,
    request: &ValidRequest,
    options: Options<'_>,
    trace: &mut Trace,
) -> Result<Submitted, ApiError> {
    let tasks = &gateway.tasks;
    let hash = request_hash(request);
    // A replay answers before any limit is consulted: it starts nothing.
    if let Some(key) = options.idempotency_key
        && let Some(existing) = tasks
            .find_idempotent(client.id.as_str(), key)
            .await
            .map_err(task_storage_error)?
    {
        return replay(gateway, &existing, &hash);
    }
    // The concurrency slot covers the submit only: once accepted, a task waits for a worker
    // (`tasks.workers` bound how many run) rather than holding the client's in-flight slot.
    let admission = admit(gateway, client, request.n, trace)?;
    drop(admission.permit);
    let place = tasks
        .reserve_place()
        .ok_or_else(|| ApiError::task_queue_full(tasks.retry_hint()))?;
    let id = TaskId::generate();
    let reservation = gateway
        .ledger
        .reserve(quota_claim(client, request, Some(id.as_str())))
        .await
        .map_err(reserve_error)?;
    let policy = CachePolicy::from_request(
        options.cache_control,
        client.limits.cache,
        runtime.config.cache.enabled,
    );
    let mut stored = body.clone();
    stored.remove("async");
    let record = TaskRecord {
        id: id.clone(),
        client: client.id.to_string(),
        state: TaskState::Queued,
        mode: runtime.upstreams.task_mode(request),
        request: Value::Object(stored).to_string(),
        cache_read: policy.read,
        cache_store: policy.store,
        idempotency_key: options.idempotency_key.map(str::to_owned),
        request_hash: hash,
        attempts: 0,
        native: None,
        images: None,
        result: None,
        error: None,
        created_at: unix_now(),
        started_at: None,
        finished_at: None,
        expires_at: None,
    };
    match tasks.insert(record.clone()).await {
        Ok(Inserted::Created) => {
            let view = tasks.view_of(&record);
            tasks.enqueue(
                place,
                Job {
                    record,
                    reservation: Some(reservation),
                    queued_at: Instant::now(),
                },
            );
            Ok(Submitted {
                id,
                view,
                replayed: false,
            })
        }
        Ok(Inserted::Existing(existing)) => {
            // A concurrent submit with the same key stored its task first.
            if let Err(e) = reservation.release().await {
                tracing::error!(error = %e, "release of a duplicate submit's reservation not recorded");
            }
            replay(gateway, &existing, &hash)
        }
        Err(e) => {
            if let Err(e) = reservation.release().await {
                tracing::error!(error = %e, "release of an unstored task's reservation not recorded");
            }
            Err(task_storage_error(e))
        }
    }
}

/// The back half of an async request, on a worker: see the module docs.
pub async fn run_task(gateway: &Arc<Gateway>, mut job: Job) {
    let tasks = &gateway.tasks;
    let runtime = gateway.runtime();
    // On behalf of the client that submitted it, under the rules of now: a client or model
    // removed by a reload since the submit fails the task rather than running unchecked.
    let Some(client) = runtime.clients.client(&job.record.client).cloned() else {
        let error = ApiError::invalid_request(
            "The client that submitted this task is no longer configured.",
            None,
        )
        .with_code("client_not_found");
        tasks.fail(job, &error).await;
        return;
    };
    let request = match serde_json::from_str::<Map<String, Value>>(&job.record.request) {
        Ok(body) => validate(&body, &runtime.models, &client),
        Err(e) => {
            tracing::error!(task = %job.record.id, error = %e, "stored task request is not JSON");
            Err(ApiError::internal())
        }
    };
    let request = match request {
        Ok(request) => request,
        Err(e) => {
            tasks.fail(job, &e).await;
            return;
        }
    };
    if let Err(e) = tasks.start_job(&job).await {
        // Without a durable `processing` mark the task is left as it is on disk; it runs at
        // the next start (its reservation stays held for it).
        tracing::error!(task = %job.record.id, error = %e, "could not start a task");
        return;
    }

    if let Some(native) = job.record.native.clone() {
        tasks.spawn_poller(gateway, job, request, native);
        return;
    }
    if job.record.mode == TaskMode::Native {
        match runtime
            .upstreams
            .submit_task(&request, client.id.as_str())
            .await
        {
            Ok(accepted) => {
                let native = NativeRef {
                    upstream: accepted.upstream.to_string(),
                    key_id: accepted.key_id.to_string(),
                    upstream_task_id: accepted.upstream_task_id,
                };
                if let Err(e) = tasks.set_native(&mut job, native.clone()).await {
                    // Polling goes on from memory; only a restart would lose track of it.
                    tracing::error!(task = %job.record.id, error = %e, "could not record a native task's upstream id");
                    job.record.native = Some(native.clone());
                }
                tasks.spawn_poller(gateway, job, request, native);
            }
            Err(e) => {
                tracing::warn!(task = %job.record.id, error = %e, kind = e.kind(), "native task submit failed");
                tasks.fail(job, &ApiError::from(e)).await;
            }
        }
        return;
    }

    // Gateway mode: the sync pipeline from the cache on; the quota is already reserved.
    let policy = CachePolicy {
        read: job.record.cache_read,
        store: job.record.cache_store,
    };
    let key = gateway.cache.key(&request, &client.id);
    let work = {
        let runtime = Arc::clone(&runtime);
        let request = request.clone();
        let client = client.id.clone();
        async move {
            runtime
                .upstreams
                .generate(&request, client.as_str())
                .await
                .map_err(|e| {
                    tracing::warn!(error = %e, kind = e.kind(), "upstream call for a task failed");
                    ApiError::from(e)
                })
        }
        .instrument(tracing::info_span!("task", id = %job.record.id))
    };
    let (result, outcome) = gateway.cache.get_or_generate(key, policy, work).await;
    count_cache_outcome(gateway, outcome);
    match result {
        Ok(response) => {
            let from_cache = matches!(outcome, CacheOutcome::Hit | CacheOutcome::Coalesced);
            tasks
                .complete(job, &request, &response, from_cache, gateway)
                .await;
        }
        Err(e) => tasks.fail(job, &e).await,
    }
}
