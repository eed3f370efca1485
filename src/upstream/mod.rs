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

use crate::config::{Config, ConfigError, Secrets};
use crate::error::ApiError;
use crate::telemetry::metrics::{Metrics, UpstreamLabels, UpstreamOutcomeLabels};
use crate::validate::ValidRequest;
use pool::{KeyLease, KeyPool, PoolError, PoolKey, PoolStatus};

/// How long a key rests after a 429 that did not say.
const DEFAULT_COOLDOWN: Duration = Duration::from_secs(10);
/// First retry waits up to this (full jitter), doubling per retry.
const BACKOFF_BASE: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// One configured provider.
#[derive(Debug)]
pub struct Upstream {
    pub name: Arc<str>,
    generations_url: reqwest::Url,
    pool: KeyPool,
    http: reqwest::Client,
    timeout: Duration,
    max_response_bytes: usize,
    max_retries: u32,
    budget: RetryBudget,
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
/// deposits `RATIO` of a token, every retry withdraws one, and the balance is capped, so a
/// sustained outage cannot turn N requests into N × (1 + max_retries) upstream calls.
#[derive(Debug)]
struct RetryBudget {
    tokens: Mutex<f64>,
}

impl RetryBudget {
    const RATIO: f64 = 0.2;
    const RESERVE: f64 = 10.0;
    const CAP: f64 = 100.0;

    fn new() -> Self {
        RetryBudget {
            tokens: Mutex::new(Self::RESERVE),
        }
    }

    fn deposit(&self) {
        let mut t = self
            .tokens
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *t = (*t + Self::RATIO).min(Self::CAP);
    }

    fn withdraw(&self) -> bool {
        let mut t = self
            .tokens
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if *t >= 1.0 {
            *t -= 1.0;
            true
        } else {
            false
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

impl Upstreams {
    pub fn from_config(
        config: &Config,
        secrets: &Secrets,
        metrics: Arc<Metrics>,
    ) -> Result<Upstreams, ConfigError> {
        let mut list = Vec::with_capacity(config.upstreams.len());
        for (u, keys) in config.upstreams.iter().zip(&secrets.upstream_keys) {
            let base = u.base_url.trim_end_matches('/');
            let generations_url = reqwest::Url::parse(&format!("{base}/images/generations"))
                .map_err(|e| ConfigError::Invalid {
                    path: format!("upstreams.{}.base_url", u.name),
                    reason: e.to_string(),
                })?;
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
                http: http::client(Duration::from_secs(u.connect_timeout_secs)).map_err(|e| {
                    ConfigError::Invalid {
                        path: format!("upstreams.{}", u.name),
                        reason: format!("cannot build HTTP client: {}", e.without_url()),
                    }
                })?,
                timeout: Duration::from_secs(u.timeout_secs),
                max_response_bytes: u.max_response_bytes,
                max_retries: u.max_retries,
                budget: RetryBudget::new(),
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

    /// Generates `request` for `client` on the model's upstreams in failover order: keys of an
    /// upstream first (429 and refused keys move on at once), then the next upstream. Retries
    /// of failures are bounded by the first upstream's `max_retries` and by each upstream's
    /// retry budget.
    pub async fn generate(
        &self,
        request: &ValidRequest,
        client: &str,
    ) -> Result<UpstreamResponse, UpstreamError> {
        let order: Vec<&Upstream> = request
            .model
            .upstreams
            .iter()
            .filter_map(|&i| self.list.get(i))
            .collect();
        let first = order.first().ok_or(UpstreamError::NoUpstream)?;
        let max_retries = first.max_retries;
        for u in &order {
            u.budget.deposit();
        }
        let body = Bytes::from(forwarded_body(request));
        let mut retries = 0;
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
            let attempt = upstream.attempt(lease, body.clone()).await;
            self.record(upstream, &key_id, &attempt, started.elapsed());
            match attempt {
                Attempt::Done(response) => return Ok(response),
                Attempt::MoveOn(e) => last = Some(e),
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
    async fn attempt(&self, lease: KeyLease, body: Bytes) -> Attempt {
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
            return match count_images(&body) {
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
