//! Every Prometheus metric imagegate exports, declared once (SPEC §8), with typed label sets.
//!
//! Counters and histograms are updated where things happen (request log middleware, upstream
//! attempts, the pipeline). Gauges that describe state (quotas, spend, key states, queue depth,
//! cache size, readiness) are filled from their owners at scrape time by [`Metrics::scrape`], so
//! they are never stale and no background task is needed.
//!
//! Label values are bounded: routes are matched templates (never raw paths), clients are
//! configured ids (or `-` before authentication), upstreams and keys are configured ids.
//! Nothing secret is ever a label: keys appear only by their configured id.

use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::cache::CacheStats;
use crate::upstream::pool::{KeyHealth, PoolStatus};
use crate::usage::UsageReport;

/// From a 1 ms rejection to a 300 s generation.
const LATENCY_BUCKETS: [f64; 18] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0,
    120.0, 300.0,
];

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub route: String,
    pub status: u16,
    pub client: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ImageLabels {
    pub client: String,
    pub model: String,
    pub size: String,
    pub quality: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamOutcomeLabels {
    pub upstream: String,
    pub key: String,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    pub upstream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KeyLabels {
    pub upstream: String,
    pub key: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KeyStateLabels {
    pub upstream: String,
    pub key: String,
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RateLimitedLabels {
    pub client: String,
    pub limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QuotaLabels {
    pub client: String,
    pub window: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SpendLabels {
    pub client: String,
    pub window: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheLabels {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TaskStateLabels {
    pub state: &'static str,
}

type FloatGauge = Gauge<f64, AtomicU64>;

/// All metrics, registered under the `imagegate_` prefix.
pub struct Metrics {
    registry: Registry,
    pub http_requests: Family<HttpLabels, Counter>,
    pub http_request_duration: Family<RouteLabels, Histogram, fn() -> Histogram>,
    pub images: Family<ImageLabels, Counter>,
    pub upstream_requests: Family<UpstreamOutcomeLabels, Counter>,
    pub upstream_request_duration: Family<UpstreamLabels, Histogram, fn() -> Histogram>,
    pub rate_limited: Family<RateLimitedLabels, Counter>,
    pub quota_used: Family<QuotaLabels, FloatGauge>,
    pub quota_limit: Family<QuotaLabels, FloatGauge>,
    pub spend: Family<SpendLabels, FloatGauge>,
    pub cache_requests: Family<CacheLabels, Counter>,
    pub cache_bytes: Gauge,
    pub cache_entries: Gauge,
    pub cache_evictions: Counter,
    /// The eviction count last copied into `cache_evictions` (moka counts; we mirror deltas).
    cache_evictions_seen: Mutex<u64>,
    pub tasks: Family<TaskStateLabels, Gauge>,
    /// Async tasks that reached `completed` or `failed`.
    pub tasks_finished: Family<TaskStateLabels, Counter>,
    /// Time tasks wait in the queue before a worker takes them.
    pub task_wait: Histogram,
    /// Time from queueing (submit, or resume after a restart) to completed or failed.
    pub task_duration: Histogram,
    pub upstream_queue_depth: Family<UpstreamLabels, Gauge>,
    pub upstream_key_state: Family<KeyStateLabels, Gauge>,
    pub upstream_ratelimit_remaining: Family<KeyLabels, Gauge>,
    pub ready: Gauge,
    /// Held while the state gauges are refreshed and encoded, so two concurrent scrapes cannot
    /// interleave one's `clear` with the other's encoding (which would drop label sets).
    scrape_lock: Mutex<()>,
}

/// The state the scrape-time gauges are set from, gathered by the admin handler.
pub struct ScrapeState<'a> {
    pub cache: &'a CacheStats,
    pub pools: &'a [PoolStatus],
    /// `None` when the usage report failed: the quota gauges keep their last values.
    pub usage: Option<&'a UsageReport>,
    pub tasks: TaskGauges,
    /// What `/readyz` would answer.
    pub ready: bool,
}

/// Async tasks in flight now.
#[derive(Debug, Clone, Copy, Default)]
pub struct TaskGauges {
    pub queued: usize,
    pub processing: usize,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("imagegate");
        let m = Metrics {
            http_requests: Family::default(),
            http_request_duration: Family::new_with_constructor(latency_histogram),
            images: Family::default(),
            upstream_requests: Family::default(),
            upstream_request_duration: Family::new_with_constructor(latency_histogram),
            rate_limited: Family::default(),
            quota_used: Family::default(),
            quota_limit: Family::default(),
            spend: Family::default(),
            cache_requests: Family::default(),
            cache_bytes: Gauge::default(),
            cache_entries: Gauge::default(),
            cache_evictions: Counter::default(),
            cache_evictions_seen: Mutex::new(0),
            tasks: Family::default(),
            tasks_finished: Family::default(),
            task_wait: latency_histogram(),
            task_duration: latency_histogram(),
            upstream_queue_depth: Family::default(),
            upstream_key_state: Family::default(),
            upstream_ratelimit_remaining: Family::default(),
            ready: Gauge::default(),
            scrape_lock: Mutex::new(()),
            registry: Registry::default(),
        };
        // Counters are registered without `_total`: the encoder appends it.
        registry.register(
            "http_requests",
            "HTTP requests by matched route, status and client",
            m.http_requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "HTTP request latency by matched route",
            m.http_request_duration.clone(),
        );
        registry.register(
            "images",
            "Images generated upstream and delivered, by client, model, size and quality",
            m.images.clone(),
        );
        registry.register(
            "upstream_requests",
            "Upstream attempts by upstream, key id and outcome",
            m.upstream_requests.clone(),
        );
        registry.register(
            "upstream_request_duration_seconds",
            "Upstream attempt latency by upstream",
            m.upstream_request_duration.clone(),
        );
        registry.register(
            "rate_limited",
            "Requests refused by a client rate limit, by limit",
            m.rate_limited.clone(),
        );
        registry.register(
            "quota_used",
            "Quota used in the current window (images; budget in price units)",
            m.quota_used.clone(),
        );
        registry.register(
            "quota_limit",
            "Quota limit of the current window",
            m.quota_limit.clone(),
        );
        registry.register(
            "spend",
            "Spend in price units in the current UTC day and month (settled requests)",
            m.spend.clone(),
        );
        registry.register(
            "cache_requests",
            "Generation requests by cache outcome",
            m.cache_requests.clone(),
        );
        registry.register(
            "cache_bytes",
            "Bytes held by the response cache",
            m.cache_bytes.clone(),
        );
        registry.register(
            "cache_entries",
            "Entries in the response cache",
            m.cache_entries.clone(),
        );
        registry.register(
            "cache_evictions",
            "Cache entries evicted for size or age",
            m.cache_evictions.clone(),
        );
        registry.register(
            "tasks",
            "Async tasks queued or processing now",
            m.tasks.clone(),
        );
        registry.register(
            "tasks_finished",
            "Async tasks finished, by final state",
            m.tasks_finished.clone(),
        );
        registry.register(
            "task_wait_seconds",
            "Time async tasks waited for a worker",
            m.task_wait.clone(),
        );
        registry.register(
            "task_duration_seconds",
            "Time from queueing an async task to its completion or failure",
            m.task_duration.clone(),
        );
        registry.register(
            "upstream_queue_depth",
            "Requests waiting for an upstream key",
            m.upstream_queue_depth.clone(),
        );
        registry.register(
            "upstream_key_state",
            "Upstream key state (1 for the current state of each key)",
            m.upstream_key_state.clone(),
        );
        registry.register(
            "upstream_ratelimit_remaining",
            "Remaining requests the upstream last reported for a key",
            m.upstream_ratelimit_remaining.clone(),
        );
        registry.register(
            "ready",
            "1 when /readyz answers 200 (a usable upstream key, writable ledger, not draining)",
            m.ready.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Counts `images` delivered to `client` for `request`.
    pub fn count_images(&self, client: &str, request: &crate::validate::ValidRequest, images: u32) {
        self.images
            .get_or_create(&ImageLabels {
                client: client.to_owned(),
                model: request.model.name().to_owned(),
                size: request.size.clone(),
                quality: request.quality.clone(),
            })
            .inc_by(u64::from(images));
    }

    /// Mirrors moka's cumulative eviction count into the counter.
    pub fn observe_cache_evictions(&self, total: u64) {
        let mut seen = self
            .cache_evictions_seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if total > *seen {
            self.cache_evictions.inc_by(total - *seen);
            *seen = total;
        }
    }

    /// Sets the cache gauges from the cache's own counters.
    pub fn set_cache(&self, stats: &CacheStats) {
        self.cache_bytes
            .set(i64::try_from(stats.weighted_bytes).unwrap_or(i64::MAX));
        self.cache_entries
            .set(i64::try_from(stats.entries).unwrap_or(i64::MAX));
        self.observe_cache_evictions(stats.evictions);
    }

    /// Sets key-state, queue and upstream-reported gauges from the key pools. Label sets of
    /// keys that no longer exist (after a reload) are dropped.
    pub fn set_pools(&self, pools: &[PoolStatus]) {
        self.upstream_key_state.clear();
        self.upstream_queue_depth.clear();
        self.upstream_ratelimit_remaining.clear();
        for pool in pools {
            self.upstream_queue_depth
                .get_or_create(&UpstreamLabels {
                    upstream: pool.upstream.clone(),
                })
                .set(i64::try_from(pool.queue_depth).unwrap_or(i64::MAX));
            for key in &pool.keys {
                for state in KeyHealth::ALL {
                    self.upstream_key_state
                        .get_or_create(&KeyStateLabels {
                            upstream: pool.upstream.clone(),
                            key: key.id.clone(),
                            state: state.as_str(),
                        })
                        .set(i64::from(key.state == state));
                }
                if let Some(remaining) = key
                    .upstream_limits
                    .as_ref()
                    .and_then(|l| l.remaining_requests)
                {
                    self.upstream_ratelimit_remaining
                        .get_or_create(&KeyLabels {
                            upstream: pool.upstream.clone(),
                            key: key.id.clone(),
                        })
                        .set(i64::try_from(remaining).unwrap_or(i64::MAX));
                }
            }
        }
    }

    /// Sets the quota gauges from a usage report: used (settled plus in flight) and limit, per
    /// client and window (`day`, `month`, and `budget` in price units when one is set); and
    /// each client's spend today and this month.
    pub fn set_quotas(&self, report: &UsageReport) {
        self.quota_used.clear();
        self.quota_limit.clear();
        self.spend.clear();
        for c in &report.clients {
            for (window, spend) in [("day", c.today.spend), ("month", c.this_month.spend)] {
                self.spend
                    .get_or_create(&SpendLabels {
                        client: c.client.clone(),
                        window,
                    })
                    .set(spend);
            }
            let set = |window: &'static str, used: f64, limit: f64| {
                let labels = QuotaLabels {
                    client: c.client.clone(),
                    window,
                };
                self.quota_used.get_or_create(&labels).set(used);
                self.quota_limit.get_or_create(&labels).set(limit);
            };
            set(
                "day",
                (c.day.used + c.day.reserved) as f64,
                c.day.limit as f64,
            );
            set(
                "month",
                (c.month.used + c.month.reserved) as f64,
                c.month.limit as f64,
            );
            if let Some(b) = &c.budget {
                set("budget", b.spent + b.reserved, b.limit);
            }
        }
    }

    /// Refreshes every state gauge from `state` and encodes the registry, as one step.
    pub fn scrape(&self, state: &ScrapeState<'_>) -> String {
        let _guard = self
            .scrape_lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.set_cache(state.cache);
        self.set_pools(state.pools);
        if let Some(report) = state.usage {
            self.set_quotas(report);
        }
        for (state, count) in [
            ("queued", state.tasks.queued),
            ("processing", state.tasks.processing),
        ] {
            self.tasks
                .get_or_create(&TaskStateLabels { state })
                .set(i64::try_from(count).unwrap_or(i64::MAX));
        }
        self.ready.set(i64::from(state.ready));
        self.encode()
    }

    /// The registry in Prometheus/OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        if prometheus_client::encoding::text::encode(&mut text, &self.registry).is_err() {
            tracing::error!("metrics encoding failed");
        }
        text
    }
}

/// The content type of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
