//! One upstream's key pool: per-key admission (rate and concurrency), key health (cooldown,
//! disabled, circuit breaker), and the fair queue requests wait in when every key is busy.
//!
//! Admission is exact: a key is never sent more than `requests_per_minute` requests in any
//! 60-second window (a sliding log of send times, not a token bucket, because a bucket's burst
//! would let a window hold more than the limit) nor more than `max_concurrent` at once.
//!
//! When no key can take a request now but some key will (busy, or pacing), the request waits in
//! a queue that is fair across clients: one FIFO per client, served round-robin, so one client's
//! burst cannot starve the others. The queue is bounded in length and in wait time. When no key
//! is usable at all (all disabled, cooling down or with an open circuit), `acquire` answers at
//! once instead of queueing.
//!
//! All state sits behind one `std::sync::Mutex`, never held across an `.await`. A small ticker
//! task per pool wakes the queue when time (not a release) frees capacity: a rate window
//! sliding, a cooldown or circuit interval ending.
//!
//! A config reload must not reset what protects the upstream, so a pool outlives reloads:
//! [`KeyPool::carry_over_from`] makes the newly built pool of an upstream share the live state
//! of the one it replaces (the same queue, the same per-key state, matched by key id), and
//! leases still out on the old snapshot settle into that same state. Per key:
//! - same secret (limits changed or not): everything is kept (rate window, in flight,
//!   cooldown, circuit, counters) and the new limits apply from now on, measured against the
//!   sends already in the window, so no window ever holds more than the new limit;
//! - a key disabled by a 401/403 is enabled again: "disabled until a config reload" is the
//!   documented promise, and a reload is how an operator says "try it again" after fixing the
//!   account at the provider (which need not change the secret). If the provider still refuses
//!   it, one call finds out and the key is disabled again;
//! - changed secret: the provider's verdicts (cooldown, circuit, disabled, reported limits)
//!   were about the old credential and are dropped; the rate window and in-flight count are
//!   kept, because the configured limits are the operator's statement about this slot and
//!   forgetting them could only let more through. A lease still out with the old secret frees
//!   its slot when it ends but its outcome is not held against the new secret;
//! - a key that is new gets a fresh state; a removed key's leases end without effect.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use axum::http::{HeaderMap, HeaderValue};
use serde::Serialize;
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};

const WINDOW: Duration = Duration::from_secs(60);
/// Consecutive failures (5xx, connection errors) that open a key's circuit.
const CIRCUIT_THRESHOLD: u32 = 5;
const CIRCUIT_BASE: Duration = Duration::from_secs(5);
const CIRCUIT_MAX: Duration = Duration::from_secs(300);
/// The shortest rest after a 429. `Retry-After: 0` would otherwise leave the key usable at
/// once, and the request that moves on after a 429 would be sent straight back to it.
const MIN_COOLDOWN: Duration = Duration::from_secs(1);
/// Recent counters cover this many one-minute buckets.
const RECENT_MINUTES: usize = 5;

/// Why no key could be had.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PoolError {
    /// Every key is cooling down or has an open circuit; the earliest is usable again after
    /// `retry_after`.
    #[error("every key is cooling down (next usable in {retry_after:?})")]
    AllCooling { retry_after: Duration },
    /// Every key is disabled (refused by the upstream) until a config reload.
    #[error("every key is disabled")]
    AllDisabled,
    /// The queue is at its bound.
    #[error("the upstream queue is full")]
    QueueFull { retry_after: Duration },
    /// Waited longer than the queue allows.
    #[error("waited too long for an upstream key")]
    QueueTimeout { retry_after: Duration },
}

/// Key health as ops see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyHealth {
    Healthy,
    CoolingDown,
    Disabled,
    CircuitOpen,
}

impl KeyHealth {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyHealth::Healthy => "healthy",
            KeyHealth::CoolingDown => "cooling_down",
            KeyHealth::Disabled => "disabled",
            KeyHealth::CircuitOpen => "circuit_open",
        }
    }

    pub const ALL: [KeyHealth; 4] = [
        KeyHealth::Healthy,
        KeyHealth::CoolingDown,
        KeyHealth::Disabled,
        KeyHealth::CircuitOpen,
    ];
}

#[derive(Debug, Clone)]
enum Health {
    Healthy,
    CoolingDown {
        until: Instant,
    },
    Disabled {
        status: u16,
    },
    /// Open until `until`; then one probe may go (half-open).
    CircuitOpen {
        until: Instant,
    },
}

/// One key's configuration and live state.
struct KeyState {
    /// Identifies this state for the pool's lifetime, across reloads (indexes shift when keys
    /// are added or removed; leases find their key by slot).
    slot: u64,
    id: Arc<str>,
    authorization: HeaderValue,
    /// Bumped when a reload changes the secret, so a lease taken with the old secret does not
    /// judge the new one.
    credential: u32,
    requests_per_minute: u32,
    max_concurrent: u32,
    in_flight: u32,
    /// Send times within the last minute, oldest first.
    sent: VecDeque<Instant>,
    health: Health,
    consecutive_failures: u32,
    circuit_interval: Duration,
    /// A half-open probe is in flight: no other request may use the key.
    probing: bool,
    totals: Outcomes,
    recent: [(u64, Outcomes); RECENT_MINUTES],
    upstream_limits: Option<UpstreamLimits>,
}

/// Counters of attempt outcomes.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Outcomes {
    pub success: u64,
    pub rate_limited: u64,
    pub server_error: u64,
    pub connect_error: u64,
    pub refused: u64,
    pub other: u64,
}

impl Outcomes {
    fn add(&mut self, o: &Outcomes) {
        self.success += o.success;
        self.rate_limited += o.rate_limited;
        self.server_error += o.server_error;
        self.connect_error += o.connect_error;
        self.refused += o.refused;
        self.other += o.other;
    }
}

/// What the upstream last said about this key's own limits (`x-ratelimit-*` headers).
#[derive(Debug, Clone, Serialize)]
pub struct UpstreamLimits {
    pub remaining_requests: Option<u64>,
    pub remaining_tokens: Option<u64>,
    pub remaining_images: Option<u64>,
    pub reset_requests: Option<String>,
    pub reset_tokens: Option<String>,
    /// Unix seconds when these were reported.
    pub reported_at: u64,
}

impl UpstreamLimits {
    /// Reads the headers an OpenAI-compatible upstream may send; `None` if it sent none.
    pub fn from_headers(headers: &HeaderMap) -> Option<UpstreamLimits> {
        let number = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        // Reset values are durations like "6m0s"; kept as text, bounded, only if well-formed.
        let text = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .filter(|v| {
                    v.len() <= 32 && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.')
                })
                .map(str::to_owned)
        };
        let limits = UpstreamLimits {
            remaining_requests: number("x-ratelimit-remaining-requests"),
            remaining_tokens: number("x-ratelimit-remaining-tokens"),
            remaining_images: number("x-ratelimit-remaining-images"),
            reset_requests: text("x-ratelimit-reset-requests"),
            reset_tokens: text("x-ratelimit-reset-tokens"),
            reported_at: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        };
        let any = limits.remaining_requests.is_some()
            || limits.remaining_tokens.is_some()
            || limits.remaining_images.is_some()
            || limits.reset_requests.is_some();
        any.then_some(limits)
    }
}

impl KeyState {
    /// Moves time-based states on: a finished cooldown is healthy again.
    fn refresh(&mut self, now: Instant) {
        while self
            .sent
            .front()
            .is_some_and(|t| now.duration_since(*t) >= WINDOW)
        {
            self.sent.pop_front();
        }
        if let Health::CoolingDown { until } = self.health
            && now >= until
        {
            self.health = Health::Healthy;
        }
    }

    /// Applies a reloaded configuration of the same key id (see the module docs).
    fn reconfigure(&mut self, new: KeyState) {
        self.requests_per_minute = new.requests_per_minute;
        self.max_concurrent = new.max_concurrent;
        if self.authorization == new.authorization {
            if matches!(self.health, Health::Disabled { .. }) {
                self.health = Health::Healthy;
            }
        } else {
            self.authorization = new.authorization;
            self.credential = self.credential.wrapping_add(1);
            self.health = Health::Healthy;
            self.consecutive_failures = 0;
            self.circuit_interval = CIRCUIT_BASE;
            self.probing = false;
            self.upstream_limits = None;
        }
    }

    /// Could this key ever serve without an operator (not disabled)?
    fn usable_later(&self) -> bool {
        !matches!(self.health, Health::Disabled { .. })
    }

    /// Is the key blocked for a while regardless of load (cooldown, open circuit)?
    fn blocked_until(&self, now: Instant) -> Option<Instant> {
        match self.health {
            Health::CoolingDown { until } if until > now => Some(until),
            Health::CircuitOpen { until } if until > now => Some(until),
            _ => None,
        }
    }

    fn can_take(&self, now: Instant) -> bool {
        let healthy_enough = match self.health {
            Health::Healthy => true,
            Health::CoolingDown { until } => now >= until,
            Health::Disabled { .. } => false,
            // Half-open: exactly one probe at a time.
            Health::CircuitOpen { until } => now >= until && !self.probing && self.in_flight == 0,
        };
        healthy_enough
            && !self.probing
            && self.in_flight < self.max_concurrent
            && (self.sent.len() as u64) < u64::from(self.requests_per_minute)
    }

    /// When this key's capacity next changes with time alone.
    fn next_change(&self, now: Instant) -> Option<Instant> {
        let mut next = self.blocked_until(now);
        let limit = usize::try_from(self.requests_per_minute).unwrap_or(usize::MAX);
        // The window has room again once all but `limit - 1` sends have left it: usually the
        // oldest, but more when a reload lowered the limit below what the window holds.
        if let Some(excess) = self.sent.len().checked_sub(limit)
            && let Some(at) = self.sent.get(excess)
        {
            let at = *at + WINDOW;
            next = Some(next.map_or(at, |n| n.max(at)));
        }
        next
    }

    fn health_view(&self, now: Instant) -> (KeyHealth, Option<Instant>) {
        match self.health {
            Health::Healthy => (KeyHealth::Healthy, None),
            Health::CoolingDown { until } if until > now => (KeyHealth::CoolingDown, Some(until)),
            Health::CoolingDown { .. } => (KeyHealth::Healthy, None),
            Health::Disabled { .. } => (KeyHealth::Disabled, None),
            Health::CircuitOpen { until } => (KeyHealth::CircuitOpen, Some(until)),
        }
    }

    fn record(&mut self, minute: u64, f: impl Fn(&mut Outcomes)) {
        f(&mut self.totals);
        let slot = &mut self.recent[(minute % RECENT_MINUTES as u64) as usize];
        if slot.0 != minute {
            *slot = (minute, Outcomes::default());
        }
        f(&mut slot.1);
    }

    fn recent(&self, minute: u64) -> Outcomes {
        let mut sum = Outcomes::default();
        for (m, o) in &self.recent {
            if minute.saturating_sub(*m) < RECENT_MINUTES as u64 {
                sum.add(o);
            }
        }
        sum
    }
}

/// A key handed to a request: everything its lease needs, so that a reload between the grant
/// and the lease cannot make it point at another key.
struct Grant {
    slot: u64,
    credential: u32,
    key_id: Arc<str>,
    authorization: HeaderValue,
}

struct Waiter {
    id: u64,
    tx: oneshot::Sender<Result<Grant, PoolError>>,
}

struct PoolState {
    keys: Vec<KeyState>,
    next_slot: u64,
    /// Requests waiting for a key when every key is busy; more are refused at once.
    max_queue: usize,
    queue_timeout: Duration,
    /// Round-robin start among equally loaded keys.
    next_key: usize,
    /// Per-client FIFOs of waiting requests.
    waiting: HashMap<Arc<str>, VecDeque<Waiter>>,
    /// Clients with waiters, in service order.
    turn: VecDeque<Arc<str>>,
    queued: usize,
    next_waiter: u64,
}

impl PoolState {
    fn refresh(&mut self, now: Instant) {
        for k in &mut self.keys {
            k.refresh(now);
        }
    }

    fn grant(&self, i: usize) -> Grant {
        let k = &self.keys[i];
        Grant {
            slot: k.slot,
            credential: k.credential,
            key_id: Arc::clone(&k.id),
            authorization: k.authorization.clone(),
        }
    }

    /// Replaces the key set with `fresh` (a reload), keeping the live state of every key id
    /// that stays (see the module docs). Waiters stay queued and are served by the new set.
    fn reconfigure(&mut self, fresh: Vec<KeyState>, max_queue: usize, queue_timeout: Duration) {
        let mut old: HashMap<Arc<str>, KeyState> = self
            .keys
            .drain(..)
            .map(|k| (Arc::clone(&k.id), k))
            .collect();
        let mut keys = Vec::with_capacity(fresh.len());
        for mut new in fresh {
            match old.remove(&new.id) {
                Some(mut kept) => {
                    kept.reconfigure(new);
                    keys.push(kept);
                }
                None => {
                    new.slot = self.next_slot;
                    self.next_slot += 1;
                    keys.push(new);
                }
            }
        }
        self.keys = keys;
        self.next_key = 0;
        self.max_queue = max_queue;
        self.queue_timeout = queue_timeout;
    }

    /// A key that can take a request now: least in flight, ties round-robin.
    fn pick(&mut self, now: Instant) -> Option<usize> {
        let n = self.keys.len();
        let mut best: Option<usize> = None;
        for offset in 0..n {
            let i = (self.next_key + offset) % n;
            let k = &self.keys[i];
            if k.can_take(now) && best.is_none_or(|b| k.in_flight < self.keys[b].in_flight) {
                best = Some(i);
            }
        }
        if let Some(i) = best {
            self.next_key = (i + 1) % n;
        }
        best
    }

    fn take(&mut self, i: usize, now: Instant) {
        let k = &mut self.keys[i];
        if matches!(k.health, Health::CircuitOpen { .. }) {
            k.probing = true;
        }
        k.in_flight += 1;
        k.sent.push_back(now);
    }

    /// Gives back a key taken for a waiter that has gone away.
    fn untake(&mut self, i: usize) {
        let k = &mut self.keys[i];
        k.in_flight = k.in_flight.saturating_sub(1);
        k.probing = false;
        k.sent.pop_back();
    }

    /// Why nothing can be served, if no key is usable at all.
    fn unusable(&self, now: Instant) -> Option<PoolError> {
        if !self.keys.iter().any(KeyState::usable_later) {
            return Some(PoolError::AllDisabled);
        }
        let mut earliest: Option<Instant> = None;
        for k in self.keys.iter().filter(|k| k.usable_later()) {
            match k.blocked_until(now) {
                None => return None,
                Some(until) => earliest = Some(earliest.map_or(until, |e| e.min(until))),
            }
        }
        earliest.map(|until| PoolError::AllCooling {
            retry_after: until.saturating_duration_since(now),
        })
    }

    fn next_change(&self, now: Instant) -> Option<Instant> {
        self.keys.iter().filter_map(|k| k.next_change(now)).min()
    }

    /// A hint for clients turned away: when capacity is likely to free up.
    fn retry_hint(&self, now: Instant) -> Duration {
        self.next_change(now)
            .map(|t| t.saturating_duration_since(now))
            .unwrap_or(Duration::from_secs(1))
            .max(Duration::from_secs(1))
    }

    /// Hands free keys to waiters, one client at a time in turn. Fails every waiter at once if
    /// no key is usable any more.
    fn dispatch(&mut self, now: Instant) {
        self.refresh(now);
        if self.queued == 0 {
            return;
        }
        if let Some(error) = self.unusable(now) {
            for (_, queue) in self.waiting.drain() {
                for w in queue {
                    let _ = w.tx.send(Err(error.clone()));
                }
            }
            self.turn.clear();
            self.queued = 0;
            return;
        }
        while self.queued > 0 {
            let Some(key) = self.pick(now) else { return };
            let Some(waiter) = self.next_waiter() else {
                return;
            };
            self.take(key, now);
            if waiter.tx.send(Ok(self.grant(key))).is_err() {
                // The request went away while waiting: the key is free again.
                self.untake(key);
            }
        }
    }

    /// The next waiter in round-robin order across clients.
    fn next_waiter(&mut self) -> Option<Waiter> {
        while let Some(client) = self.turn.pop_front() {
            let Some(queue) = self.waiting.get_mut(&client) else {
                continue;
            };
            let Some(waiter) = queue.pop_front() else {
                self.waiting.remove(&client);
                continue;
            };
            self.queued -= 1;
            if queue.is_empty() {
                self.waiting.remove(&client);
            } else {
                self.turn.push_back(client);
            }
            return Some(waiter);
        }
        None
    }

    /// Removes a waiter that gave up; `false` if it was already served.
    fn forget(&mut self, client: &Arc<str>, id: u64) -> bool {
        let Some(queue) = self.waiting.get_mut(client) else {
            return false;
        };
        let Some(pos) = queue.iter().position(|w| w.id == id) else {
            return false;
        };
        queue.remove(pos);
        self.queued -= 1;
        if queue.is_empty() {
            self.waiting.remove(client);
            self.turn.retain(|c| c != client);
        }
        true
    }
}

struct PoolInner {
    upstream: Arc<str>,
    state: Mutex<PoolState>,
    /// Wakes the ticker when the queue or key states change.
    wake: Notify,
}

impl PoolInner {
    fn lock(&self) -> MutexGuard<'_, PoolState> {
        // A panic while holding the lock leaves counters at worst slightly off; serving on is
        // better than failing every request from then on.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Configuration of one key in the pool.
pub struct PoolKey {
    pub id: Arc<str>,
    pub authorization: HeaderValue,
    pub requests_per_minute: u32,
    pub max_concurrent: u32,
}

/// The key pool of one upstream. Dropping the last handle to its state (a reload hands the
/// state on to the next pool) stops its ticker.
pub struct KeyPool {
    inner: Arc<PoolInner>,
    _ticker: Arc<DropGuard>,
}

impl std::fmt::Debug for KeyPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyPool")
            .field("upstream", &self.inner.upstream)
            .finish_non_exhaustive()
    }
}

impl KeyPool {
    pub fn new(
        upstream: Arc<str>,
        keys: Vec<PoolKey>,
        max_queue: usize,
        queue_timeout: Duration,
    ) -> KeyPool {
        let keys: Vec<KeyState> = keys
            .into_iter()
            .zip(0..)
            .map(|(k, slot)| KeyState {
                slot,
                id: k.id,
                authorization: k.authorization,
                credential: 0,
                requests_per_minute: k.requests_per_minute.max(1),
                max_concurrent: k.max_concurrent.max(1),
                in_flight: 0,
                sent: VecDeque::new(),
                health: Health::Healthy,
                consecutive_failures: 0,
                circuit_interval: CIRCUIT_BASE,
                probing: false,
                totals: Outcomes::default(),
                recent: [(0, Outcomes::default()); RECENT_MINUTES],
                upstream_limits: None,
            })
            .collect();
        let inner = Arc::new(PoolInner {
            upstream,
            state: Mutex::new(PoolState {
                next_slot: keys.len() as u64,
                keys,
                max_queue,
                queue_timeout,
                next_key: 0,
                waiting: HashMap::new(),
                turn: VecDeque::new(),
                queued: 0,
                next_waiter: 0,
            }),
            wake: Notify::new(),
        });
        let stop = CancellationToken::new();
        tokio::spawn(tick(Arc::clone(&inner), stop.clone()));
        KeyPool {
            inner,
            _ticker: Arc::new(stop.drop_guard()),
        }
    }

    /// On a config reload: makes this newly built pool take over `previous`'s live state (its
    /// queue, and each key's rate window, in-flight count, health and counters, matched by key
    /// id) with this pool's keys, limits and queue bounds. From then on both handles share one
    /// state, so requests still running on the old config and new ones are admitted together,
    /// and the old snapshot's leases settle into it. See the module docs for what a changed
    /// secret or a disabled key gets.
    pub fn carry_over_from(&mut self, previous: &KeyPool) {
        if Arc::ptr_eq(&self.inner, &previous.inner) {
            return;
        }
        let (fresh, max_queue, queue_timeout) = {
            let mut st = self.inner.lock();
            (std::mem::take(&mut st.keys), st.max_queue, st.queue_timeout)
        };
        {
            let mut st = previous.inner.lock();
            st.reconfigure(fresh, max_queue, queue_timeout);
            st.dispatch(Instant::now());
        }
        // This pool's own (empty) state and ticker go; the previous ones carry on.
        self.inner = Arc::clone(&previous.inner);
        self._ticker = Arc::clone(&previous._ticker);
        self.inner.wake.notify_one();
    }

    /// A key for one request from `client`: at once if one is free and nobody is waiting,
    /// else after waiting in the fair queue.
    pub async fn acquire(&self, client: &str) -> Result<KeyLease, PoolError> {
        let now = Instant::now();
        let (id, client, rx, queue_timeout) = {
            let mut st = self.inner.lock();
            st.refresh(now);
            if let Some(error) = st.unusable(now) {
                return Err(error);
            }
            if st.queued == 0
                && let Some(i) = st.pick(now)
            {
                st.take(i, now);
                return Ok(self.lease(st.grant(i)));
            }
            if st.queued >= st.max_queue {
                return Err(PoolError::QueueFull {
                    retry_after: st.retry_hint(now),
                });
            }
            let (tx, rx) = oneshot::channel();
            let id = st.next_waiter;
            st.next_waiter += 1;
            let client: Arc<str> = Arc::from(client);
            let PoolState { waiting, turn, .. } = &mut *st;
            let queue = waiting.entry(Arc::clone(&client)).or_default();
            if queue.is_empty() {
                turn.push_back(Arc::clone(&client));
            }
            queue.push_back(Waiter { id, tx });
            st.queued += 1;
            st.dispatch(now);
            (id, client, rx, st.queue_timeout)
        };
        self.inner.wake.notify_one();
        let mut rx = rx;
        let result = match tokio::time::timeout(queue_timeout, &mut rx).await {
            Ok(Ok(result)) => result,
            // The pool was dropped while waiting: treat as busy.
            Ok(Err(_)) => Err(PoolError::QueueTimeout {
                retry_after: Duration::from_secs(1),
            }),
            Err(_) => {
                let mut st = self.inner.lock();
                if st.forget(&client, id) {
                    let hint = st.retry_hint(Instant::now());
                    return Err(PoolError::QueueTimeout { retry_after: hint });
                }
                drop(st);
                // Served in the instant the timer fired (grants are sent under the lock, so it
                // is in the channel by now): take what was sent rather than leak the key.
                match rx.try_recv() {
                    Ok(result) => result,
                    Err(_) => Err(PoolError::QueueTimeout {
                        retry_after: Duration::from_secs(1),
                    }),
                }
            }
        };
        Ok(self.lease(result?))
    }

    fn lease(&self, grant: Grant) -> KeyLease {
        KeyLease {
            pool: Arc::clone(&self.inner),
            slot: grant.slot,
            credential: grant.credential,
            key_id: grant.key_id,
            authorization: grant.authorization,
            settled: false,
        }
    }

    /// The `Authorization` value of key `key_id`, whatever its state: for following up on work
    /// that key started (polling a native task), which must use the key that created it.
    pub fn authorization_of(&self, key_id: &str) -> Option<HeaderValue> {
        let st = self.inner.lock();
        st.keys
            .iter()
            .find(|k| &*k.id == key_id)
            .map(|k| k.authorization.clone())
    }

    /// How many keys the pool has, whatever their state.
    pub fn key_count(&self) -> usize {
        self.inner.lock().keys.len()
    }

    /// Whether any key could serve (for readiness).
    pub fn has_usable_key(&self) -> bool {
        let st = self.inner.lock();
        st.keys.iter().any(KeyState::usable_later)
    }

    /// A view for ops (`/admin/upstreams`, metrics).
    pub fn status(&self) -> PoolStatus {
        let now = Instant::now();
        let wall = SystemTime::now();
        let minute = unix_minute(wall);
        let mut st = self.inner.lock();
        st.refresh(now);
        PoolStatus {
            upstream: self.inner.upstream.to_string(),
            queue_depth: st.queued,
            keys: st
                .keys
                .iter()
                .map(|k| {
                    let (state, until) = k.health_view(now);
                    KeyStatus {
                        id: k.id.to_string(),
                        state,
                        until_unix: until
                            .map(|u| unix_secs(wall + u.saturating_duration_since(now))),
                        in_flight: k.in_flight,
                        max_concurrent: k.max_concurrent,
                        requests_per_minute: k.requests_per_minute,
                        sent_last_minute: k.sent.len(),
                        disabled_status: match k.health {
                            Health::Disabled { status } => Some(status),
                            _ => None,
                        },
                        consecutive_failures: k.consecutive_failures,
                        recent: k.recent(minute),
                        totals: k.totals,
                        upstream_limits: k.upstream_limits.clone(),
                    }
                })
                .collect(),
        }
    }
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn unix_minute(t: SystemTime) -> u64 {
    unix_secs(t) / 60
}

/// Serves the queue when time frees capacity; ends when the pool's owner drops it.
async fn tick(inner: Arc<PoolInner>, stop: CancellationToken) {
    loop {
        let next = {
            let now = Instant::now();
            let mut st = inner.lock();
            st.dispatch(now);
            if st.queued > 0 {
                st.next_change(now)
            } else {
                None
            }
        };
        let sleep = async {
            match next {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = stop.cancelled() => return,
            () = inner.wake.notified() => {}
            () = sleep => {}
        }
    }
}

/// The right to send one request with one key. Settle it with the outcome; dropping it
/// unsettled releases the key without judging it.
pub struct KeyLease {
    pool: Arc<PoolInner>,
    slot: u64,
    credential: u32,
    pub key_id: Arc<str>,
    authorization: HeaderValue,
    settled: bool,
}

impl std::fmt::Debug for KeyLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyLease")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl KeyLease {
    pub fn authorization(&self) -> &HeaderValue {
        &self.authorization
    }

    /// The upstream answered 2xx.
    pub fn succeeded(self, headers: &HeaderMap) {
        let limits = UpstreamLimits::from_headers(headers);
        self.settle(|k, _| {
            k.consecutive_failures = 0;
            k.circuit_interval = CIRCUIT_BASE;
            if matches!(k.health, Health::CircuitOpen { .. }) {
                k.health = Health::Healthy;
            }
            if limits.is_some() {
                k.upstream_limits = limits.clone();
            }
            |o: &mut Outcomes| o.success += 1
        });
    }

    /// The upstream answered 429: the key rests for `retry_after` (at least [`MIN_COOLDOWN`]).
    pub fn rate_limited(self, retry_after: Duration, headers: &HeaderMap) {
        let limits = UpstreamLimits::from_headers(headers);
        self.settle(|k, now| {
            if !matches!(k.health, Health::Disabled { .. }) {
                let until = now + retry_after.max(MIN_COOLDOWN);
                let later = match k.health {
                    Health::CoolingDown { until: u } => u.max(until),
                    _ => until,
                };
                k.health = Health::CoolingDown { until: later };
            }
            if limits.is_some() {
                k.upstream_limits = limits.clone();
            }
            |o: &mut Outcomes| o.rate_limited += 1
        });
    }

    /// The upstream refused the key (401/403): disabled until reload.
    pub fn refused(self, status: u16) {
        let upstream = Arc::clone(&self.pool.upstream);
        let key = Arc::clone(&self.key_id);
        self.settle(|k, _| {
            if !matches!(k.health, Health::Disabled { .. }) {
                // Logged once, when the key changes state.
                tracing::error!(upstream = %upstream, key = %key, status, "upstream refused the key: disabled until config reload");
                k.health = Health::Disabled { status };
            }
            |o: &mut Outcomes| o.refused += 1
        });
    }

    /// A failure that says the key or upstream is unwell (5xx, connection error): counts
    /// toward opening the circuit.
    pub fn failed(self, server_error: bool) {
        let upstream = Arc::clone(&self.pool.upstream);
        let key = Arc::clone(&self.key_id);
        self.settle(|k, now| {
            k.consecutive_failures += 1;
            let was_probe = matches!(k.health, Health::CircuitOpen { .. });
            if was_probe || k.consecutive_failures >= CIRCUIT_THRESHOLD {
                let interval = if was_probe {
                    (k.circuit_interval * 2).min(CIRCUIT_MAX)
                } else {
                    k.circuit_interval
                };
                k.circuit_interval = interval;
                if !matches!(k.health, Health::Disabled { .. }) {
                    tracing::warn!(upstream = %upstream, key = %key, secs = interval.as_secs(), "circuit opened for key");
                    k.health = Health::CircuitOpen { until: now + interval };
                }
            }
            move |o: &mut Outcomes| {
                if server_error {
                    o.server_error += 1
                } else {
                    o.connect_error += 1
                }
            }
        });
    }

    /// Neither a success nor the key's fault (the request was refused, or timed out after it
    /// was sent).
    pub fn neutral(self) {
        self.settle(|_, _| |o: &mut Outcomes| o.other += 1);
    }

    fn settle<F, G>(mut self, update: F)
    where
        F: FnOnce(&mut KeyState, Instant) -> G,
        G: Fn(&mut Outcomes),
    {
        self.settled = true;
        self.release(update);
    }

    fn release<F, G>(&self, update: F)
    where
        F: FnOnce(&mut KeyState, Instant) -> G,
        G: Fn(&mut Outcomes),
    {
        let now = Instant::now();
        let minute = unix_minute(SystemTime::now());
        {
            let mut st = self.pool.lock();
            // Gone if a reload removed the key: nothing left to free or judge.
            if let Some(k) = st.keys.iter_mut().find(|k| k.slot == self.slot) {
                k.in_flight = k.in_flight.saturating_sub(1);
                k.probing = false;
                // An outcome with a secret a reload has since replaced says nothing about the
                // new one (a rotation often revokes the old key: its 401 must not disable the
                // new secret).
                if k.credential == self.credential {
                    let count = update(k, now);
                    k.record(minute, count);
                }
            }
            st.dispatch(now);
        }
        self.pool.wake.notify_one();
    }
}

impl Drop for KeyLease {
    fn drop(&mut self) {
        if !self.settled {
            self.release(|_, _| |_: &mut Outcomes| {});
        }
    }
}

/// One upstream's pool, for ops.
#[derive(Debug, Clone, Serialize)]
pub struct PoolStatus {
    pub upstream: String,
    pub queue_depth: usize,
    pub keys: Vec<KeyStatus>,
}

#[derive(Debug, Clone, Serialize)]
pub struct KeyStatus {
    pub id: String,
    pub state: KeyHealth,
    /// When a cooldown or open circuit ends (unix seconds).
    pub until_unix: Option<u64>,
    pub in_flight: u32,
    pub max_concurrent: u32,
    pub requests_per_minute: u32,
    pub sent_last_minute: usize,
    /// The upstream's status when it refused the key.
    pub disabled_status: Option<u16>,
    pub consecutive_failures: u32,
    /// Outcomes over the last five minutes.
    pub recent: Outcomes,
    pub totals: Outcomes,
    pub upstream_limits: Option<UpstreamLimits>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(keys: &[(&str, u32, u32)], max_queue: usize, timeout: Duration) -> KeyPool {
        KeyPool::new(
            Arc::from("up"),
            keys.iter()
                .map(|(id, rpm, conc)| PoolKey {
                    id: Arc::from(*id),
                    authorization: HeaderValue::from_static("Bearer x"),
                    requests_per_minute: *rpm,
                    max_concurrent: *conc,
                })
                .collect(),
            max_queue,
            timeout,
        )
    }

    /// Keys with their own secrets: (id, secret, requests_per_minute, max_concurrent).
    fn keyed_pool(keys: &[(&str, &str, u32, u32)], timeout: Duration) -> KeyPool {
        KeyPool::new(
            Arc::from("up"),
            keys.iter()
                .map(|(id, secret, rpm, conc)| PoolKey {
                    id: Arc::from(*id),
                    authorization: HeaderValue::from_str(&format!("Bearer {secret}")).unwrap(),
                    requests_per_minute: *rpm,
                    max_concurrent: *conc,
                })
                .collect(),
            100,
            timeout,
        )
    }

    fn key_status(pool: &KeyPool, id: &str) -> KeyStatus {
        pool.status().keys.into_iter().find(|k| k.id == id).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_key_never_exceeds_its_rate_in_any_window() {
        const LIMIT: usize = 5;
        const RUN: Duration = Duration::from_secs(300);
        let pool = Arc::new(pool(
            &[("k", LIMIT as u32, 3)],
            1000,
            Duration::from_secs(3600),
        ));
        let started = Instant::now();
        let sends = Arc::new(Mutex::new(Vec::new()));
        // 20 workers from 3 clients keep asking for five minutes of (paused) time, holding each
        // key for a different 0-7 s, so sends fall at irregular times, not on minute marks.
        let workers: Vec<_> = (0..20u64)
            .map(|worker| {
                let pool = Arc::clone(&pool);
                let sends = Arc::clone(&sends);
                tokio::spawn(async move {
                    let client = format!("c{}", worker % 3);
                    let mut round = 0u64;
                    while started.elapsed() < RUN {
                        let lease = pool.acquire(&client).await.unwrap();
                        sends.lock().unwrap().push(started.elapsed());
                        let hold = (worker * 1777 + round * 997) % 7000;
                        tokio::time::sleep(Duration::from_millis(hold)).await;
                        lease.succeeded(&HeaderMap::new());
                        round += 1;
                    }
                })
            })
            .collect();
        for w in workers {
            w.await.unwrap();
        }
        let mut sends = sends.lock().unwrap().clone();
        sends.sort();
        // No 60 s window holds more than LIMIT sends ⇔ any LIMIT + 1 consecutive sends span
        // at least a window.
        for w in sends.windows(LIMIT + 1) {
            assert!(w[LIMIT] - w[0] >= WINDOW, "{w:?} in {sends:?}");
        }
        let busiest = sends
            .iter()
            .map(|&t| sends.iter().filter(|&&u| u >= t && u < t + WINDOW).count())
            .max()
            .unwrap();
        assert_eq!(
            busiest, LIMIT,
            "the busiest window is full, never over: {sends:?}"
        );
        // Demand never stopped, so the key was kept at its limit: five full minutes at least.
        assert!(sends.len() >= 5 * LIMIT, "{sends:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_reload_keeps_a_cooling_key_cooling() {
        let old = keyed_pool(&[("a", "s1", 100, 10)], Duration::from_secs(1));
        old.acquire("c")
            .await
            .unwrap()
            .rate_limited(Duration::from_secs(30), &HeaderMap::new());
        tokio::time::advance(Duration::from_secs(10)).await;
        let fresh = keyed_pool(&[("a", "s1", 100, 10)], Duration::from_secs(1));
        assert!(
            fresh.acquire("c").await.is_ok(),
            "a fresh pool would call it"
        );
        let mut new = keyed_pool(&[("a", "s1", 100, 10)], Duration::from_secs(1));
        new.carry_over_from(&old);
        drop(old);
        match new.acquire("c").await {
            Err(PoolError::AllCooling { retry_after }) => {
                assert_eq!(retry_after, Duration::from_secs(20))
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(key_status(&new, "a").state, KeyHealth::CoolingDown);
        assert_eq!(
            key_status(&new, "a").totals.rate_limited,
            1,
            "counters kept"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn leases_of_the_old_pool_count_against_the_new_one_and_settle_into_it() {
        let old = keyed_pool(&[("a", "s1", 100, 1)], Duration::from_secs(60));
        let held = old.acquire("c").await.unwrap();
        let mut new = keyed_pool(&[("a", "s1", 100, 1)], Duration::from_secs(60));
        new.carry_over_from(&old);
        drop(old);
        let new = Arc::new(new);
        assert_eq!(key_status(&new, "a").in_flight, 1);
        let waiter = {
            let new = Arc::clone(&new);
            tokio::spawn(async move { new.acquire("c").await.map(|l| l.key_id.clone()) })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(
            new.status().queue_depth,
            1,
            "max_concurrent 1 holds across the reload"
        );
        held.failed(true);
        assert_eq!(waiter.await.unwrap().unwrap().as_ref(), "a");
        let a = key_status(&new, "a");
        assert_eq!((a.totals.server_error, a.consecutive_failures), (1, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn new_limits_apply_against_the_sends_already_in_the_window() {
        let old = keyed_pool(&[("a", "s1", 5, 10)], Duration::from_secs(600));
        for _ in 0..3 {
            old.acquire("c").await.unwrap().succeeded(&HeaderMap::new());
        }
        let started = Instant::now();
        tokio::time::advance(Duration::from_secs(20)).await;
        let mut new = keyed_pool(&[("a", "s1", 2, 10)], Duration::from_secs(600));
        new.carry_over_from(&old);
        // The old handle goes with the old config; its ticker must carry on for the new one.
        drop(old);
        assert_eq!(key_status(&new, "a").requests_per_minute, 2);
        assert_eq!(key_status(&new, "a").sent_last_minute, 3);
        let lease = new.acquire("c").await.unwrap();
        let waited = started.elapsed();
        assert!(
            waited >= WINDOW && waited < WINDOW + Duration::from_millis(10),
            "room under the new limit of 2 only once the 3 earlier sends left the window: {waited:?}"
        );
        drop(lease);
    }

    #[tokio::test(start_paused = true)]
    async fn a_reload_enables_a_key_the_provider_refused() {
        let old = keyed_pool(&[("a", "s1", 100, 10)], Duration::from_secs(1));
        old.acquire("c").await.unwrap().refused(401);
        assert!(matches!(
            old.acquire("c").await,
            Err(PoolError::AllDisabled)
        ));
        let mut new = keyed_pool(&[("a", "s1", 100, 10)], Duration::from_secs(1));
        new.carry_over_from(&old);
        let a = key_status(&new, "a");
        assert_eq!((a.state, a.totals.refused), (KeyHealth::Healthy, 1));
        assert!(
            new.acquire("c").await.is_ok(),
            "disabled until a reload, not longer"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_secret_drops_the_providers_verdicts_but_keeps_admission() {
        let old = keyed_pool(&[("a", "s-old", 100, 10)], Duration::from_secs(1));
        let with_old_secret = old.acquire("c").await.unwrap();
        old.acquire("c")
            .await
            .unwrap()
            .rate_limited(Duration::from_secs(300), &HeaderMap::new());
        let mut new = keyed_pool(&[("a", "s-new", 100, 10)], Duration::from_secs(1));
        new.carry_over_from(&old);
        let a = key_status(&new, "a");
        assert_eq!(
            a.state,
            KeyHealth::Healthy,
            "the cooldown was the old secret's"
        );
        assert_eq!(
            (a.in_flight, a.sent_last_minute),
            (1, 2),
            "admission is kept"
        );
        // A rotation usually revokes the old secret: the call still out with it gets a 401,
        // which frees its slot but must not disable the new secret.
        with_old_secret.refused(401);
        let a = key_status(&new, "a");
        assert_eq!((a.state, a.in_flight), (KeyHealth::Healthy, 0));
        let lease = new.acquire("c").await.unwrap();
        assert_eq!(lease.authorization(), "Bearer s-new");
    }

    #[tokio::test(start_paused = true)]
    async fn a_removed_keys_lease_ends_without_effect_and_an_added_key_starts_fresh() {
        let old = keyed_pool(
            &[("a", "s1", 100, 10), ("b", "s2", 100, 10)],
            Duration::from_secs(1),
        );
        old.acquire("c").await.unwrap().succeeded(&HeaderMap::new());
        let on_b = old.acquire("c").await.unwrap();
        assert_eq!(&*on_b.key_id, "b");
        let mut new = keyed_pool(
            &[("a", "s1", 100, 10), ("c", "s3", 100, 10)],
            Duration::from_secs(1),
        );
        new.carry_over_from(&old);
        on_b.failed(true);
        let ids: Vec<_> = new.status().keys.into_iter().map(|k| k.id).collect();
        assert_eq!(ids, ["a", "c"]);
        assert_eq!(key_status(&new, "a").totals.success, 1, "a is kept");
        let c = key_status(&new, "c");
        assert_eq!(
            (c.totals.server_error, c.sent_last_minute),
            (0, 0),
            "c is fresh"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_after_of_zero_still_rests_the_key_for_a_second() {
        let pool = pool(&[("a", 100, 10)], 10, Duration::from_secs(60));
        pool.acquire("c")
            .await
            .unwrap()
            .rate_limited(Duration::ZERO, &HeaderMap::new());
        match pool.acquire("c").await {
            Err(PoolError::AllCooling { retry_after }) => {
                assert_eq!(retry_after, MIN_COOLDOWN)
            }
            other => panic!("the key went straight back into use: {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn least_loaded_key_is_chosen_and_concurrency_is_capped() {
        let pool = pool(
            &[("a", 100, 1), ("b", 100, 1)],
            10,
            Duration::from_millis(100),
        );
        let first = pool.acquire("c").await.unwrap();
        let second = pool.acquire("c").await.unwrap();
        assert_ne!(first.key_id, second.key_id);
        let err = pool.acquire("c").await.err().unwrap();
        assert!(matches!(err, PoolError::QueueTimeout { .. }), "{err:?}");
        drop(first);
        assert!(pool.acquire("c").await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_rate_limited_key_cools_down_and_others_serve() {
        let pool = pool(
            &[("a", 100, 10), ("b", 100, 10)],
            10,
            Duration::from_secs(1),
        );
        let lease = pool.acquire("c").await.unwrap();
        let cooled = lease.key_id.clone();
        lease.rate_limited(Duration::from_secs(30), &HeaderMap::new());
        for _ in 0..10 {
            let l = pool.acquire("c").await.unwrap();
            assert_ne!(l.key_id, cooled);
            l.succeeded(&HeaderMap::new());
        }
        let status = pool.status();
        let k = status.keys.iter().find(|k| *k.id == *cooled).unwrap();
        assert_eq!(k.state, KeyHealth::CoolingDown);
        tokio::time::advance(Duration::from_secs(31)).await;
        assert_eq!(
            pool.status()
                .keys
                .iter()
                .find(|k| *k.id == *cooled)
                .unwrap()
                .state,
            KeyHealth::Healthy
        );
    }

    #[tokio::test(start_paused = true)]
    async fn all_keys_unusable_answers_at_once() {
        let pool = pool(&[("a", 100, 10)], 10, Duration::from_secs(60));
        pool.acquire("c").await.unwrap().refused(401);
        assert!(matches!(
            pool.acquire("c").await,
            Err(PoolError::AllDisabled)
        ));
        assert!(!pool.has_usable_key());

        let pool2 = self::pool(&[("a", 100, 10)], 10, Duration::from_secs(60));
        pool2
            .acquire("c")
            .await
            .unwrap()
            .rate_limited(Duration::from_secs(30), &HeaderMap::new());
        match pool2.acquire("c").await {
            Err(PoolError::AllCooling { retry_after }) => {
                assert_eq!(retry_after, Duration::from_secs(30))
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn repeated_failures_open_the_circuit_and_a_probe_closes_it() {
        let pool = pool(&[("a", 1000, 10)], 10, Duration::from_secs(60));
        for _ in 0..CIRCUIT_THRESHOLD {
            pool.acquire("c").await.unwrap().failed(true);
        }
        assert_eq!(pool.status().keys[0].state, KeyHealth::CircuitOpen);
        assert!(matches!(
            pool.acquire("c").await,
            Err(PoolError::AllCooling { .. })
        ));
        tokio::time::advance(CIRCUIT_BASE).await;
        let probe = pool.acquire("c").await.unwrap();
        // Only one probe at a time.
        let second = tokio::time::timeout(Duration::from_millis(10), pool.acquire("c")).await;
        assert!(
            second.is_err(),
            "a second request waits while the probe is out"
        );
        probe.succeeded(&HeaderMap::new());
        assert_eq!(pool.status().keys[0].state, KeyHealth::Healthy);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_doubles_the_interval() {
        let pool = pool(&[("a", 1000, 10)], 10, Duration::from_secs(60));
        for _ in 0..CIRCUIT_THRESHOLD {
            pool.acquire("c").await.unwrap().failed(false);
        }
        tokio::time::advance(CIRCUIT_BASE).await;
        pool.acquire("c").await.unwrap().failed(true);
        let until = pool.status().keys[0].until_unix.unwrap();
        let now = unix_secs(SystemTime::now());
        assert!(
            until >= now + CIRCUIT_BASE.as_secs() * 2 - 1,
            "until {until}, now {now}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_queue_is_served_round_robin_across_clients() {
        let pool = Arc::new(pool(&[("a", 1000, 1)], 100, Duration::from_secs(600)));
        let held = pool.acquire("flood").await.unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for client in ["flood", "flood", "flood", "flood", "other"] {
            let pool = Arc::clone(&pool);
            let order = Arc::clone(&order);
            tasks.push(tokio::spawn(async move {
                let lease = pool.acquire(client).await.unwrap();
                order.lock().unwrap().push(client);
                tokio::time::sleep(Duration::from_millis(10)).await;
                drop(lease);
            }));
            // Enqueue in a known order.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        drop(held);
        for t in tasks {
            t.await.unwrap();
        }
        let order = order.lock().unwrap().clone();
        let other_at = order.iter().position(|c| *c == "other").unwrap();
        assert!(
            other_at <= 1,
            "the other client is served within one turn: {order:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn what_the_upstream_reports_about_its_limits_is_kept_per_key() {
        let pool = pool(&[("a", 100, 10)], 10, Duration::from_secs(1));
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-ratelimit-remaining-requests",
            HeaderValue::from_static("41"),
        );
        headers.insert(
            "x-ratelimit-reset-requests",
            HeaderValue::from_static("6m0s"),
        );
        headers.insert(
            "x-ratelimit-remaining-tokens",
            HeaderValue::from_static("not a number"),
        );
        pool.acquire("c").await.unwrap().succeeded(&headers);
        let limits = pool.status().keys[0].upstream_limits.clone().unwrap();
        assert_eq!(limits.remaining_requests, Some(41));
        assert_eq!(limits.reset_requests.as_deref(), Some("6m0s"));
        assert_eq!(limits.remaining_tokens, None, "garbage is ignored");

        // An answer without the headers keeps the last report; a bad reset value is dropped.
        pool.acquire("c")
            .await
            .unwrap()
            .succeeded(&HeaderMap::new());
        assert_eq!(
            pool.status().keys[0]
                .upstream_limits
                .as_ref()
                .unwrap()
                .remaining_requests,
            Some(41)
        );
        let mut odd = HeaderMap::new();
        odd.insert(
            "x-ratelimit-reset-requests",
            HeaderValue::from_static("<script>"),
        );
        assert!(UpstreamLimits::from_headers(&odd).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_queue_refuses_at_once() {
        let pool = Arc::new(pool(&[("a", 1000, 1)], 2, Duration::from_secs(600)));
        let _held = pool.acquire("c").await.unwrap();
        let waiters: Vec<_> = (0..2)
            .map(|_| {
                let pool = Arc::clone(&pool);
                tokio::spawn(async move { pool.acquire("c").await.map(|_| ()) })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(pool.status().queue_depth, 2);
        assert!(matches!(
            pool.acquire("c").await,
            Err(PoolError::QueueFull { .. })
        ));
        for w in waiters {
            w.abort();
        }
    }
}
