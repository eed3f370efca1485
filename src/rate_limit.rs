//! Per-client rate limits (SPEC §7): requests per minute, images per minute (a request costs
//! `n`), requests in flight, and a light limit on task polls.
//!
//! Owns: the limiter state of every configured client, the admission decision, the exact
//! `Retry-After` of a rejection, and the `x-ratelimit-*` headers (SPEC §3). It does not own
//! daily/monthly quotas (the usage ledger does), upstream key limits (`upstream/`), or turning
//! errors into responses ([`crate::error`]); it must not do I/O, log, or import axum.
//!
//! # Why not `governor`
//! The per-minute limits are GCRA with a burst of the whole minute, as governor would do, but a
//! request must pass the requests limit *and* the images limit, and a rejected request must
//! consume nothing in either. governor checks one limiter at a time and commits on success with
//! no way to give a unit back, so with two limiters one of them is spent by a request the other
//! then refuses. Here each client has one small mutex over both theoretical arrival times
//! (TATs): both new TATs are computed, and committed only if both conform.
//!
//! The arithmetic is exact: a TAT is kept in nanoseconds multiplied by the limit, so one unit
//! costs exactly one minute of that scaled time and the emission interval (60 s / limit, not a
//! whole number of nanoseconds for most limits) is never rounded. "Exactly N per minute" holds
//! for every N, and `Retry-After` is the exact time until the request conforms, rounded up to
//! the nanosecond so it is never early.
//!
//! # Order and concurrency
//! [`RateLimits::admit`] refuses an `n` above the images burst first (400: it can never pass),
//! then takes the concurrency permit (free to give back), then checks both GCRA dimensions.
//! On any rejection the permit is dropped, so nothing is consumed.
//!
//! # Memory and reload
//! Limiters exist only for configured clients: they are built from config, never from request
//! data, so memory is bounded by the client list and nothing needs evicting. The map is replaced
//! wholesale on reload ([`RateLimits::reconfigure`]) and otherwise only read for a lookup;
//! requests never insert into it. A client whose rate settings are unchanged keeps its limiter
//! (TATs and in-flight permits), so a SIGHUP is not a free reset.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::auth::ClientId;
use crate::config::ClientLimits;
use crate::error::ApiError;

/// Task polls (`GET /v1/tasks/{id}`) a client may make per minute, with the same burst. Far above
/// what the `Retry-After: 2` polling hint asks for; it only stops a client spinning on a task.
pub const POLLS_PER_MINUTE: u32 = 600;

/// The hint given when every in-flight slot is taken. A slot frees when one of the client's
/// requests finishes, which cannot be predicted, so the hint is short rather than exact.
const CONCURRENCY_RETRY_AFTER: Duration = Duration::from_secs(1);

/// One minute in nanoseconds: the cost of one unit in scaled time (see [`Bucket`]).
const MINUTE_NANOS: u128 = 60_000_000_000;

/// A monotonic time source, injectable so tests move time by hand instead of sleeping.
pub trait RateClock: Send + Sync {
    /// Time since a fixed origin; never goes backwards.
    fn now(&self) -> Duration;
}

/// The real clock. It reads `tokio::time::Instant`, so tests on tokio's paused clock see it
/// stand still and advance with `tokio::time::advance`.
#[derive(Debug, Clone, Copy)]
pub struct MonotonicClock {
    origin: tokio::time::Instant,
}

impl MonotonicClock {
    pub fn new() -> Self {
        MonotonicClock {
            origin: tokio::time::Instant::now(),
        }
    }
}

impl Default for MonotonicClock {
    fn default() -> Self {
        MonotonicClock::new()
    }
}

impl RateClock for MonotonicClock {
    fn now(&self) -> Duration {
        self.origin.elapsed()
    }
}

/// Which limit turned a request away; `as_str` is the `limit` label of `rate_limited_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LimitKind {
    Requests,
    Images,
    Concurrency,
    Polls,
}

impl LimitKind {
    pub fn as_str(self) -> &'static str {
        match self {
            LimitKind::Requests => "requests",
            LimitKind::Images => "images",
            LimitKind::Concurrency => "concurrency",
            LimitKind::Polls => "polls",
        }
    }
}

/// Why a request was not admitted. The `Display` text is what the client reads.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RateLimitError {
    /// `n` is above the client's images per minute: no amount of waiting helps, so this is a
    /// 400 on `n`, never a retryable 429.
    #[error(
        "This client may generate at most {limit} images per minute, so `n` must be at most {limit}."
    )]
    TooManyImages { limit: u32 },
    /// Over a limit for now; the request would conform after `retry_after`.
    #[error("{}", limited_message(.limit, .allowed, .retry_after))]
    Limited {
        limit: LimitKind,
        /// The configured amount of that limit: per minute, or in flight for concurrency.
        allowed: u32,
        retry_after: Duration,
        headers: RateHeaders,
    },
    /// The client is not in the limiter's config: it was removed by a reload after the request
    /// authenticated. Fails closed, as a revoked key.
    #[error("the client is not configured")]
    UnknownClient,
}

fn limited_message(limit: &LimitKind, allowed: &u32, retry_after: &Duration) -> String {
    let per_minute = match limit {
        LimitKind::Requests => "requests",
        LimitKind::Images => "images",
        LimitKind::Polls => "task polls",
        LimitKind::Concurrency => {
            return format!(
                "Too many requests in flight (limit {allowed} at once). Retry when one of them finishes."
            );
        }
    };
    let wait = go_duration(*retry_after);
    format!(
        "Rate limit reached for {per_minute} per minute (limit {allowed}). Try again in {wait}."
    )
}

impl RateLimitError {
    /// The `x-ratelimit-*` headers the response must carry, if any.
    pub fn headers(&self) -> Option<&RateHeaders> {
        match self {
            RateLimitError::Limited { headers, .. } => Some(headers),
            RateLimitError::TooManyImages { .. } | RateLimitError::UnknownClient => None,
        }
    }
}

impl From<RateLimitError> for ApiError {
    fn from(err: RateLimitError) -> Self {
        let message = err.to_string();
        match err {
            RateLimitError::TooManyImages { .. } => ApiError::invalid_request(message, Some("n")),
            RateLimitError::Limited { retry_after, .. } => {
                ApiError::rate_limited(message, retry_after)
            }
            RateLimitError::UnknownClient => ApiError::invalid_api_key(),
        }
    }
}

/// The `x-ratelimit-*` headers of one response (SPEC §3), as OpenAI sends them.
///
/// `remaining` is how many more units would conform right now; `reset` is the time until the
/// bucket is completely full again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateHeaders {
    pub limit_requests: u32,
    pub remaining_requests: u32,
    pub reset_requests: Duration,
    pub limit_images: u32,
    pub remaining_images: u32,
    pub reset_images: Duration,
}

impl RateHeaders {
    /// The six headers; resets formatted as Go durations (rounding: see `go_duration`).
    pub fn pairs(&self) -> Vec<(HeaderName, HeaderValue)> {
        // Names are constants (parsed at compile time: this runs on every response); values
        // are digits and `hms.`, so their conversion cannot fail, and skipping instead of
        // panicking keeps that local.
        const NAMES: [[HeaderName; 3]; 2] = [
            [
                HeaderName::from_static("x-ratelimit-limit-requests"),
                HeaderName::from_static("x-ratelimit-remaining-requests"),
                HeaderName::from_static("x-ratelimit-reset-requests"),
            ],
            [
                HeaderName::from_static("x-ratelimit-limit-images"),
                HeaderName::from_static("x-ratelimit-remaining-images"),
                HeaderName::from_static("x-ratelimit-reset-images"),
            ],
        ];
        let mut pairs = Vec::with_capacity(6);
        for ([limit_name, remaining_name, reset_name], limit, remaining, reset) in [
            (
                &NAMES[0],
                self.limit_requests,
                self.remaining_requests,
                self.reset_requests,
            ),
            (
                &NAMES[1],
                self.limit_images,
                self.remaining_images,
                self.reset_images,
            ),
        ] {
            pairs.push((limit_name.clone(), HeaderValue::from(limit)));
            pairs.push((remaining_name.clone(), HeaderValue::from(remaining)));
            if let Ok(v) = HeaderValue::try_from(go_duration(reset)) {
                pairs.push((reset_name.clone(), v));
            }
        }
        pairs
    }

    /// Sets the six headers on a response, replacing any already there.
    pub fn apply(&self, headers: &mut HeaderMap) {
        for (name, value) in self.pairs() {
            headers.insert(name, value);
        }
    }
}

/// A duration the way Go's `time.Duration.String()` prints it, which is what OpenAI's
/// `x-ratelimit-reset-*` headers use: `20ms`, `1s`, `59.5s`, `6m0s`, `1h0m0s`.
///
/// Rounding: up to the next whole millisecond first (so a client that waits this long is never
/// early), then printed exactly: below a second as `Nms`, from a second on as `[Hh][Mm]S[.fff]s`
/// with trailing zeros of the fraction dropped. Zero is `0s`.
fn go_duration(d: Duration) -> String {
    let millis = d.as_nanos().div_ceil(1_000_000);
    if millis == 0 {
        return "0s".to_owned();
    }
    if millis < 1000 {
        return format!("{millis}ms");
    }
    let hours = millis / 3_600_000;
    let minutes = millis / 60_000 % 60;
    let seconds = millis / 1000 % 60;
    let fraction = millis % 1000;
    let mut out = String::new();
    if hours > 0 {
        out.push_str(&format!("{hours}h"));
    }
    if hours > 0 || minutes > 0 {
        out.push_str(&format!("{minutes}m"));
    }
    out.push_str(&seconds.to_string());
    if fraction > 0 {
        let digits = format!("{fraction:03}");
        out.push('.');
        out.push_str(digits.trim_end_matches('0'));
    }
    out.push('s');
    out
}

/// One GCRA dimension: `limit` units per minute with a burst of `limit`.
///
/// Times are nanoseconds multiplied by `limit` ("scaled"): one unit then costs exactly
/// [`MINUTE_NANOS`] and the burst tolerance is `limit` of those, with no rounding anywhere.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    limit: u32,
    /// Theoretical arrival time, scaled. At or before now means the bucket is full.
    tat: u128,
}

impl Bucket {
    fn new(limit: u32) -> Self {
        Bucket { limit, tat: 0 }
    }

    fn scaled(&self, now: Duration) -> u128 {
        now.as_nanos().saturating_mul(u128::from(self.limit))
    }

    /// The scaled time a full bucket spans: `limit` units.
    fn window(&self) -> u128 {
        MINUTE_NANOS.saturating_mul(u128::from(self.limit))
    }

    /// The TAT after spending `cost` units at `now`, or how long until that would conform.
    /// The wait is exact only for `cost <= limit`; callers refuse larger costs before this.
    fn try_spend(&self, now: Duration, cost: u32) -> Result<u128, Duration> {
        if self.limit == 0 {
            // A zero limit admits nothing and no wait would help; a minute is the least
            // misleading hint (config validation should keep limits at 1 or more).
            return if cost == 0 {
                Ok(self.tat)
            } else {
                Err(Duration::from_secs(60))
            };
        }
        let now = self.scaled(now);
        let new_tat = self
            .tat
            .max(now)
            .saturating_add(MINUTE_NANOS.saturating_mul(u128::from(cost)));
        let allowed_until = now.saturating_add(self.window());
        if new_tat <= allowed_until {
            Ok(new_tat)
        } else {
            // The deadline moves with now while the stored TAT does not, so the request
            // conforms exactly when now has advanced by the overshoot.
            Err(self.unscale_up(new_tat - allowed_until))
        }
    }

    /// Units that would conform right now.
    fn remaining(&self, now: Duration) -> u32 {
        let now = self.scaled(now);
        let free = now
            .saturating_add(self.window())
            .saturating_sub(self.tat.max(now))
            / MINUTE_NANOS;
        u32::try_from(free).unwrap_or(self.limit)
    }

    /// Time until the bucket is completely full again.
    fn reset(&self, now: Duration) -> Duration {
        self.unscale_up(self.tat.saturating_sub(self.scaled(now)))
    }

    /// A scaled span as real time, rounded up so it is never early.
    fn unscale_up(&self, scaled: u128) -> Duration {
        let Some(limit) = std::num::NonZeroU128::new(u128::from(self.limit)) else {
            return Duration::ZERO;
        };
        let nanos = scaled.div_ceil(limit.get());
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }
}

/// The rate settings of a client: the part of [`ClientLimits`] that this module uses, so a
/// reload that changes only, say, `images_per_day` keeps the limiter's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RateSettings {
    requests_per_minute: u32,
    images_per_minute: u32,
    max_concurrent: u32,
}

impl From<&ClientLimits> for RateSettings {
    fn from(limits: &ClientLimits) -> Self {
        RateSettings {
            requests_per_minute: limits.requests_per_minute,
            images_per_minute: limits.images_per_minute,
            max_concurrent: limits.max_concurrent,
        }
    }
}

/// The GCRA state of one client, all behind one mutex so both dimensions move together.
#[derive(Debug)]
struct Buckets {
    requests: Bucket,
    images: Bucket,
    polls: Bucket,
}

impl Buckets {
    fn headers(&self, now: Duration) -> RateHeaders {
        RateHeaders {
            limit_requests: self.requests.limit,
            remaining_requests: self.requests.remaining(now),
            reset_requests: self.requests.reset(now),
            limit_images: self.images.limit,
            remaining_images: self.images.remaining(now),
            reset_images: self.images.reset(now),
        }
    }
}

#[derive(Debug)]
struct ClientLimiter {
    settings: RateSettings,
    buckets: Mutex<Buckets>,
    in_flight: Arc<Semaphore>,
}

impl ClientLimiter {
    fn new(settings: RateSettings) -> Self {
        let permits = usize::try_from(settings.max_concurrent)
            .unwrap_or(usize::MAX)
            .min(Semaphore::MAX_PERMITS);
        ClientLimiter {
            settings,
            buckets: Mutex::new(Buckets {
                requests: Bucket::new(settings.requests_per_minute),
                images: Bucket::new(settings.images_per_minute),
                polls: Bucket::new(POLLS_PER_MINUTE),
            }),
            in_flight: Arc::new(Semaphore::new(permits)),
        }
    }

    fn buckets(&self) -> MutexGuard<'_, Buckets> {
        // The critical sections only do saturating integer arithmetic and assign whole TATs,
        // so a poisoned lock still holds consistent state; failing closed here would turn one
        // panic elsewhere into a permanent outage for the client.
        self.buckets.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Holds one of the client's in-flight slots; dropping it frees the slot. Keep it for the whole
/// upstream call.
#[derive(Debug)]
pub struct AdmissionPermit {
    _permit: OwnedSemaphorePermit,
}

/// An admitted request: its in-flight slot and the headers for its response.
#[derive(Debug)]
pub struct Admission {
    pub permit: AdmissionPermit,
    pub headers: RateHeaders,
}

/// Every configured client's limiter. `Send + Sync`; one per gateway.
pub struct RateLimits {
    clock: Arc<dyn RateClock>,
    clients: RwLock<HashMap<ClientId, Arc<ClientLimiter>>>,
}

impl fmt::Debug for RateLimits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimits")
            .field("clients", &self.read_clients().len())
            .finish_non_exhaustive()
    }
}

impl RateLimits {
    pub fn new(clients: &[(ClientId, ClientLimits)], clock: Arc<dyn RateClock>) -> Self {
        RateLimits {
            clock,
            clients: RwLock::new(rebuild(&HashMap::new(), clients)),
        }
    }

    /// Rebuild for a reloaded config: clients whose rate settings are unchanged keep their
    /// state (so a SIGHUP is not a free reset); clients whose settings changed and new clients
    /// start full; removed clients are dropped. A changed client's old in-flight requests
    /// release into the old semaphore, so for their duration it may briefly have up to old
    /// plus new `max_concurrent` in flight.
    pub fn reconfigure(&self, clients: &[(ClientId, ClientLimits)]) {
        let mut map = self.clients.write().unwrap_or_else(PoisonError::into_inner);
        *map = rebuild(&map, clients);
    }

    /// Admit one request costing `images`. On success the permit must be held until the
    /// request's work is done; on failure nothing was consumed.
    pub fn admit(&self, client: &ClientId, images: u32) -> Result<Admission, RateLimitError> {
        let limiter = self.limiter(client)?;
        let settings = limiter.settings;
        if images > settings.images_per_minute {
            return Err(RateLimitError::TooManyImages {
                limit: settings.images_per_minute,
            });
        }
        // The permit first: giving it back is free, while a GCRA unit cannot be given back.
        let Ok(permit) = Arc::clone(&limiter.in_flight).try_acquire_owned() else {
            let buckets = limiter.buckets();
            return Err(RateLimitError::Limited {
                limit: LimitKind::Concurrency,
                allowed: settings.max_concurrent,
                retry_after: CONCURRENCY_RETRY_AFTER,
                headers: buckets.headers(self.clock.now()),
            });
        };
        let mut buckets = limiter.buckets();
        // Read under the lock so TATs are committed in clock order. (An older reading would
        // only make the check stricter, never let more through.)
        let now = self.clock.now();
        match (
            buckets.requests.try_spend(now, 1),
            buckets.images.try_spend(now, images),
        ) {
            (Ok(requests_tat), Ok(images_tat)) => {
                buckets.requests.tat = requests_tat;
                buckets.images.tat = images_tat;
                Ok(Admission {
                    permit: AdmissionPermit { _permit: permit },
                    headers: buckets.headers(now),
                })
            }
            (requests, images) => {
                // Nothing is committed and the permit drops with this scope. Each dimension's
                // wait is the earliest time it conforms and conforming is monotone in time, so
                // the request conforms exactly at the later of the two; that one is reported.
                let requests_wait = requests.err().unwrap_or_default();
                let images_wait = images.err().unwrap_or_default();
                let (limit, allowed, retry_after) = if images_wait > requests_wait {
                    (LimitKind::Images, settings.images_per_minute, images_wait)
                } else {
                    (
                        LimitKind::Requests,
                        settings.requests_per_minute,
                        requests_wait,
                    )
                };
                Err(RateLimitError::Limited {
                    limit,
                    allowed,
                    retry_after,
                    headers: buckets.headers(now),
                })
            }
        }
    }

    /// One task poll: its own per-minute limit ([`POLLS_PER_MINUTE`]), costing no request or
    /// image units.
    pub fn check_poll(&self, client: &ClientId) -> Result<(), RateLimitError> {
        let limiter = self.limiter(client)?;
        let mut buckets = limiter.buckets();
        let now = self.clock.now();
        match buckets.polls.try_spend(now, 1) {
            Ok(tat) => {
                buckets.polls.tat = tat;
                Ok(())
            }
            Err(retry_after) => Err(RateLimitError::Limited {
                limit: LimitKind::Polls,
                allowed: POLLS_PER_MINUTE,
                retry_after,
                // The poll limit has no headers of its own in SPEC §3; the client's request and
                // image state is still true and useful.
                headers: buckets.headers(now),
            }),
        }
    }

    fn limiter(&self, client: &ClientId) -> Result<Arc<ClientLimiter>, RateLimitError> {
        self.read_clients()
            .get(client)
            .cloned()
            .ok_or(RateLimitError::UnknownClient)
    }

    fn read_clients(
        &self,
    ) -> std::sync::RwLockReadGuard<'_, HashMap<ClientId, Arc<ClientLimiter>>> {
        // The map is only ever replaced by a single assignment, so a poisoned lock still
        // holds a complete map.
        self.clients.read().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The limiter map for `clients`, reusing from `old` every limiter whose settings are equal.
fn rebuild(
    old: &HashMap<ClientId, Arc<ClientLimiter>>,
    clients: &[(ClientId, ClientLimits)],
) -> HashMap<ClientId, Arc<ClientLimiter>> {
    clients
        .iter()
        .map(|(id, limits)| {
            let settings = RateSettings::from(limits);
            let limiter = match old.get(id) {
                Some(kept) if kept.settings == settings => Arc::clone(kept),
                _ => Arc::new(ClientLimiter::new(settings)),
            };
            (id.clone(), limiter)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{ClientKeys, key_digest_hex};
    use crate::config::{ClientConfig, Config};
    use crate::error::ErrorType;
    use http::StatusCode;
    use std::sync::Barrier;

    /// A clock moved only by the test.
    #[derive(Default)]
    struct ManualClock(Mutex<Duration>);

    impl ManualClock {
        fn advance(&self, by: Duration) {
            *self.0.lock().unwrap() += by;
        }
    }

    impl RateClock for ManualClock {
        fn now(&self) -> Duration {
            *self.0.lock().unwrap()
        }
    }

    /// `ClientId` has no public constructor; go through authentication as the gateway does.
    fn client_id(name: &str) -> ClientId {
        let mut config = Config::default();
        config
            .clients
            .push(ClientConfig::new(name, &key_digest_hex(name)));
        let keys = ClientKeys::from_config(&config);
        let header = format!("Bearer {name}");
        keys.authenticate(Some(header.as_bytes()))
            .unwrap()
            .id
            .clone()
    }

    fn settings(
        requests_per_minute: u32,
        images_per_minute: u32,
        max_concurrent: u32,
    ) -> ClientLimits {
        ClientLimits {
            requests_per_minute,
            images_per_minute,
            max_concurrent,
            ..ClientLimits::default()
        }
    }

    fn limiter(client: &ClientId, l: ClientLimits) -> (RateLimits, Arc<ManualClock>) {
        let clock = Arc::new(ManualClock::default());
        let limits = RateLimits::new(&[(client.clone(), l)], clock.clone());
        (limits, clock)
    }

    /// The kind and wait of a rejection, failing the test on anything else.
    fn limited(result: Result<Admission, RateLimitError>) -> (LimitKind, Duration, RateHeaders) {
        match result {
            Err(RateLimitError::Limited {
                limit,
                retry_after,
                headers,
                ..
            }) => (limit, retry_after, headers),
            other => panic!("expected Limited, got {other:?}"),
        }
    }

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn exactly_the_per_minute_requests_pass_when_fifty_arrive_at_once() {
        let a = client_id("team-a");
        let (limits, clock) = limiter(&a, settings(10, 1000, 100));
        let barrier = Barrier::new(50);
        let results: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..50)
                .map(|_| {
                    s.spawn(|| {
                        barrier.wait();
                        limits.admit(&a, 1)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let (passed, rejected): (Vec<_>, Vec<_>) = results.into_iter().partition(Result::is_ok);
        assert_eq!(passed.len(), 10);
        for r in rejected {
            let (kind, wait, headers) = limited(r);
            assert_eq!(kind, LimitKind::Requests);
            assert_eq!(wait, Duration::from_secs(6));
            assert_eq!(headers.remaining_requests, 0);
        }

        let (_, wait, _) = limited(limits.admit(&a, 1));
        clock.advance(wait - MS);
        limited(limits.admit(&a, 1));
        clock.advance(MS);
        limits.admit(&a, 1).unwrap();
        // One unit came back, not more.
        limited(limits.admit(&a, 1));
    }

    #[test]
    fn retry_after_is_exact_for_limits_that_do_not_divide_a_minute() {
        let a = client_id("team-a");
        let (limits, clock) = limiter(&a, settings(7, 1000, 100));
        for _ in 0..7 {
            limits.admit(&a, 1).unwrap();
        }
        let (_, wait, _) = limited(limits.admit(&a, 1));
        // 60 s / 7 = 8.571428571428… s, rounded up to the nanosecond.
        assert_eq!(wait, Duration::from_nanos(8_571_428_572));
        clock.advance(wait - Duration::from_nanos(1));
        limited(limits.admit(&a, 1));
        clock.advance(Duration::from_nanos(1));
        limits.admit(&a, 1).unwrap();
    }

    #[test]
    fn images_limit_passes_whole_requests_and_a_rejection_spends_no_request() {
        let a = client_id("team-a");
        let (limits, clock) = limiter(&a, settings(100, 30, 100));
        let mut last = None;
        for _ in 0..7 {
            last = Some(limits.admit(&a, 4).unwrap().headers);
        }
        let before = last.unwrap();
        assert_eq!(before.remaining_requests, 93);
        assert_eq!(before.remaining_images, 2);

        let (kind, wait, after) = limited(limits.admit(&a, 4));
        assert_eq!(kind, LimitKind::Images);
        assert_eq!(after, before, "the rejection changed the state");
        // 2 more images are needed at 2 s each.
        assert_eq!(wait, Duration::from_secs(4));
        clock.advance(wait);
        let passed = limits.admit(&a, 4).unwrap();
        assert_eq!(passed.headers.remaining_images, 0);
    }

    #[test]
    fn a_request_refused_by_the_requests_limit_spends_no_images() {
        let a = client_id("team-a");
        let (limits, _clock) = limiter(&a, settings(2, 30, 100));
        limits.admit(&a, 1).unwrap();
        let before = limits.admit(&a, 1).unwrap().headers;
        assert_eq!(before.remaining_images, 28);
        let (kind, _, after) = limited(limits.admit(&a, 3));
        assert_eq!(kind, LimitKind::Requests);
        assert_eq!(after, before);
    }

    #[test]
    fn a_request_refused_by_the_images_limit_spends_no_request() {
        let a = client_id("team-a");
        let (limits, _clock) = limiter(&a, settings(10, 5, 100));
        let before = limits.admit(&a, 4).unwrap().headers;
        let (kind, _, after) = limited(limits.admit(&a, 2));
        assert_eq!(kind, LimitKind::Images);
        assert_eq!(after, before);
        assert_eq!(after.remaining_requests, 9);
        let fits = limits.admit(&a, 1).unwrap().headers;
        assert_eq!((fits.remaining_requests, fits.remaining_images), (8, 0));
    }

    #[test]
    fn when_both_limits_refuse_the_later_one_is_reported_and_nothing_is_spent() {
        let a = client_id("team-a");
        let (limits, clock) = limiter(&a, settings(1, 3, 100));
        limits.admit(&a, 3).unwrap();
        // Images would conform after 20 s, requests only after 60 s.
        let (kind, wait, _) = limited(limits.admit(&a, 1));
        assert_eq!((kind, wait), (LimitKind::Requests, Duration::from_secs(60)));
        clock.advance(Duration::from_secs(20));
        let (kind, wait, headers) = limited(limits.admit(&a, 1));
        assert_eq!((kind, wait), (LimitKind::Requests, Duration::from_secs(40)));
        assert_eq!(headers.remaining_images, 1);
        clock.advance(Duration::from_secs(40));
        let passed = limits.admit(&a, 3).unwrap().headers;
        assert_eq!((passed.remaining_requests, passed.remaining_images), (0, 0));
    }

    #[test]
    fn n_above_the_images_burst_is_a_400_even_with_a_full_bucket() {
        let a = client_id("team-a");
        let (limits, _clock) = limiter(&a, settings(10, 4, 100));
        let err = limits.admit(&a, 5).unwrap_err();
        assert!(matches!(err, RateLimitError::TooManyImages { limit: 4 }));
        assert!(err.headers().is_none());
        let api = ApiError::from(err);
        assert_eq!(api.status(), StatusCode::BAD_REQUEST);
        assert_eq!(api.param(), Some("n"));
        assert!(api.message().contains("at most 4"), "{}", api.message());
        // Nothing was spent: the full burst is still there.
        let headers = limits.admit(&a, 4).unwrap().headers;
        assert_eq!(
            (headers.remaining_requests, headers.remaining_images),
            (9, 0)
        );
    }

    #[test]
    fn concurrency_limit_holds_while_permits_are_held_and_frees_on_drop() {
        let a = client_id("team-a");
        let (limits, _clock) = limiter(&a, settings(100, 100, 2));
        let first = limits.admit(&a, 1).unwrap();
        let _second = limits.admit(&a, 1).unwrap();
        let err = limits.admit(&a, 1).unwrap_err();
        let RateLimitError::Limited {
            limit: LimitKind::Concurrency,
            allowed: 2,
            retry_after,
            ref headers,
        } = err
        else {
            panic!("expected the concurrency limit, got {err:?}");
        };
        assert_eq!(retry_after, Duration::from_secs(1));
        assert_eq!(
            headers.remaining_requests, 98,
            "the rejection spent a request"
        );
        assert!(err.to_string().contains("limit 2 at once"), "{err}");
        drop(first);
        let third = limits.admit(&a, 1).unwrap();
        assert_eq!(third.headers.remaining_requests, 97);
    }

    #[test]
    fn one_clients_exhaustion_leaves_another_untouched() {
        let (a, b) = (client_id("team-a"), client_id("team-b"));
        let clock = Arc::new(ManualClock::default());
        let limits = RateLimits::new(
            &[
                (a.clone(), settings(2, 10, 1)),
                (b.clone(), settings(2, 10, 1)),
            ],
            clock,
        );
        let _held = limits.admit(&a, 1).unwrap();
        limited(limits.admit(&a, 1));
        let b_admitted = limits.admit(&b, 1).unwrap();
        assert_eq!(b_admitted.headers.remaining_requests, 1);
        assert_eq!(b_admitted.headers.remaining_images, 9);
    }

    #[test]
    fn unknown_clients_are_refused_as_a_revoked_key() {
        let a = client_id("team-a");
        let (limits, _clock) = limiter(&a, settings(2, 10, 1));
        let err = limits.admit(&client_id("stranger"), 1).unwrap_err();
        assert!(matches!(err, RateLimitError::UnknownClient));
        assert_eq!(ApiError::from(err).status(), StatusCode::UNAUTHORIZED);
    }

    #[test]
    fn headers_report_limit_remaining_and_time_to_full() {
        let a = client_id("team-a");
        let (limits, clock) = limiter(&a, settings(10, 30, 100));
        for _ in 0..3 {
            limits.admit(&a, 4).unwrap();
        }
        clock.advance(Duration::from_secs(3));
        let headers = limits.admit(&a, 1).unwrap().headers;
        // Requests: 4 units at 6 s each end at 24 s; at 3 s half a unit has come back.
        // Images: 13 units at 2 s each end at 26 s; at 3 s one and a half have come back.
        assert_eq!(
            headers,
            RateHeaders {
                limit_requests: 10,
                remaining_requests: 6,
                reset_requests: Duration::from_secs(21),
                limit_images: 30,
                remaining_images: 18,
                reset_images: Duration::from_secs(23),
            }
        );
        let mut map = HeaderMap::new();
        headers.apply(&mut map);
        assert_eq!(map.len(), 6);
        for (name, value) in [
            ("x-ratelimit-limit-requests", "10"),
            ("x-ratelimit-remaining-requests", "6"),
            ("x-ratelimit-reset-requests", "21s"),
            ("x-ratelimit-limit-images", "30"),
            ("x-ratelimit-remaining-images", "18"),
            ("x-ratelimit-reset-images", "23s"),
        ] {
            assert_eq!(map[name], value, "{name}");
        }
    }

    #[test]
    fn reset_of_an_uneven_interval_rounds_up_to_the_millisecond() {
        let a = client_id("team-a");
        let (limits, _clock) = limiter(&a, settings(7, 30, 100));
        let headers = limits.admit(&a, 1).unwrap().headers;
        assert_eq!(headers.reset_requests, Duration::from_nanos(8_571_428_572));
        assert_eq!(go_duration(headers.reset_requests), "8.572s");
    }

    #[test]
    fn go_durations_print_like_openai_headers() {
        for (d, text) in [
            (Duration::ZERO, "0s"),
            (Duration::from_nanos(1), "1ms"),
            (Duration::from_millis(20), "20ms"),
            (Duration::from_micros(19_001), "20ms"),
            (Duration::from_millis(999), "999ms"),
            (Duration::from_secs(1), "1s"),
            (Duration::from_millis(1250), "1.25s"),
            (Duration::from_millis(59_500), "59.5s"),
            (Duration::from_micros(59_499_100), "59.5s"),
            (Duration::from_secs(60), "1m0s"),
            (Duration::from_millis(61_050), "1m1.05s"),
            (Duration::from_secs(360), "6m0s"),
            (Duration::from_secs(3600), "1h0m0s"),
            (Duration::from_secs(3661), "1h1m1s"),
        ] {
            assert_eq!(go_duration(d), text, "{d:?}");
        }
    }

    #[test]
    fn rate_limited_errors_become_openai_429s() {
        let a = client_id("team-a");
        let (limits, _clock) = limiter(&a, settings(1, 10, 10));
        limits.admit(&a, 1).unwrap();
        let err = limits.admit(&a, 1).unwrap_err();
        assert!(err.headers().is_some());
        let api = ApiError::from(err);
        assert_eq!(api.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(api.error_type(), ErrorType::Requests);
        assert_eq!(api.code(), Some("rate_limit_exceeded"));
        assert_eq!(
            api.message(),
            "Rate limit reached for requests per minute (limit 1). Try again in 1m0s."
        );
    }

    #[test]
    fn polls_have_their_own_limit_and_spend_no_request_or_image() {
        let a = client_id("team-a");
        let (limits, clock) = limiter(&a, settings(10, 30, 100));
        for _ in 0..POLLS_PER_MINUTE {
            limits.check_poll(&a).unwrap();
        }
        let err = limits.check_poll(&a).unwrap_err();
        let RateLimitError::Limited {
            limit: LimitKind::Polls,
            retry_after,
            ref headers,
            ..
        } = err
        else {
            panic!("expected the poll limit, got {err:?}");
        };
        assert_eq!(retry_after, Duration::from_millis(100));
        assert_eq!(
            (headers.remaining_requests, headers.remaining_images),
            (10, 30)
        );
        limits.admit(&a, 1).unwrap();
        clock.advance(retry_after);
        limits.check_poll(&a).unwrap();
    }

    #[test]
    fn reconfigure_keeps_unchanged_clients_resets_changed_and_drops_removed() {
        let [kept, changed, removed, added] =
            ["kept", "changed", "removed", "added"].map(client_id);
        let clock = Arc::new(ManualClock::default());
        let limits = RateLimits::new(
            &[
                (kept.clone(), settings(1, 10, 1)),
                (changed.clone(), settings(1, 10, 1)),
                (removed.clone(), settings(1, 10, 1)),
            ],
            clock,
        );
        let held = limits.admit(&kept, 1).unwrap();
        limits.admit(&changed, 1).unwrap();
        limits.admit(&removed, 1).unwrap();

        // Only the daily quota differs for `kept`: not a rate setting, so its state stays.
        let kept_limits = ClientLimits {
            images_per_day: 5,
            ..settings(1, 10, 1)
        };
        limits.reconfigure(&[
            (kept.clone(), kept_limits),
            (changed.clone(), settings(2, 10, 1)),
            (added.clone(), settings(1, 10, 1)),
        ]);

        let (kind, _, _) = limited(limits.admit(&kept, 1));
        assert_eq!(
            kind,
            LimitKind::Concurrency,
            "the held permit was forgotten"
        );
        drop(held);
        let (kind, _, _) = limited(limits.admit(&kept, 1));
        assert_eq!(kind, LimitKind::Requests, "the spent request was forgotten");

        let fresh = limits.admit(&changed, 1).unwrap();
        assert_eq!(fresh.headers.limit_requests, 2);
        assert_eq!(fresh.headers.remaining_requests, 1);
        assert!(matches!(
            limits.admit(&removed, 1),
            Err(RateLimitError::UnknownClient)
        ));
        limits.admit(&added, 1).unwrap();
    }

    #[test]
    fn limit_kinds_have_metric_labels() {
        let labels = [
            LimitKind::Requests,
            LimitKind::Images,
            LimitKind::Concurrency,
            LimitKind::Polls,
        ]
        .map(LimitKind::as_str);
        assert_eq!(labels, ["requests", "images", "concurrency", "polls"]);
    }

    #[test]
    fn rate_limits_are_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<RateLimits>();
        assert_send_sync::<Admission>();
    }
}
