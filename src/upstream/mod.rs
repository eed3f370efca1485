//! The only HTTP client in the gateway: calls to OpenAI-compatible upstreams with the
//! server-held keys, over each upstream's key pool, with retries and failover.
//!
//! Owns: building the forwarded request from a [`ValidRequest`] (only the fields the model
//! allows, `model` mapped to `upstream_model`, `async` never forwarded), choosing a key through
//! the [`pool`], reading the answer with a size cap, checking it is an `ImagesResponse` without
//! re-serialising it, and turning every failure into an [`UpstreamError`] whose client-facing
//! form carries no upstream URL, key or raw body.
//!
//! Retry policy, per attempt outcome:
//! - 429: the key cools down for `Retry-After` and the request moves to another key at once;
//!   the client never sees that 429. It does not count as a retry (each 429 removes a key from
//!   rotation, so the moves are bounded by the pool size).
//! - 401/403: the key is disabled until a config reload; the request moves on likewise.
//! - 5xx, connection errors, resets: retried with exponential backoff and full jitter on another
//!   key or the next upstream of the model, at most `max_retries` times and only while the
//!   retry budget (20 % of recent requests, plus a small reserve) allows, so retries cannot
//!   multiply load during an outage. Repeated failures open the key's circuit.
//! - Timeouts after the request was sent are NOT retried: the upstream may still be generating,
//!   and bill, the image. The client gets 504 and decides.
//! - A malformed or oversized 2xx answer is not retried either (the image was made and billed).
//! - 400/413/422 (the upstream judged the request itself) go back to the client.
//!
//! Must not: forward any client header, follow redirects, or contact a host that is not a
//! configured `base_url`.

mod http;
pub mod pool;

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::http::{HeaderValue, StatusCode};
use bytes::Bytes;
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;

use crate::config::{Config, ConfigError, Secrets, TaskMode};
use crate::error::ApiError;
use crate::telemetry::metrics::{Metrics, UpstreamLabels, UpstreamOutcomeLabels};
use crate::validate::ValidRequest;
use pool::{KeyLease, KeyPool, PoolError, PoolKey, PoolStatus};

/// How long a key rests after a 429 that did not say.
const DEFAULT_COOLDOWN: Duration = Duration::from_secs(10);
/// First retry waits up to this (full jitter), doubling per retry.
const BACKOFF_BASE: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Longest a native task poll may take: it is a small read.
const POLL_TIMEOUT: Duration = Duration::from_secs(30);

/// One configured provider.
#[derive(Debug)]
pub struct Upstream {
    pub name: Arc<str>,
    generations_url: reqwest::Url,
    /// `{base_url}/tasks/`, for polling native tasks.
    tasks_url: reqwest::Url,
    /// Who runs `async: true` requests for models whose first upstream this is.
    pub tasks: TaskMode,
    pool: KeyPool,
    http: reqwest::Client,
    timeout: Duration,
    max_response_bytes: usize,
    max_retries: u32,
    /// Shared with the upstream of the same name in the config this one replaced (reload).
    budget: Arc<RetryBudget>,
}

/// Every configured upstream, in config order.
#[derive(Debug)]
pub struct Upstreams {
    list: Vec<Upstream>,
    metrics: Arc<Metrics>,
}

/// A successful generation, body untouched.
#[derive(Debug, Clone)]
pub struct UpstreamResponse {
    /// The upstream's `ImagesResponse`, byte for byte.
    pub body: Bytes,
    /// `data.len()` of that body.
    pub images: usize,
    pub upstream: Arc<str>,
    pub key_id: Arc<str>,
    /// The upstream's `x-request-id`, when it sent a well-formed one.
    pub upstream_request_id: Option<HeaderValue>,
}

/// A task the upstream accepted in its own async mode (`tasks = "native"`).
#[derive(Debug, Clone)]
pub struct NativeTask {
    pub upstream: Arc<str>,
    /// The key that created it: polls must use the same one.
    pub key_id: Arc<str>,
    /// The upstream's id for it; never shown to clients.
    pub upstream_task_id: String,
}

/// What a poll of a native task found.
#[derive(Debug)]
pub enum NativeStatus {
    /// Still queued or processing upstream, with the upstream's progress (0–99).
    Pending { progress: u8 },
    /// Done: the result as a plain `ImagesResponse` (the task fields stripped).
    Completed(UpstreamResponse),
    /// The upstream says the task failed, or can no longer tell (unknown task, key refused).
    /// Final: polling again would not help.
    Failed(UpstreamError),
}

/// What a successful answer must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// An `ImagesResponse` (a synchronous generation).
    Images,
    /// A task object with an id (a native async submit).
    Task,
}

/// Why an upstream call failed. `Display` is for logs: it never contains a URL, key or body.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream refused the request (HTTP {status}, code {code:?})")]
    Rejected { status: u16, code: Option<String> },
    #[error("upstream failed (HTTP {0})")]
    Status(u16),
    #[error("upstream did not answer in time")]
    Timeout,
    #[error("could not reach upstream: {0}")]
    Connect(String),
    #[error("upstream connection failed mid-request: {0}")]
    Transport(String),
    #[error("upstream answered with a body that is not an ImagesResponse")]
    BadResponse,
    #[error("upstream response exceeded {0} bytes")]
    TooLarge(usize),
    /// Every key is cooling down or busy beyond the queue's bounds.
    #[error("upstream capacity exhausted (retry after {retry_after:?})")]
    Busy { retry_after: Duration },
    /// Every key of every upstream of the model is disabled.
    #[error("every upstream key is disabled")]
    Unavailable,
    #[error("no upstream serves this model")]
    NoUpstream,
}

impl UpstreamError {
    /// A short label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            UpstreamError::Rejected { .. } => "upstream_rejected",
            UpstreamError::Status(_) => "upstream_status",
            UpstreamError::Timeout => "upstream_timeout",
            UpstreamError::Connect(_) => "upstream_connect",
            UpstreamError::Transport(_) => "upstream_transport",
            UpstreamError::BadResponse => "upstream_bad_response",
            UpstreamError::TooLarge(_) => "upstream_too_large",
            UpstreamError::Busy { .. } => "upstream_busy",
            UpstreamError::Unavailable => "upstream_unavailable",
            UpstreamError::NoUpstream => "no_upstream",
        }
    }
}

impl From<PoolError> for UpstreamError {
    fn from(e: PoolError) -> UpstreamError {
        match e {
            PoolError::AllDisabled => UpstreamError::Unavailable,
            PoolError::AllCooling { retry_after }
            | PoolError::QueueFull { retry_after }
            | PoolError::QueueTimeout { retry_after } => UpstreamError::Busy { retry_after },
        }
    }
}

impl From<UpstreamError> for ApiError {
    fn from(e: UpstreamError) -> ApiError {
        match e {
            UpstreamError::Rejected { status, code } => {
                // The upstream judged the request itself (e.g. a content policy). Its message
                // may echo internals, so only a recognisable code is passed on.
                let message = match code.as_deref() {
                    Some(code) => format!("The upstream provider rejected the request ({code})."),
                    None => format!("The upstream provider rejected the request (HTTP {status})."),
                };
                ApiError::invalid_request(message, None).with_code("upstream_rejected")
            }
            UpstreamError::Status(_) | UpstreamError::Connect(_) | UpstreamError::Transport(_) => {
                ApiError::upstream(
                    StatusCode::BAD_GATEWAY,
                    "upstream_error",
                    "The upstream provider failed to generate the image.",
                )
            }
            UpstreamError::BadResponse | UpstreamError::TooLarge(_) => ApiError::upstream(
                StatusCode::BAD_GATEWAY,
                "upstream_bad_response",
                "The upstream provider sent a response the gateway could not use.",
            ),
            UpstreamError::Timeout => ApiError::upstream(
                StatusCode::GATEWAY_TIMEOUT,
                "upstream_timeout",
                "The upstream provider did not answer in time.",
            ),
            UpstreamError::Busy { retry_after } => ApiError::unavailable(
                "upstream_busy",
                "The upstream provider is at capacity; retry after the delay in Retry-After.",
            )
            .with_retry_after(retry_after),
            UpstreamError::Unavailable => ApiError::unavailable(
                "upstream_unavailable",
                "No upstream credentials are currently usable. The operators have been told.",
            )
            .with_retry_after(Duration::from_secs(60)),
            UpstreamError::NoUpstream => {
                ApiError::unavailable("no_upstream", "No upstream is configured for this model.")
            }
        }
    }
}

/// Caps retries at a fraction of recent traffic (Finagle/linkerd style): every request
/// deposits 0.2 of a retry, every retry withdraws one, and the balance starts at a reserve of
/// 10 and is capped at 100, so a sustained outage cannot turn N requests into
/// N × (1 + max_retries) upstream calls: at most N × 1.2 + 10.
///
/// Counted in thousandths of a retry so the arithmetic is exact (five deposits are exactly one
/// retry, which a float sum of 0.2s is not guaranteed to be).
#[derive(Debug)]
struct RetryBudget {
    milli: Mutex<u32>,
}

impl RetryBudget {
    /// One retry.
    const RETRY: u32 = 1000;
    /// What each request deposits: 0.2 of a retry.
    const DEPOSIT: u32 = 200;
    /// The balance at start: 10 retries, so a cold gateway can still retry a blip.
    const RESERVE: u32 = 10 * Self::RETRY;
    /// The most that can be saved up: 100 retries.
    const CAP: u32 = 100 * Self::RETRY;

    fn new() -> Self {
        RetryBudget {
            milli: Mutex::new(Self::RESERVE),
        }
    }

    fn balance(&self) -> std::sync::MutexGuard<'_, u32> {
        self.milli
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn deposit(&self) {
        let mut b = self.balance();
        *b = (*b + Self::DEPOSIT).min(Self::CAP);
    }

    fn withdraw(&self) -> bool {
        let mut b = self.balance();
        match b.checked_sub(Self::RETRY) {
            Some(left) => {
                *b = left;
                true
            }
            None => false,
        }
    }
}

/// Full-jitter exponential backoff before retry number `retry` (1-based).
fn backoff(retry: u32) -> Duration {
    let cap = BACKOFF_BASE
        .saturating_mul(1 << retry.saturating_sub(1).min(10))
        .min(BACKOFF_MAX);
    cap.mul_f64(rand::random::<f64>())
}

/// One attempt's outcome, as the retry loop sees it.
enum Attempt {
    Done(UpstreamResponse),
    /// Try another key now (429, 401/403); the lease has been settled.
    MoveOn(UpstreamError),
    /// Retry later, if allowed (5xx, connection errors).
    Retry(UpstreamError),
    /// Give up (the client's problem, or unsafe to repeat).
    Fail(UpstreamError),
}

/// The body sent upstream: normalised values, only fields the model allows.
#[derive(Serialize)]
struct ForwardedRequest<'a> {
    model: &'a str,
    prompt: &'a str,
    size: &'a str,
    quality: &'a str,
    n: u32,
    response_format: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    style: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    background: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    output_format: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    output_compression: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    moderation: Option<&'a str>,
    /// The upstream's own async flag: set only for native task submits.
    #[serde(rename = "async", skip_serializing_if = "std::ops::Not::not")]
    is_async: bool,
}

impl<'a> ForwardedRequest<'a> {
    fn new(r: &'a ValidRequest) -> Self {
        ForwardedRequest {
            model: r.model.rules.upstream_model(),
            prompt: &r.prompt,
            size: &r.size,
            quality: &r.quality,
            n: r.n,
            response_format: r.response_format.as_str(),
            style: r.style.as_deref(),
            user: r.user.as_deref(),
            background: r.background.as_deref(),
            output_format: r.output_format.as_deref(),
            output_compression: r.output_compression,
            moderation: r.moderation.as_deref(),
            is_async: false,
        }
    }
}

/// The serialised forwarded body of `request`: what goes upstream, and what identifies the
/// request for caching.
pub fn forwarded_body(request: &ValidRequest) -> Vec<u8> {
    // Serialising a struct of strings and integers into a Vec cannot fail (serde_json errors
    // only on non-string map keys, failing Serialize impls, or I/O); the fallback is unreachable.
    serde_json::to_vec(&ForwardedRequest::new(request)).unwrap_or_default()
}

/// The forwarded body of a native async submit: [`forwarded_body`] plus `"async": true`.
fn forwarded_task_body(request: &ValidRequest) -> Vec<u8> {
    let mut forwarded = ForwardedRequest::new(request);
    forwarded.is_async = true;
    serde_json::to_vec(&forwarded).unwrap_or_default()
}

impl Upstreams {
    pub fn from_config(
        config: &Config,
        secrets: &Secrets,
        metrics: Arc<Metrics>,
    ) -> Result<Upstreams, ConfigError> {
        let mut list = Vec::with_capacity(config.upstreams.len());
        for (u, keys) in config.upstreams.iter().zip(&secrets.upstream_keys) {
            let base = u.base_url.trim_end_matches('/');
            let url = |path: &str| {
                reqwest::Url::parse(&format!("{base}/{path}")).map_err(|e| ConfigError::Invalid {
                    path: format!("upstreams.{}.base_url", u.name),
                    reason: e.to_string(),
                })
            };
            let generations_url = url("images/generations")?;
            let tasks_url = url("tasks/")?;
            let keys = u
                .keys
                .iter()
                .zip(keys)
                .map(|(k, secret)| {
                    Ok(PoolKey {
                        id: Arc::from(k.id.as_str()),
                        authorization: bearer(secret).map_err(|_| ConfigError::Secret {
                            what: format!("upstream `{}` key `{}`", u.name, k.id),
                            reason: "contains characters not allowed in an HTTP header".into(),
                        })?,
                        requests_per_minute: k.requests_per_minute,
                        max_concurrent: k.max_concurrent,
                    })
                })
                .collect::<Result<Vec<_>, ConfigError>>()?;
            let name: Arc<str> = Arc::from(u.name.as_str());
            list.push(Upstream {
                pool: KeyPool::new(
                    Arc::clone(&name),
                    keys,
                    u.max_queue,
                    Duration::from_secs(u.queue_timeout_secs),
                ),
                name,
                generations_url,
                tasks_url,
                tasks: u.tasks,
                http: http::client(Duration::from_secs(u.connect_timeout_secs)).map_err(|e| {
                    ConfigError::Invalid {
                        path: format!("upstreams.{}", u.name),
                        reason: format!("cannot build HTTP client: {}", e.without_url()),
                    }
                })?,
                timeout: Duration::from_secs(u.timeout_secs),
                max_response_bytes: u.max_response_bytes,
                max_retries: u.max_retries,
                budget: Arc::new(RetryBudget::new()),
            });
        }
        Ok(Upstreams { list, metrics })
    }

    pub fn iter(&self) -> impl Iterator<Item = &Upstream> {
        self.list.iter()
    }

    /// Whether any upstream has a key that is not disabled (for readiness).
    pub fn any_usable(&self) -> bool {
        self.list.iter().any(|u| u.pool.has_usable_key())
    }

    /// Key pool states, for ops.
    pub fn status(&self) -> Vec<PoolStatus> {
        self.list.iter().map(|u| u.pool.status()).collect()
    }

    /// Who runs `request` when it is submitted with `async: true`: the `tasks` mode of the
    /// model's first upstream.
    pub fn task_mode(&self, request: &ValidRequest) -> TaskMode {
        request
            .model
            .upstreams
            .first()
            .and_then(|&i| self.list.get(i))
            .map_or(TaskMode::Gateway, |u| u.tasks)
    }

    /// Generates `request` for `client` on the model's upstreams in failover order: keys of an
    /// upstream first (429 and refused keys move on at once), then the next upstream. Retries
    /// of failures are bounded by the first upstream's `max_retries` and by each upstream's
    /// retry budget.
    pub async fn generate(
        &self,
        request: &ValidRequest,
        client: &str,
    ) -> Result<UpstreamResponse, UpstreamError> {
        self.call(request, client, Expect::Images).await
    }

    /// Submits `request` with the upstream's own async flag, on the model's upstreams whose
    /// `tasks = "native"`, with the same key choice, retries and failover as
    /// [`generate`](Upstreams::generate).
    pub async fn submit_task(
        &self,
        request: &ValidRequest,
        client: &str,
    ) -> Result<NativeTask, UpstreamError> {
        let accepted = self.call(request, client, Expect::Task).await?;
        let upstream_task_id = native_task_id(&accepted.body).ok_or(UpstreamError::BadResponse)?;
        Ok(NativeTask {
            upstream: accepted.upstream,
            key_id: accepted.key_id,
            upstream_task_id,
        })
    }

    /// Asks the upstream that runs a native task how it is doing, with the key that created
    /// it. `Err` is a transient failure (poll again later); a final one is
    /// [`NativeStatus::Failed`].
    pub async fn poll_task(
        &self,
        upstream: &str,
        key_id: &str,
        upstream_task_id: &str,
    ) -> Result<NativeStatus, UpstreamError> {
        let Some(u) = self.list.iter().find(|u| &*u.name == upstream) else {
            return Ok(NativeStatus::Failed(UpstreamError::NoUpstream));
        };
        let Some(authorization) = u.pool.authorization_of(key_id) else {
            // The key was removed from the config: nobody else may ask for this task.
            return Ok(NativeStatus::Failed(UpstreamError::Unavailable));
        };
        u.poll(authorization, Arc::from(key_id), upstream_task_id)
            .await
    }

    async fn call(
        &self,
        request: &ValidRequest,
        client: &str,
        expect: Expect,
    ) -> Result<UpstreamResponse, UpstreamError> {
        let order: Vec<&Upstream> = request
            .model
            .upstreams
            .iter()
            .filter_map(|&i| self.list.get(i))
            .filter(|u| expect == Expect::Images || u.tasks == TaskMode::Native)
            .collect();
        let first = order.first().ok_or(UpstreamError::NoUpstream)?;
        let max_retries = first.max_retries;
        for u in &order {
            u.budget.deposit();
        }
        let body = Bytes::from(match expect {
            Expect::Images => forwarded_body(request),
            Expect::Task => forwarded_task_body(request),
        });
        let mut retries = 0;
        // A 429 or a refused key moves the request on without counting as a retry; bound
        // those moves too, so keys whose cooldowns expire as fast as the request cycles through
        // them cannot keep it going until its deadline.
        let mut moves = 0;
        let max_moves: usize = order.iter().map(|u| u.pool.key_count()).sum();
        let mut last: Option<UpstreamError> = None;
        let mut at = 0;
        while let Some(upstream) = order.get(at) {
            let lease = match upstream.pool.acquire(client).await {
                Ok(lease) => lease,
                Err(e) => {
                    // Nothing usable here now: fail over to the next upstream, if any.
                    let e = UpstreamError::from(e);
                    last = Some(prefer(last, e));
                    at += 1;
                    continue;
                }
            };
            let key_id = Arc::clone(&lease.key_id);
            let started = std::time::Instant::now();
            let attempt = upstream.attempt(lease, body.clone(), expect).await;
            self.record(upstream, &key_id, &attempt, started.elapsed());
            match attempt {
                Attempt::Done(response) => return Ok(response),
                Attempt::MoveOn(e) => {
                    moves += 1;
                    if moves >= max_moves.max(1) * 2 {
                        return Err(e);
                    }
                    last = Some(e);
                }
                Attempt::Fail(e) => return Err(e),
                Attempt::Retry(e) => {
                    tracing::debug!(upstream = %upstream.name, error = %e, retries, "upstream attempt failed");
                    if retries >= max_retries || !upstream.budget.withdraw() {
                        return Err(e);
                    }
                    retries += 1;
                    last = Some(e);
                    tokio::time::sleep(backoff(retries)).await;
                    // Another upstream first, if the model has one; else another key here
                    // (the pool prefers the least loaded, and the failed key may be open).
                    if at + 1 < order.len() {
                        at += 1;
                    }
                }
            }
        }
        Err(last.unwrap_or(UpstreamError::NoUpstream))
    }
}

impl Upstreams {
    fn record(&self, upstream: &Upstream, key: &str, attempt: &Attempt, took: Duration) {
        let outcome = match attempt {
            Attempt::Done(_) => "success",
            Attempt::MoveOn(UpstreamError::Busy { .. }) => "rate_limited",
            Attempt::MoveOn(_) => "refused",
            Attempt::Retry(UpstreamError::Status(_)) => "server_error",
            Attempt::Retry(_) => "connect_error",
            Attempt::Fail(UpstreamError::Timeout) => "timeout",
            Attempt::Fail(UpstreamError::Rejected { .. }) => "rejected",
            Attempt::Fail(_) => "bad_response",
        };
        self.metrics
            .upstream_requests
            .get_or_create(&UpstreamOutcomeLabels {
                upstream: upstream.name.to_string(),
                key: key.to_owned(),
                outcome,
            })
            .inc();
        self.metrics
            .upstream_request_duration
            .get_or_create(&UpstreamLabels {
                upstream: upstream.name.to_string(),
            })
            .observe(took.as_secs_f64());
    }
}

impl Upstreams {
    /// On a config reload: the upstreams that keep their name take over the live state of the
    /// ones they replace (key pools matched by key id, and the retry budget), so a reload is
    /// not a reset of what protects the provider. See [`KeyPool::carry_over_from`].
    pub fn carry_over_from(&mut self, previous: &Upstreams) {
        for u in &mut self.list {
            if let Some(old) = previous.list.iter().find(|o| o.name == u.name) {
                u.pool.carry_over_from(&old.pool);
                u.budget = Arc::clone(&old.budget);
            }
        }
    }
}

/// Which of two failures to report: a real upstream error beats "no key here".
fn prefer(previous: Option<UpstreamError>, next: UpstreamError) -> UpstreamError {
    match (previous, next) {
        (Some(UpstreamError::Busy { retry_after: a }), UpstreamError::Busy { retry_after: b }) => {
            UpstreamError::Busy {
                retry_after: a.min(b),
            }
        }
        (Some(prev @ UpstreamError::Busy { .. }), UpstreamError::Unavailable) => prev,
        (Some(prev), UpstreamError::Unavailable | UpstreamError::Busy { .. })
            if !matches!(prev, UpstreamError::Unavailable) =>
        {
            prev
        }
        (_, next) => next,
    }
}

impl Upstream {
    /// One request with one key; settles the lease with the outcome.
    async fn attempt(&self, lease: KeyLease, body: Bytes, expect: Expect) -> Attempt {
        let sent = self
            .http
            .post(self.generations_url.clone())
            .header(
                reqwest::header::AUTHORIZATION,
                lease.authorization().clone(),
            )
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(reqwest::header::ACCEPT, "application/json")
            .timeout(self.timeout)
            .body(body)
            .send()
            .await;
        let sent = match sent {
            Ok(sent) => sent,
            Err(e) => {
                let e = http::classify(e);
                return match e {
                    UpstreamError::Connect(_) | UpstreamError::Transport(_) => {
                        lease.failed(false);
                        Attempt::Retry(e)
                    }
                    _ => {
                        lease.neutral();
                        Attempt::Fail(e)
                    }
                };
            }
        };

        let status = sent.status();
        let headers = sent.headers().clone();
        // Copied, not cloned: a received `HeaderValue` shares the connection's whole read
        // buffer, which a cached response would otherwise keep alive (8 KiB and up per entry).
        let upstream_request_id = headers
            .get("x-request-id")
            .filter(|v| crate::telemetry::is_valid_request_id(v.as_bytes()))
            .and_then(|v| HeaderValue::from_bytes(v.as_bytes()).ok());
        let body = match http::read_capped(sent, self.max_response_bytes).await {
            Ok(body) => body,
            Err(e @ (UpstreamError::Transport(_) | UpstreamError::Connect(_)))
                if !status.is_success() =>
            {
                lease.failed(status.is_server_error());
                return Attempt::Retry(e);
            }
            Err(e) => {
                lease.neutral();
                return Attempt::Fail(e);
            }
        };

        if status.is_success() {
            let images = match expect {
                Expect::Images => count_images(&body),
                Expect::Task => native_task_id(&body).map(|_| 0),
            };
            return match images {
                Some(images) => {
                    let key_id = Arc::clone(&lease.key_id);
                    lease.succeeded(&headers);
                    Attempt::Done(UpstreamResponse {
                        body,
                        images,
                        upstream: Arc::clone(&self.name),
                        key_id,
                        upstream_request_id,
                    })
                }
                None => {
                    lease.neutral();
                    Attempt::Fail(UpstreamError::BadResponse)
                }
            };
        }
        match status.as_u16() {
            429 => {
                let retry_after = headers
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| parse_retry_after(v.as_bytes(), SystemTime::now()))
                    .unwrap_or(DEFAULT_COOLDOWN);
                tracing::info!(upstream = %self.name, key = %lease.key_id, secs = retry_after.as_secs(), "upstream rate limited key: cooling down");
                lease.rate_limited(retry_after, &headers);
                Attempt::MoveOn(UpstreamError::Busy { retry_after })
            }
            401 | 403 => {
                lease.refused(status.as_u16());
                Attempt::MoveOn(UpstreamError::Unavailable)
            }
            400 | 413 | 422 => {
                lease.neutral();
                Attempt::Fail(UpstreamError::Rejected {
                    status: status.as_u16(),
                    code: error_code(&body),
                })
            }
            s if status.is_server_error() => {
                lease.failed(true);
                Attempt::Retry(UpstreamError::Status(s))
            }
            other => {
                lease.neutral();
                Attempt::Fail(UpstreamError::Status(other))
            }
        }
    }
}

impl Upstream {
    /// One poll of a native task. Polls use no admission slot: they are cheap reads of work
    /// the key already paid for, and the key's rate limit is about generations.
    async fn poll(
        &self,
        authorization: HeaderValue,
        key_id: Arc<str>,
        upstream_task_id: &str,
    ) -> Result<NativeStatus, UpstreamError> {
        let url = self
            .tasks_url
            .join(upstream_task_id)
            .map_err(|_| UpstreamError::BadResponse)?;
        let sent = self
            .http
            .get(url)
            .header(reqwest::header::AUTHORIZATION, authorization)
            .header(reqwest::header::ACCEPT, "application/json")
            .timeout(self.timeout.min(POLL_TIMEOUT))
            .send()
            .await
            .map_err(http::classify)?;
        let status = sent.status();
        let body = http::read_capped(sent, self.max_response_bytes).await?;
        match status.as_u16() {
            200..=299 => {}
            // The upstream no longer knows the task, or no longer accepts the key.
            401 | 403 | 404 | 410 => {
                return Ok(NativeStatus::Failed(UpstreamError::Rejected {
                    status: status.as_u16(),
                    code: error_code(&body),
                }));
            }
            429 => {
                return Err(UpstreamError::Busy {
                    retry_after: DEFAULT_COOLDOWN,
                });
            }
            other => return Err(UpstreamError::Status(other)),
        }
        let Ok(serde_json::Value::Object(mut task)) = serde_json::from_slice(&body) else {
            return Err(UpstreamError::BadResponse);
        };
        let state = task
            .get("status")
            .and_then(serde_json::Value::as_str)
            .unwrap_or("");
        match state {
            "completed" | "succeeded" | "success" => {
                // The result is the task object minus its task fields: the sync answer.
                for field in ["id", "object", "status", "progress", "error"] {
                    task.remove(field);
                }
                let body =
                    Bytes::from(serde_json::to_vec(&task).map_err(|_| UpstreamError::BadResponse)?);
                let images = count_images(&body).ok_or(UpstreamError::BadResponse)?;
                Ok(NativeStatus::Completed(UpstreamResponse {
                    body,
                    images,
                    upstream: Arc::clone(&self.name),
                    key_id,
                    upstream_request_id: None,
                }))
            }
            "failed" | "failure" | "error" | "cancelled" => {
                let code = error_code(&body);
                Ok(NativeStatus::Failed(UpstreamError::Rejected {
                    status: status.as_u16(),
                    code,
                }))
            }
            _ => {
                let progress = task
                    .get("progress")
                    .and_then(serde_json::Value::as_u64)
                    .unwrap_or(0)
                    .min(99);
                Ok(NativeStatus::Pending {
                    progress: u8::try_from(progress).unwrap_or(99),
                })
            }
        }
    }
}

/// The `id` of a native task object, when it is a short identifier safe to put in a URL path.
fn native_task_id(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Shape {
        id: String,
    }
    let id = serde_json::from_slice::<Shape>(body).ok()?.id;
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
    ok.then_some(id)
}

fn bearer(secret: &SecretString) -> Result<HeaderValue, axum::http::header::InvalidHeaderValue> {
    let mut value = HeaderValue::try_from(format!("Bearer {}", secret.expose_secret()))?;
    value.set_sensitive(true);
    Ok(value)
}

/// `data.len()` if `body` is an `ImagesResponse`-shaped JSON object. Parsing skips over the
/// image payloads without allocating them; the body itself is passed on unchanged.
fn count_images(body: &[u8]) -> Option<usize> {
    #[derive(serde::Deserialize)]
    struct Shape {
        #[expect(
            dead_code,
            reason = "present only so that a body without `created` is refused"
        )]
        created: i64,
        data: Vec<serde::de::IgnoredAny>,
    }
    serde_json::from_slice::<Shape>(body)
        .ok()
        .map(|s| s.data.len())
}

/// The upstream's `error.code`, when it is a short identifier (so nothing else of the upstream's
/// body can reach a client).
fn error_code(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let code = v.get("error")?.get("code")?.as_str()?;
    let ok = !code.is_empty()
        && code.len() <= 64
        && code.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    ok.then(|| code.to_owned())
}

/// `Retry-After` as delay-seconds or an HTTP-date, relative to `now`; capped at one hour so a
/// broken upstream cannot park a key forever.
pub fn parse_retry_after(value: &[u8], now: SystemTime) -> Option<Duration> {
    let text = std::str::from_utf8(value).ok()?.trim();
    let delay = if let Ok(secs) = text.parse::<u64>() {
        Duration::from_secs(secs)
    } else {
        let at = httpdate::parse_http_date(text).ok()?;
        at.duration_since(now).unwrap_or(Duration::ZERO)
    };
    Some(delay.min(Duration::from_secs(3600)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_reads_seconds_and_http_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(parse_retry_after(b"30", now), Some(Duration::from_secs(30)));
        let date = httpdate::fmt_http_date(now + Duration::from_secs(45));
        assert_eq!(
            parse_retry_after(date.as_bytes(), now),
            Some(Duration::from_secs(45))
        );
        assert_eq!(parse_retry_after(b"soon", now), None);
        assert_eq!(
            parse_retry_after(b"999999", now),
            Some(Duration::from_secs(3600))
        );
    }

    #[test]
    fn the_retry_budget_starts_with_a_reserve_earns_a_fifth_per_request_and_is_capped() {
        let budget = RetryBudget::new();
        let drain = |budget: &RetryBudget| (0..1000).take_while(|_| budget.withdraw()).count();
        assert_eq!(drain(&budget), 10, "the reserve is 10 retries");
        assert!(!budget.withdraw(), "an empty budget refuses");
        for _ in 0..4 {
            budget.deposit();
        }
        assert!(
            !budget.withdraw(),
            "four requests earn 0.8 of a retry: not enough"
        );
        budget.deposit();
        assert!(budget.withdraw(), "the fifth request completes one retry");
        assert!(!budget.withdraw());
        for _ in 0..50 {
            budget.deposit();
        }
        assert_eq!(drain(&budget), 10, "50 requests earn exactly 10 retries");
        for _ in 0..10_000 {
            budget.deposit();
        }
        assert_eq!(drain(&budget), 100, "savings are capped at 100 retries");
    }

    #[test]
    fn images_are_counted_without_reshaping() {
        assert_eq!(
            count_images(br#"{"created":1,"data":[{"url":"u"},{"b64_json":"x"}]}"#),
            Some(2)
        );
        assert_eq!(count_images(br#"{"created":1,"data":[{"url":"u"}"#), None);
        assert_eq!(count_images(br#"{"data":[]}"#), None);
        assert_eq!(count_images(b"[]"), None);
    }

    #[test]
    fn only_identifier_like_error_codes_pass() {
        assert_eq!(
            error_code(br#"{"error":{"code":"content_policy_violation"}}"#).as_deref(),
            Some("content_policy_violation")
        );
        assert_eq!(
            error_code(br#"{"error":{"code":"see https://x/?key=sk"}}"#),
            None
        );
    }
}
