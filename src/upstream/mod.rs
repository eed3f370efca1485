//! The only HTTP client in the gateway: calls to OpenAI-compatible upstreams with the
//! server-held keys.
//!
//! Owns: building the forwarded request from a [`ValidRequest`] (only the fields the model
//! allows, `model` mapped to `upstream_model`, `async` never forwarded), choosing a key,
//! reading the answer with a size cap, checking it is an `ImagesResponse` without
//! re-serialising it, and turning every failure into an [`UpstreamError`] whose client-facing
//! form carries no upstream URL, key or raw body.
//!
//! Must not: forward any client header, follow redirects, or contact a host that is not a
//! configured `base_url`.

mod http;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use axum::http::{HeaderValue, StatusCode};
use bytes::Bytes;
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;

use crate::config::{Config, ConfigError, Secrets};
use crate::error::ApiError;
use crate::validate::ValidRequest;

/// What the gateway tells a client when the upstream rate-limits without saying for how long.
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(10);

/// One key of an upstream's pool.
pub struct UpstreamKey {
    pub id: Arc<str>,
    /// `Bearer <key>`, marked sensitive so no HTTP layer logs it.
    authorization: HeaderValue,
}

impl std::fmt::Debug for UpstreamKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// One configured provider.
#[derive(Debug)]
pub struct Upstream {
    pub name: Arc<str>,
    generations_url: reqwest::Url,
    keys: Vec<UpstreamKey>,
    next_key: AtomicUsize,
    http: reqwest::Client,
    timeout: Duration,
    max_response_bytes: usize,
}

/// Every configured upstream, in config order.
#[derive(Debug)]
pub struct Upstreams {
    list: Vec<Upstream>,
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
    #[error("upstream rate limited the key (retry after {retry_after:?})")]
    RateLimited { retry_after: Duration },
    #[error("upstream refused the key (HTTP {0})")]
    KeyRefused(u16),
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
    #[error("no upstream serves this model")]
    NoUpstream,
}

impl UpstreamError {
    /// A short label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            UpstreamError::RateLimited { .. } => "upstream_rate_limited",
            UpstreamError::KeyRefused(_) => "upstream_key_refused",
            UpstreamError::Rejected { .. } => "upstream_rejected",
            UpstreamError::Status(_) => "upstream_status",
            UpstreamError::Timeout => "upstream_timeout",
            UpstreamError::Connect(_) => "upstream_connect",
            UpstreamError::Transport(_) => "upstream_transport",
            UpstreamError::BadResponse => "upstream_bad_response",
            UpstreamError::TooLarge(_) => "upstream_too_large",
            UpstreamError::NoUpstream => "no_upstream",
        }
    }
}

impl From<UpstreamError> for ApiError {
    fn from(e: UpstreamError) -> ApiError {
        match e {
            UpstreamError::RateLimited { retry_after } => {
                ApiError::upstream_rate_limited(retry_after)
            }
            UpstreamError::Rejected { status, code } => {
                // The upstream judged the request itself (e.g. a content policy). Its message
                // may echo internals, so only a recognisable code is passed on.
                let message = match code.as_deref() {
                    Some(code) => format!("The upstream provider rejected the request ({code})."),
                    None => format!("The upstream provider rejected the request (HTTP {status})."),
                };
                ApiError::invalid_request(message, None).with_code("upstream_rejected")
            }
            UpstreamError::KeyRefused(_) => ApiError::upstream(
                StatusCode::BAD_GATEWAY,
                "upstream_error",
                "The upstream provider refused the gateway's credentials. The operators have been told.",
            ),
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
            UpstreamError::NoUpstream => {
                ApiError::unavailable("no_upstream", "No upstream is configured for this model.")
            }
        }
    }
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
    serde_json::to_vec(&ForwardedRequest::new(request)).unwrap_or_default()
}

impl Upstreams {
    pub fn from_config(config: &Config, secrets: &Secrets) -> Result<Upstreams, ConfigError> {
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
                    Ok(UpstreamKey {
                        id: Arc::from(k.id.as_str()),
                        authorization: bearer(secret).map_err(|_| ConfigError::Secret {
                            what: format!("upstream `{}` key `{}`", u.name, k.id),
                            reason: "contains characters not allowed in an HTTP header".into(),
                        })?,
                    })
                })
                .collect::<Result<Vec<_>, ConfigError>>()?;
            list.push(Upstream {
                name: Arc::from(u.name.as_str()),
                generations_url,
                keys,
                next_key: AtomicUsize::new(0),
                http: http::client(Duration::from_secs(u.connect_timeout_secs)).map_err(|e| {
                    ConfigError::Invalid {
                        path: format!("upstreams.{}", u.name),
                        reason: format!("cannot build HTTP client: {}", e.without_url()),
                    }
                })?,
                timeout: Duration::from_secs(u.timeout_secs),
                max_response_bytes: u.max_response_bytes,
            });
        }
        Ok(Upstreams { list })
    }

    pub fn iter(&self) -> impl Iterator<Item = &Upstream> {
        self.list.iter()
    }

    /// Generates `request` on the first upstream of its model.
    pub async fn generate(
        &self,
        request: &ValidRequest,
    ) -> Result<UpstreamResponse, UpstreamError> {
        let upstream = request
            .model
            .upstreams
            .first()
            .and_then(|&i| self.list.get(i))
            .ok_or(UpstreamError::NoUpstream)?;
        upstream.generate(request).await
    }
}

impl Upstream {
    pub fn key_count(&self) -> usize {
        self.keys.len()
    }

    fn pick_key(&self) -> Option<&UpstreamKey> {
        let i = self.next_key.fetch_add(1, Ordering::Relaxed);
        self.keys.get(i % self.keys.len().max(1))
    }

    async fn generate(&self, request: &ValidRequest) -> Result<UpstreamResponse, UpstreamError> {
        let key = self.pick_key().ok_or(UpstreamError::NoUpstream)?;
        let body = forwarded_body(request);
        let sent = self
            .http
            .post(self.generations_url.clone())
            .header(reqwest::header::AUTHORIZATION, key.authorization.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(reqwest::header::ACCEPT, "application/json")
            .timeout(self.timeout)
            .body(body)
            .send()
            .await
            .map_err(http::classify)?;

        let status = sent.status();
        let headers = sent.headers().clone();
        let upstream_request_id = headers
            .get("x-request-id")
            .filter(|v| crate::telemetry::is_valid_request_id(v.as_bytes()))
            .cloned();
        let body = http::read_capped(sent, self.max_response_bytes).await?;

        if status.is_success() {
            let images = count_images(&body).ok_or(UpstreamError::BadResponse)?;
            return Ok(UpstreamResponse {
                body,
                images,
                upstream: Arc::clone(&self.name),
                key_id: Arc::clone(&key.id),
                upstream_request_id,
            });
        }
        Err(match status.as_u16() {
            429 => UpstreamError::RateLimited {
                retry_after: headers
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| parse_retry_after(v.as_bytes(), SystemTime::now()))
                    .unwrap_or(DEFAULT_RETRY_AFTER),
            },
            401 | 403 => {
                tracing::error!(upstream = %self.name, key = %key.id, status = status.as_u16(), "upstream refused key");
                UpstreamError::KeyRefused(status.as_u16())
            }
            400 | 413 | 422 => UpstreamError::Rejected {
                status: status.as_u16(),
                code: error_code(&body),
            },
            other => UpstreamError::Status(other),
        })
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
