//! The response cache: keys, the byte-bounded store of successful generations, and coalescing
//! of identical concurrent requests into one upstream call.
//!
//! Owns: [`CacheKey`] (what makes two requests "the same"), [`CachePolicy`] (what a request's
//! `Cache-Control` and the client's `cache` setting allow), and [`ResponseCache`], which serves
//! a stored answer, joins an identical generation already running, or runs the caller's work in
//! a task of its own. Every generation that goes through here, cached or not, runs in that
//! task, so a client disconnect never cancels an upstream call half-way: the call is finished,
//! its usage committed by the work itself, and its answer stored for the next identical request.
//!
//! Must not: make upstream calls or touch quotas itself (that is the caller's `work`), store
//! anything but successes, or hand one client's error to another client (see "Errors" below).
//!
//! # Keys
//! A key is the SHA-256 of, in this order: a version tag, the client id when
//! `scope = "client"`, the client-facing model name, and the forwarded request body
//! ([`crate::upstream::forwarded_body`], already normalised by validation: defaults filled in,
//! fields in a fixed order) with `user` removed. The forwarded body covers `upstream_model`,
//! `prompt`, `size`, `quality`, `n`, `response_format`, `style`, `background`,
//! `output_format`, `output_compression` and `moderation`, and any field added to it later is
//! covered without a change here. `user` is left out because it is an end-user tag for the
//! provider's abuse tracking, not part of what is generated. The client-facing model name is
//! kept because two configured models may share an upstream model but not their upstreams.
//!
//! # Policy (`Cache-Control` request directives, RFC 9111 §5.2.1)
//! - `no-cache`: the client wants a fresh generation. The request neither reads the store nor
//!   joins a generation that started before it asked (that one may be working from an answer
//!   the client no longer wants), and its result replaces the stored entry. Requests arriving
//!   while it runs may join it: it is exactly the fresh answer they would otherwise make.
//! - `no-store`: nothing of this response is kept. The request may still be answered from the
//!   store or by joining a generation in flight, as RFC 9111 allows ("the no-store request
//!   directive does not apply to the already stored response"); a generation it runs itself is
//!   neither stored nor joinable by others.
//! - both, or the cache disabled globally or for the client: the cache is bypassed ("bypass").
//!
//! # Errors
//! Errors are never stored. When a generation fails, requests that joined it get its error only
//! under `scope = "client"`, where they are the same client with the same request and would
//! have failed the same way. Under `scope = "shared"` the error may be about the leader's client
//! (its quota, its budget), so the joined requests instead look again: one of them runs its own
//! work and the others join that; a request that has seen two joined generations fail runs its
//! own work without joining again. A request's `work` therefore runs at most once, and nobody
//! waits on more than two generations before its own. A generation whose task panicked counts
//! as failed for those who joined it; its leader gets [`GenerationLost`] (a 500 for
//! [`ApiError`]).
//!
//! # Lifetime of entries
//! `ttl_secs` must stay below the upstream's image-URL lifetime: `response_format = "url"`
//! answers point at upstream-hosted images that expire (often after about an hour), and a
//! cached answer whose URLs have expired is a broken answer. Config validation enforces it
//! against every upstream's `url_lifetime_secs`, and a reload is checked against the TTL in
//! force ([`ResponseCache::ttl`]), since `[cache]` changes need a restart. The store is bounded by
//! `max_bytes` of response bodies (plus a fixed per-entry overhead); a single body larger than
//! `max_bytes / 8` is never stored, so one huge `b64_json` answer cannot flush the cache.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
use sha2::{Digest, Sha256};
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::auth::ClientId;
use crate::config::{CacheConfig, CacheScope};
use crate::error::ApiError;
use crate::upstream::{UpstreamResponse, forwarded_body};
use crate::validate::ValidRequest;

/// Bytes charged per entry on top of its body: the key, the response's fields and moka's own
/// bookkeeping. It keeps a flood of tiny answers bounded too.
const ENTRY_OVERHEAD: usize = 512;

/// moka refuses a time-to-live beyond 1000 years (it panics); no sane config comes near this.
const MAX_TTL: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// Generations a request may join and see fail (under `scope = "shared"`) before it runs its
/// own work regardless.
const MAX_FAILED_JOINS: u8 = 2;

/// Identifies a generation request for the cache: SHA-256 of its normalised form (see the
/// module docs for exactly what goes in).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CacheKey([u8; 32]);

impl CacheKey {
    fn new(request: &ValidRequest, client: Option<&ClientId>) -> CacheKey {
        let mut without_user = request.clone();
        without_user.user = None;
        let mut hasher = Sha256::new();
        hasher.update(b"imagegate.cache.v1\n");
        // Length prefixes keep the variable parts from running into each other.
        match client {
            Some(client) => {
                hasher.update(b"client\n");
                update_prefixed(&mut hasher, client.as_str().as_bytes());
            }
            None => hasher.update(b"shared\n"),
        }
        update_prefixed(&mut hasher, request.model.name().as_bytes());
        hasher.update(forwarded_body(&without_user));
        CacheKey(hasher.finalize().into())
    }
}

fn update_prefixed(hasher: &mut Sha256, part: &[u8]) {
    hasher.update((part.len() as u64).to_be_bytes());
    hasher.update(part);
}

impl std::fmt::Debug for CacheKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A prefix is enough to tell keys apart in logs.
        write!(f, "CacheKey({}…)", hex::encode(&self.0[..8]))
    }
}

/// What one request lets the cache do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CachePolicy {
    /// May be answered from the store or by joining an identical generation in flight.
    pub read: bool,
    /// May have its own generation stored (and joined by others while it runs).
    pub store: bool,
}

impl CachePolicy {
    /// A request without `Cache-Control` from a client that uses the cache.
    pub const NORMAL: CachePolicy = CachePolicy {
        read: true,
        store: true,
    };
    /// The cache plays no part.
    pub const BYPASS: CachePolicy = CachePolicy {
        read: false,
        store: false,
    };

    /// The policy for a request with this `Cache-Control` value (several header lines joined
    /// with `,`), for a client whose `cache` setting is `client_allows`, with the cache
    /// `enabled` or not. Directive names are matched case-insensitively; arguments and
    /// directives other than `no-cache` and `no-store` are ignored.
    pub fn from_request(
        cache_control: Option<&str>,
        client_allows: bool,
        enabled: bool,
    ) -> CachePolicy {
        if !(enabled && client_allows) {
            return CachePolicy::BYPASS;
        }
        let mut policy = CachePolicy::NORMAL;
        // A comma inside a quoted argument would split a directive in two; request directives
        // take no quoted arguments, and a misread can only make the cache do less.
        for directive in cache_control.unwrap_or_default().split(',') {
            let name = directive
                .split_once('=')
                .map_or(directive, |(n, _)| n)
                .trim();
            if name.eq_ignore_ascii_case("no-cache") {
                policy.read = false;
            } else if name.eq_ignore_ascii_case("no-store") {
                policy.store = false;
            }
        }
        policy
    }

    fn is_bypass(self) -> bool {
        !self.read && !self.store
    }
}

/// How a request was answered, for the `x-imagegate-cache` header and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheOutcome {
    /// From the store; no work ran.
    Hit,
    /// The request's own work ran with the cache involved (read, store or both).
    Miss,
    /// Answered by an identical generation another request started; no work of its own ran.
    Coalesced,
    /// The cache played no part; the request's own work ran.
    Bypass,
}

impl CacheOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            CacheOutcome::Hit => "hit",
            CacheOutcome::Miss => "miss",
            CacheOutcome::Coalesced => "coalesced",
            CacheOutcome::Bypass => "bypass",
        }
    }
}

/// Counters for metrics. Outcomes are counted when known; `entries` and `weighted_bytes` are
/// moka's estimates, which lag its pending housekeeping a little.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    pub coalesced: u64,
    pub bypass: u64,
    /// Entries dropped for size or expiry (not replacements by a refresh).
    pub evictions: u64,
    pub entries: u64,
    /// Stored body bytes plus per-entry overhead; kept at or below `max_bytes`.
    pub weighted_bytes: u64,
}

/// A generation task ended without an answer: it panicked, or the runtime is shutting down.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the generation task ended without an answer")]
pub struct GenerationLost;

impl From<GenerationLost> for ApiError {
    fn from(_: GenerationLost) -> ApiError {
        ApiError::internal()
    }
}

/// What a generation task ended with, as its leader and every request that joined it see it.
type Landing<E> = Result<Result<UpstreamResponse, E>, GenerationLost>;

/// A running generation that identical requests may join. Polling it only waits for the task;
/// dropping it (a client leaving) leaves the task running.
type Flight<E> = Shared<BoxFuture<'static, Landing<E>>>;

struct PendingGeneration<E> {
    /// Tells this generation from a later one under the same key when it deregisters.
    id: u64,
    flight: Flight<E>,
}

type InFlight<E> = Arc<Mutex<HashMap<CacheKey, PendingGeneration<E>>>>;

/// Where a request goes after looking at the generations in flight.
enum Step<F, E> {
    /// An identical generation is running; the request's own work is handed back unused.
    Join(Flight<E>, F),
    /// A stored answer appeared since the request looked; look again before running work.
    Recheck(F),
    /// The request's work now runs in a task of its own.
    Lead(Flight<E>),
}

#[derive(Debug, Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    coalesced: AtomicU64,
    bypass: AtomicU64,
}

/// The response cache with request coalescing. `E` is the work's error type.
pub struct ResponseCache<E = ApiError> {
    enabled: bool,
    scope: CacheScope,
    /// Bodies longer than this are never stored.
    max_entry_bytes: usize,
    entries: moka::future::Cache<CacheKey, UpstreamResponse>,
    /// The generations running now, by key. The lock is never held across an await, and the
    /// map changes only when a generation starts or ends, so contention stays negligible.
    in_flight: InFlight<E>,
    next_generation_id: AtomicU64,
    tasks: TaskTracker,
    counters: Counters,
    evictions: Arc<AtomicU64>,
}

impl<E> ResponseCache<E>
where
    E: From<GenerationLost> + Clone + Send + Sync + 'static,
{
    pub fn new(config: &CacheConfig) -> Self {
        let entry_limit = (config.max_bytes / 8).min(u64::from(u32::MAX) - ENTRY_OVERHEAD as u64);
        let evictions = Arc::new(AtomicU64::new(0));
        let counted = Arc::clone(&evictions);
        let entries = moka::future::Cache::builder()
            .max_capacity(config.max_bytes)
            // Cannot saturate: stored bodies are at most `entry_limit`, chosen to fit a u32.
            .weigher(|_key, response: &UpstreamResponse| {
                u32::try_from(response.body.len().saturating_add(ENTRY_OVERHEAD))
                    .unwrap_or(u32::MAX)
            })
            .time_to_live(Duration::from_secs(config.ttl_secs.max(1)).min(MAX_TTL))
            .eviction_listener(move |_key, _response, cause| {
                // A refresh replacing an entry is not an eviction; size and expiry are.
                if cause.was_evicted() {
                    counted.fetch_add(1, Ordering::Relaxed);
                }
            })
            .build();
        ResponseCache {
            enabled: config.enabled,
            scope: config.scope,
            max_entry_bytes: usize::try_from(entry_limit).unwrap_or(usize::MAX),
            entries,
            in_flight: Arc::default(),
            next_generation_id: AtomicU64::new(0),
            tasks: TaskTracker::new(),
            counters: Counters::default(),
            evictions,
        }
    }

    /// The key of `request` from `client`; the client is part of it when `scope = "client"`.
    pub fn key(&self, request: &ValidRequest, client: &ClientId) -> CacheKey {
        CacheKey::new(
            request,
            (self.scope == CacheScope::Client).then_some(client),
        )
    }

    /// Serves from the store, joins an identical generation in flight, or runs `work` in its
    /// own task. `work` performs quota reservation, the upstream call and the usage commit; it
    /// runs to completion even if the returned future is dropped, and its success is stored
    /// when `policy.store` allows. See the module docs for how `policy` and errors play out.
    pub async fn get_or_generate<F>(
        &self,
        key: CacheKey,
        policy: CachePolicy,
        work: F,
    ) -> (Result<UpstreamResponse, E>, CacheOutcome)
    where
        F: Future<Output = Result<UpstreamResponse, E>> + Send + 'static,
    {
        let policy = if self.enabled {
            policy
        } else {
            CachePolicy::BYPASS
        };
        if policy.is_bypass() {
            self.counters.bypass.fetch_add(1, Ordering::Relaxed);
            let flight = self.spawn(key, false, None, work);
            return (land(flight.await), CacheOutcome::Bypass);
        }

        let mut work = work;
        let mut failed_joins = 0;
        let mut rechecked = false;
        loop {
            if policy.read
                && let Some(response) = self.entries.get(&key).await
            {
                self.counters.hits.fetch_add(1, Ordering::Relaxed);
                return (Ok(response), CacheOutcome::Hit);
            }
            let may_join = policy.read && failed_joins < MAX_FAILED_JOINS;
            let may_recheck = policy.read && !rechecked;
            match self.join_or_lead(key, policy.store, may_join, may_recheck, work) {
                Step::Lead(flight) => {
                    // Counted before waiting: a leader whose client leaves still made the call.
                    self.counters.misses.fetch_add(1, Ordering::Relaxed);
                    return (land(flight.await), CacheOutcome::Miss);
                }
                Step::Recheck(unused) => {
                    work = unused;
                    rechecked = true;
                }
                Step::Join(flight, unused) => {
                    work = unused;
                    match flight.await {
                        Ok(Ok(response)) => {
                            self.counters.coalesced.fetch_add(1, Ordering::Relaxed);
                            return (Ok(response), CacheOutcome::Coalesced);
                        }
                        Ok(Err(error)) if self.scope == CacheScope::Client => {
                            self.counters.coalesced.fetch_add(1, Ordering::Relaxed);
                            return (Err(error), CacheOutcome::Coalesced);
                        }
                        Ok(Err(_)) | Err(GenerationLost) => failed_joins += 1,
                    }
                }
            }
        }
    }

    /// Decides, under the in-flight lock, whether this request joins a running generation or
    /// starts its own; deciding and registering under one lock is what makes exactly one of
    /// several identical requests the leader.
    fn join_or_lead<F>(
        &self,
        key: CacheKey,
        store: bool,
        may_join: bool,
        may_recheck: bool,
        work: F,
    ) -> Step<F, E>
    where
        F: Future<Output = Result<UpstreamResponse, E>> + Send + 'static,
    {
        let mut in_flight = lock(&self.in_flight);
        if let Some(pending) = in_flight.get(&key) {
            if may_join {
                return Step::Join(pending.flight.clone(), work);
            }
            // Joining is not allowed and the key is taken: run alone.
            drop(in_flight);
            return Step::Lead(self.spawn(key, store, None, work));
        }
        // A generation stores its answer before it deregisters, so an answer that landed
        // between this request's read and taking the lock is visible here.
        if may_recheck && self.entries.contains_key(&key) {
            return Step::Recheck(work);
        }
        if !store {
            // A no-store generation is nobody else's to share.
            drop(in_flight);
            return Step::Lead(self.spawn(key, false, None, work));
        }
        let id = self.next_generation_id.fetch_add(1, Ordering::Relaxed);
        let flight = self.spawn(key, true, Some(id), work);
        in_flight.insert(
            key,
            PendingGeneration {
                id,
                flight: flight.clone(),
            },
        );
        Step::Lead(flight)
    }

    /// Runs `work` on the tracker, stores its success when `store`, and, for a registered
    /// generation (`registration`), removes it from the in-flight map when it ends.
    fn spawn<F>(&self, key: CacheKey, store: bool, registration: Option<u64>, work: F) -> Flight<E>
    where
        F: Future<Output = Result<UpstreamResponse, E>> + Send + 'static,
    {
        let entries = self.entries.clone();
        let max_entry_bytes = self.max_entry_bytes;
        let deregister = registration.map(|id| Deregister {
            in_flight: Arc::clone(&self.in_flight),
            key,
            id,
        });
        let task = async move {
            // Dropped when the task ends, also by panic, so no request can ever join a
            // generation that will not land. Declared first so it is dropped after the insert:
            // a request arriving between the two finds the stored answer, not a duplicate call.
            let _deregister = deregister;
            let result = work.await;
            if store && let Ok(response) = &result {
                if response.body.len() <= max_entry_bytes {
                    // Boxed: moka's insert future would otherwise be laid out in every
                    // generation task for the whole upstream call.
                    Box::pin(entries.insert(key, response.clone())).await;
                } else {
                    tracing::debug!(bytes = response.body.len(), "response too large to cache");
                }
            }
            result
        };
        // The request's span follows the work into its task, so its logs stay attributed.
        let handle = self.tasks.spawn(task.instrument(tracing::Span::current()));
        async move {
            handle.await.map_err(|e| {
                tracing::error!(
                    panicked = e.is_panic(),
                    "generation task ended without an answer"
                );
                GenerationLost
            })
        }
        .boxed()
        .shared()
    }

    /// Counters for metrics.
    /// Applies moka's pending housekeeping (evictions, weights), so that `stats` is exact.
    /// Metrics scrapes call it; requests never wait for it.
    pub async fn settle(&self) {
        self.entries.run_pending_tasks().await;
    }

    /// The entry lifetime in force, or `None` when the cache is off.
    pub fn ttl(&self) -> Option<Duration> {
        if self.enabled {
            self.entries.policy().time_to_live()
        } else {
            None
        }
    }

    pub fn stats(&self) -> CacheStats {
        let c = &self.counters;
        CacheStats {
            hits: c.hits.load(Ordering::Relaxed),
            misses: c.misses.load(Ordering::Relaxed),
            coalesced: c.coalesced.load(Ordering::Relaxed),
            bypass: c.bypass.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
            entries: self.entries.entry_count(),
            weighted_bytes: self.entries.weighted_size(),
        }
    }

    /// Waits for every generation in flight to finish (and be stored), for shutdown. The cache
    /// stays usable: work started afterwards is still tracked, and a later `close` waits for it.
    pub async fn close(&self) {
        self.tasks.close();
        self.tasks.wait().await;
    }
}

impl<E> std::fmt::Debug for ResponseCache<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseCache")
            .field("enabled", &self.enabled)
            .field("scope", &self.scope)
            .field("entries", &self.entries.entry_count())
            .finish_non_exhaustive()
    }
}

/// Removes a finished generation from the in-flight map.
struct Deregister<E> {
    in_flight: InFlight<E>,
    key: CacheKey,
    id: u64,
}

impl<E> Drop for Deregister<E> {
    fn drop(&mut self) {
        let removed = {
            let mut in_flight = lock(&self.in_flight);
            match in_flight.get(&self.key) {
                Some(pending) if pending.id == self.id => in_flight.remove(&self.key),
                _ => None,
            }
        };
        // Dropped outside the lock: it holds this very task's handle.
        drop(removed);
    }
}

/// The map is consistent after any panic (each critical section is a single get, insert or
/// remove), so a poisoned lock is taken over rather than spreading the panic to every request.
fn lock<E>(
    in_flight: &Mutex<HashMap<CacheKey, PendingGeneration<E>>>,
) -> MutexGuard<'_, HashMap<CacheKey, PendingGeneration<E>>> {
    in_flight.lock().unwrap_or_else(PoisonError::into_inner)
}

fn land<E: From<GenerationLost>>(landing: Landing<E>) -> Result<UpstreamResponse, E> {
    landing.unwrap_or_else(|lost| Err(E::from(lost)))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use bytes::Bytes;
    use futures_util::future::join_all;
    use serde_json::{Value, json};
    use tokio::sync::{Notify, oneshot};

    use super::*;
    use crate::auth::{ClientKeys, key_digest_hex};
    use crate::config::{ClientConfig, Config, ModelConfig};
    use crate::validate::{Models, validate};

    type Work = BoxFuture<'static, Result<UpstreamResponse, ApiError>>;

    /// Two models that share an upstream model, and two clients.
    struct World {
        models: Models,
        keys: ClientKeys,
    }

    impl World {
        fn new() -> World {
            let mut config = Config::default();
            let mut twin = ModelConfig::new("img-twin", &[]);
            twin.upstream_model = Some("img".into());
            config.models.push(ModelConfig::new("img", &[]));
            config.models.push(twin);
            for name in ["a", "b"] {
                let digest = key_digest_hex(&format!("sk-{name}"));
                config
                    .clients
                    .push(ClientConfig::new(&format!("team-{name}"), &digest));
            }
            World {
                models: Models::from_config(&config),
                keys: ClientKeys::from_config(&config),
            }
        }

        fn client(&self, name: &str) -> ClientId {
            let header = format!("Bearer sk-{name}");
            self.keys
                .authenticate(Some(header.as_bytes()))
                .unwrap()
                .id
                .clone()
        }

        fn request(&self, body: Value) -> ValidRequest {
            let client = self.keys.authenticate(Some(b"Bearer sk-a")).unwrap();
            validate(body.as_object().unwrap(), &self.models, &client).unwrap()
        }

        fn fox(&self) -> ValidRequest {
            self.request(json!({"model": "img", "prompt": "a red fox"}))
        }
    }

    fn config(scope: CacheScope) -> CacheConfig {
        CacheConfig {
            enabled: true,
            scope,
            ttl_secs: 600,
            max_bytes: 64 << 20,
        }
    }

    fn answer(body: impl Into<Bytes>) -> UpstreamResponse {
        UpstreamResponse {
            body: body.into(),
            images: 1,
            upstream: Arc::from("up"),
            key_id: Arc::from("key-1"),
            upstream_request_id: None,
        }
    }

    fn body(result: &Result<UpstreamResponse, ApiError>) -> &[u8] {
        &result.as_ref().unwrap().body
    }

    /// Work that counts its run and answers `text` at once.
    fn instant(calls: &Arc<AtomicUsize>, text: &'static str) -> Work {
        let calls = Arc::clone(calls);
        async move {
            calls.fetch_add(1, Ordering::SeqCst);
            Ok(answer(text))
        }
        .boxed()
    }

    /// Work that counts its run and ends with `result` once `gate` is notified.
    fn gated(
        calls: &Arc<AtomicUsize>,
        gate: &Arc<Notify>,
        result: Result<UpstreamResponse, ApiError>,
    ) -> Work {
        let (calls, gate) = (Arc::clone(calls), Arc::clone(gate));
        async move {
            calls.fetch_add(1, Ordering::SeqCst);
            gate.notified().await;
            result
        }
        .boxed()
    }

    fn failing(calls: &Arc<AtomicUsize>) -> Work {
        let calls = Arc::clone(calls);
        async move {
            calls.fetch_add(1, Ordering::SeqCst);
            Err(ApiError::internal())
        }
        .boxed()
    }

    /// Holders of the generation running under `key`: the in-flight map itself, its leader
    /// (while connected) and every request that joined it.
    fn participants(cache: &ResponseCache, key: &CacheKey) -> usize {
        lock(&cache.in_flight)
            .get(key)
            .and_then(|p| p.flight.strong_count())
            .unwrap_or(0)
    }

    /// Yields until `condition` holds; the other futures of the test run meanwhile.
    async fn until(mut condition: impl FnMut() -> bool) {
        for _ in 0..10_000 {
            if condition() {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("condition never held");
    }

    fn count(outcomes: &[CacheOutcome], wanted: CacheOutcome) -> usize {
        outcomes.iter().filter(|o| **o == wanted).count()
    }

    #[tokio::test]
    async fn fifty_identical_concurrent_requests_make_one_call_and_a_repeat_is_a_hit() {
        let world = World::new();
        let cache: ResponseCache = ResponseCache::new(&config(CacheScope::Client));
        let key = cache.key(&world.fox(), &world.client("a"));
        let calls = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(Notify::new());

        let requests = join_all((0..50).map(|_| {
            let work = gated(&calls, &gate, Ok(answer("fox")));
            cache.get_or_generate(key, CachePolicy::NORMAL, work)
        }));
        let release = async {
            until(|| participants(&cache, &key) == 51).await;
            gate.notify_one();
        };
        let (results, ()) = tokio::join!(requests, release);

        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(results.iter().all(|(r, _)| body(r) == b"fox"));
        let outcomes: Vec<_> = results.iter().map(|(_, o)| *o).collect();
        assert_eq!(count(&outcomes, CacheOutcome::Miss), 1);
        assert_eq!(count(&outcomes, CacheOutcome::Coalesced), 49);

        let (again, outcome) = cache
            .get_or_generate(key, CachePolicy::NORMAL, instant(&calls, "other"))
            .await;
        assert_eq!((body(&again), outcome), (&b"fox"[..], CacheOutcome::Hit));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        let stats = cache.stats();
        assert_eq!(
            (stats.hits, stats.misses, stats.coalesced, stats.bypass),
            (1, 1, 49, 0)
        );
        assert!(lock(&cache.in_flight).is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn racing_requests_on_many_threads_generate_each_key_once() {
        let cache: Arc<ResponseCache> = Arc::new(ResponseCache::new(&config(CacheScope::Shared)));
        let calls = Arc::new(AtomicUsize::new(0));
        let requests: Vec<_> = (0..400u32)
            .map(|i| {
                let (cache, calls) = (Arc::clone(&cache), Arc::clone(&calls));
                tokio::spawn(async move {
                    let key = CacheKey(Sha256::digest((i % 8).to_be_bytes()).into());
                    let work = async move {
                        calls.fetch_add(1, Ordering::SeqCst);
                        tokio::task::yield_now().await;
                        Ok(answer("image"))
                    };
                    cache.get_or_generate(key, CachePolicy::NORMAL, work).await
                })
            })
            .collect();
        for request in join_all(requests).await {
            assert!(request.unwrap().0.is_ok());
        }
        // Whenever a request arrives, the answer is either stored or in flight: never neither.
        assert_eq!(calls.load(Ordering::SeqCst), 8);
        let stats = cache.stats();
        assert_eq!((stats.misses, stats.hits + stats.coalesced), (8, 392));
    }

    #[tokio::test]
    async fn client_scope_keeps_clients_apart_and_shared_scope_does_not() {
        let world = World::new();
        for (scope, runs, second) in [
            (CacheScope::Client, 2, CacheOutcome::Miss),
            (CacheScope::Shared, 1, CacheOutcome::Hit),
        ] {
            let cache: ResponseCache = ResponseCache::new(&config(scope));
            let calls = Arc::new(AtomicUsize::new(0));
            let key_a = cache.key(&world.fox(), &world.client("a"));
            let key_b = cache.key(&world.fox(), &world.client("b"));
            let (first, _) = cache
                .get_or_generate(key_a, CachePolicy::NORMAL, instant(&calls, "a"))
                .await;
            assert!(first.is_ok());
            let (_, outcome) = cache
                .get_or_generate(key_b, CachePolicy::NORMAL, instant(&calls, "b"))
                .await;
            assert_eq!(calls.load(Ordering::SeqCst), runs, "{scope:?}");
            assert_eq!(outcome, second, "{scope:?}");
        }
    }

    #[tokio::test]
    async fn every_generated_field_is_in_the_key_and_user_is_not() {
        let world = World::new();
        let cache: ResponseCache = ResponseCache::new(&config(CacheScope::Client));
        let a = world.client("a");
        let key = |body: Value| cache.key(&world.request(body), &a);
        let base = json!({"model": "img", "prompt": "a red fox", "size": "1024x1024",
            "quality": "standard", "n": 1, "response_format": "url"});
        let base_key = key(base.clone());

        for (field, value) in [
            ("model", json!("img-twin")),
            ("prompt", json!("a red fox ")),
            ("size", json!("1536x1024")),
            ("quality", json!("hd")),
            ("n", json!(2)),
            ("response_format", json!("b64_json")),
        ] {
            let mut changed = base.clone();
            changed[field] = value;
            assert_ne!(key(changed), base_key, "{field}");
        }
        let mut tagged = base.clone();
        tagged["user"] = json!("end-user-42");
        assert_eq!(key(tagged.clone()), base_key);
        // Defaults are filled in before hashing: leaving them out is the same request.
        assert_eq!(
            key(json!({"model": "img", "prompt": "a red fox"})),
            base_key
        );

        let calls = Arc::new(AtomicUsize::new(0));
        let (stored, _) = cache
            .get_or_generate(base_key, CachePolicy::NORMAL, instant(&calls, "fox"))
            .await;
        assert!(stored.is_ok());
        let (_, outcome) = cache
            .get_or_generate(key(tagged), CachePolicy::NORMAL, instant(&calls, "x"))
            .await;
        assert_eq!(outcome, CacheOutcome::Hit);
        let mut hd = base.clone();
        hd["quality"] = json!("hd");
        let (_, outcome) = cache
            .get_or_generate(key(hd), CachePolicy::NORMAL, instant(&calls, "x"))
            .await;
        assert_eq!(outcome, CacheOutcome::Miss);
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn errors_are_never_stored() {
        let world = World::new();
        let cache: ResponseCache = ResponseCache::new(&config(CacheScope::Client));
        let key = cache.key(&world.fox(), &world.client("a"));
        let calls = Arc::new(AtomicUsize::new(0));

        let (first, outcome) = cache
            .get_or_generate(key, CachePolicy::NORMAL, failing(&calls))
            .await;
        assert_eq!(first.unwrap_err().status().as_u16(), 500);
        assert_eq!(outcome, CacheOutcome::Miss);
        let (second, outcome) = cache
            .get_or_generate(key, CachePolicy::NORMAL, instant(&calls, "fox"))
            .await;
        assert_eq!((body(&second), outcome), (&b"fox"[..], CacheOutcome::Miss));
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn under_client_scope_joined_requests_share_the_leaders_error() {
        let world = World::new();
        let cache: ResponseCache = ResponseCache::new(&config(CacheScope::Client));
        let key = cache.key(&world.fox(), &world.client("a"));
        let calls = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(Notify::new());

        let requests = join_all((0..3).map(|_| {
            let work = gated(&calls, &gate, Err(ApiError::internal()));
            cache.get_or_generate(key, CachePolicy::NORMAL, work)
        }));
        let release = async {
            until(|| participants(&cache, &key) == 4).await;
            gate.notify_one();
        };
        let (results, ()) = tokio::join!(requests, release);

        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(results.iter().all(|(r, _)| r.is_err()));
        let outcomes: Vec<_> = results.iter().map(|(_, o)| *o).collect();
        assert_eq!(count(&outcomes, CacheOutcome::Coalesced), 2);
    }

    #[tokio::test]
    async fn under_shared_scope_a_leaders_error_does_not_reach_other_requests() {
        let world = World::new();
        let cache: ResponseCache = ResponseCache::new(&config(CacheScope::Shared));
        let key = cache.key(&world.fox(), &world.client("a"));
        let calls = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(Notify::new());
        let quota_exhausted = ApiError::unavailable("insufficient_quota", "team-a is out");

        let leader = cache.get_or_generate(
            key,
            CachePolicy::NORMAL,
            gated(&calls, &gate, Err(quota_exhausted)),
        );
        let joiner = || async {
            until(|| participants(&cache, &key) >= 2).await;
            cache
                .get_or_generate(key, CachePolicy::NORMAL, instant(&calls, "fox"))
                .await
        };
        let release = async {
            until(|| participants(&cache, &key) == 4).await;
            gate.notify_one();
        };
        let (led, first, second, ()) = tokio::join!(leader, joiner(), joiner(), release);

        assert_eq!(led.0.unwrap_err().code(), Some("insufficient_quota"));
        assert_eq!(
            (body(&first.0), body(&second.0)),
            (&b"fox"[..], &b"fox"[..])
        );
        // One of the joined requests ran its own work; the other joined that run.
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        let outcomes = [first.1, second.1];
        assert_eq!(count(&outcomes, CacheOutcome::Miss), 1);
        assert_eq!(count(&outcomes, CacheOutcome::Coalesced), 1);
    }

    #[tokio::test]
    async fn no_cache_refreshes_no_store_keeps_nothing_and_disabled_bypasses() {
        let world = World::new();
        let cache: ResponseCache = ResponseCache::new(&config(CacheScope::Client));
        let a = world.client("a");
        let fox = cache.key(&world.fox(), &a);
        let cat = cache.key(
            &world.request(json!({"model": "img", "prompt": "a cat"})),
            &a,
        );
        let calls = Arc::new(AtomicUsize::new(0));
        let policy = |header| CachePolicy::from_request(Some(header), true, true);
        let run = |key, policy, text| cache.get_or_generate(key, policy, instant(&calls, text));

        let (old, _) = run(fox, CachePolicy::NORMAL, "old").await;
        assert_eq!(body(&old), b"old");
        let (fresh, outcome) = run(fox, policy("no-cache"), "new").await;
        assert_eq!((body(&fresh), outcome), (&b"new"[..], CacheOutcome::Miss));
        let (stored, outcome) = run(fox, CachePolicy::NORMAL, "unused").await;
        assert_eq!((body(&stored), outcome), (&b"new"[..], CacheOutcome::Hit));
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        cache.entries.run_pending_tasks().await;
        assert_eq!(cache.stats().evictions, 0, "a refresh is not an eviction");

        // no-store may be served what is stored, but keeps nothing of its own.
        let (stored, outcome) = run(fox, policy("no-store"), "unused").await;
        assert_eq!((body(&stored), outcome), (&b"new"[..], CacheOutcome::Hit));
        let (_, outcome) = run(cat, policy("no-store"), "cat").await;
        assert_eq!(outcome, CacheOutcome::Miss);
        let (_, outcome) = run(cat, CachePolicy::NORMAL, "cat").await;
        assert_eq!(outcome, CacheOutcome::Miss);
        assert_eq!(calls.load(Ordering::SeqCst), 4);

        let (fresh, outcome) = run(fox, policy("no-cache, no-store"), "newest").await;
        assert_eq!(
            (body(&fresh), outcome),
            (&b"newest"[..], CacheOutcome::Bypass)
        );
        let (stored, _) = run(fox, CachePolicy::NORMAL, "unused").await;
        assert_eq!(body(&stored), b"new");

        let mut off = config(CacheScope::Client);
        off.enabled = false;
        let disabled: ResponseCache = ResponseCache::new(&off);
        for _ in 0..2 {
            let (_, outcome) = disabled
                .get_or_generate(fox, CachePolicy::NORMAL, instant(&calls, "x"))
                .await;
            assert_eq!(outcome, CacheOutcome::Bypass);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 7);
        assert_eq!(disabled.stats().bypass, 2);
    }

    #[test]
    fn cache_control_is_read_tolerantly() {
        let read_only = CachePolicy {
            read: true,
            store: false,
        };
        let fresh = CachePolicy {
            read: false,
            store: true,
        };
        for (header, client_allows, enabled, expected) in [
            (None, true, true, CachePolicy::NORMAL),
            (Some(""), true, true, CachePolicy::NORMAL),
            (Some("No-Cache"), true, true, fresh),
            (Some("no-cache=\"x\""), true, true, fresh),
            (Some(" max-age=0 ,NO-STORE "), true, true, read_only),
            (Some("no-store,no-cache"), true, true, CachePolicy::BYPASS),
            (
                Some("no-cachex, x-no-store"),
                true,
                true,
                CachePolicy::NORMAL,
            ),
            (None, false, true, CachePolicy::BYPASS),
            (None, true, false, CachePolicy::BYPASS),
        ] {
            assert_eq!(
                CachePolicy::from_request(header, client_allows, enabled),
                expected,
                "{header:?} {client_allows} {enabled}"
            );
        }
    }

    #[test]
    fn outcomes_have_their_header_values() {
        let values = [
            CacheOutcome::Hit,
            CacheOutcome::Miss,
            CacheOutcome::Coalesced,
            CacheOutcome::Bypass,
        ]
        .map(CacheOutcome::as_str);
        assert_eq!(values, ["hit", "miss", "coalesced", "bypass"]);
    }

    #[tokio::test]
    async fn stored_bytes_stay_within_max_bytes() {
        const MIB: usize = 1 << 20;
        let cache: ResponseCache = ResponseCache::new(&CacheConfig {
            max_bytes: 16 * MIB as u64,
            ..config(CacheScope::Shared)
        });
        // One buffer shared by every answer: the weigher counts each, memory holds one.
        let b64_sized = Bytes::from(vec![b'A'; MIB]);
        for i in 0..200u32 {
            let key = CacheKey(Sha256::digest(i.to_be_bytes()).into());
            let body = b64_sized.clone();
            let work = async move { Ok::<_, ApiError>(answer(body)) };
            let (stored, _) = cache.get_or_generate(key, CachePolicy::NORMAL, work).await;
            assert!(stored.is_ok());
        }
        cache.entries.run_pending_tasks().await;

        let stats = cache.stats();
        assert!(stats.weighted_bytes <= 16 * MIB as u64, "{stats:?}");
        assert!(stats.entries > 0 && stats.evictions > 0, "{stats:?}");
    }

    #[tokio::test]
    async fn a_body_over_an_eighth_of_max_bytes_is_not_stored() {
        let cache: ResponseCache = ResponseCache::new(&CacheConfig {
            max_bytes: 8 << 20,
            ..config(CacheScope::Shared)
        });
        let key = CacheKey([7; 32]);
        let calls = Arc::new(AtomicUsize::new(0));
        for _ in 0..2 {
            let calls = Arc::clone(&calls);
            let work = async move {
                calls.fetch_add(1, Ordering::SeqCst);
                Ok(answer(vec![b'A'; (1 << 20) + 1]))
            };
            let (_, outcome) = cache.get_or_generate(key, CachePolicy::NORMAL, work).await;
            assert_eq!(outcome, CacheOutcome::Miss);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    /// Work that counts its run, reports that it started, waits for `gate`, and counts
    /// that it finished.
    fn observed(
        calls: &Arc<AtomicUsize>,
        finished: &Arc<AtomicUsize>,
        gate: &Arc<Notify>,
        started: oneshot::Sender<()>,
    ) -> Work {
        let (calls, finished, gate) = (Arc::clone(calls), Arc::clone(finished), Arc::clone(gate));
        async move {
            calls.fetch_add(1, Ordering::SeqCst);
            let _ = started.send(());
            gate.notified().await;
            finished.fetch_add(1, Ordering::SeqCst);
            Ok(answer("fox"))
        }
        .boxed()
    }

    #[tokio::test]
    async fn a_leader_that_disconnects_still_finishes_and_stores_its_call() {
        let world = World::new();
        let cache: ResponseCache = ResponseCache::new(&config(CacheScope::Client));
        let key = cache.key(&world.fox(), &world.client("a"));
        let (calls, finished) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let gate = Arc::new(Notify::new());
        let (started_tx, started_rx) = oneshot::channel();

        let work = observed(&calls, &finished, &gate, started_tx);
        tokio::select! {
            _ = cache.get_or_generate(key, CachePolicy::NORMAL, work) => {
                panic!("the leader cannot finish before its work is released");
            }
            _ = started_rx => {}
        }
        // The leader's future is gone, as when its client disconnects mid-call.
        gate.notify_one();
        cache.close().await;
        assert_eq!(finished.load(Ordering::SeqCst), 1);

        let (again, outcome) = cache
            .get_or_generate(key, CachePolicy::NORMAL, instant(&calls, "other"))
            .await;
        assert_eq!((body(&again), outcome), (&b"fox"[..], CacheOutcome::Hit));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_joined_request_keeps_its_answer_when_the_leader_disconnects() {
        let world = World::new();
        let cache: ResponseCache = ResponseCache::new(&config(CacheScope::Client));
        let key = cache.key(&world.fox(), &world.client("a"));
        let (calls, finished) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let gate = Arc::new(Notify::new());
        let (started_tx, started_rx) = oneshot::channel();

        let leader = cache.get_or_generate(
            key,
            CachePolicy::NORMAL,
            observed(&calls, &finished, &gate, started_tx),
        );
        let joiner = async {
            until(|| participants(&cache, &key) == 2).await;
            cache
                .get_or_generate(key, CachePolicy::NORMAL, instant(&calls, "other"))
                .await
        };
        let disconnect_leader_then_release = async {
            let joined = async {
                let _ = started_rx.await;
                until(|| participants(&cache, &key) == 3).await;
            };
            tokio::select! {
                _ = leader => panic!("the leader cannot finish before its work is released"),
                () = joined => {}
            }
            assert_eq!(participants(&cache, &key), 2, "the leader has left");
            gate.notify_one();
        };
        let ((joined, outcome), ()) = tokio::join!(joiner, disconnect_leader_then_release);

        assert_eq!(
            (body(&joined), outcome),
            (&b"fox"[..], CacheOutcome::Coalesced)
        );
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        cache.close().await;
        assert_eq!(finished.load(Ordering::SeqCst), 1);
        let (_, outcome) = cache
            .get_or_generate(key, CachePolicy::NORMAL, instant(&calls, "other"))
            .await;
        assert_eq!(outcome, CacheOutcome::Hit);
    }

    #[tokio::test]
    async fn a_panicking_generation_is_an_internal_error_and_leaves_nothing_behind() {
        let world = World::new();
        let cache: ResponseCache = ResponseCache::new(&config(CacheScope::Client));
        let key = cache.key(&world.fox(), &world.client("a"));
        let calls = Arc::new(AtomicUsize::new(0));

        let work = async { panic!("work panicked on purpose") };
        let (result, outcome) = cache.get_or_generate(key, CachePolicy::NORMAL, work).await;
        assert_eq!(result.unwrap_err().status().as_u16(), 500);
        assert_eq!(outcome, CacheOutcome::Miss);
        assert!(lock(&cache.in_flight).is_empty());

        let (again, outcome) = cache
            .get_or_generate(key, CachePolicy::NORMAL, instant(&calls, "fox"))
            .await;
        assert_eq!((body(&again), outcome), (&b"fox"[..], CacheOutcome::Miss));
    }

    #[test]
    fn the_cache_and_its_futures_can_cross_threads() {
        fn send_sync<T: Send + Sync>(_: &T) {}
        fn send<T: Send>(_: T) {}
        let cache: ResponseCache = ResponseCache::new(&config(CacheScope::Client));
        send_sync(&cache);
        send(
            cache.get_or_generate(CacheKey([0; 32]), CachePolicy::NORMAL, async {
                Err(ApiError::internal())
            }),
        );
    }
}
