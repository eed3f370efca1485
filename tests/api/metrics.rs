//! `/metrics` after real traffic: every SPEC §8 metric is there with its labels, the counters
//! agree with what was sent and what the mock upstream saw, labels stay bounded, and the
//! Grafana dashboard and alert rules in `deploy/` query only metrics a real scrape exports.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Value, json};

use crate::helpers::{MODEL, TestApp, body, spawn_app_with};
use imagegate::mock_upstream::MockOptions;

/// Every SPEC §8 metric as it appears in a scrape (counters with `_total`, histograms by their
/// `_bucket` series) and its label names. Task metrics are added with the tasks module:
/// `("imagegate_tasks", &["state"]),`.
const SPEC_METRICS: &[(&str, &[&str])] = &[
    (
        "imagegate_http_requests_total",
        &["client", "route", "status"],
    ),
    (
        "imagegate_http_request_duration_seconds_bucket",
        &["le", "route"],
    ),
    (
        "imagegate_images_total",
        &["client", "model", "quality", "size"],
    ),
    (
        "imagegate_upstream_requests_total",
        &["key", "outcome", "upstream"],
    ),
    (
        "imagegate_upstream_request_duration_seconds_bucket",
        &["le", "upstream"],
    ),
    ("imagegate_rate_limited_total", &["client", "limit"]),
    ("imagegate_quota_used", &["client", "window"]),
    ("imagegate_quota_limit", &["client", "window"]),
    ("imagegate_spend", &["client", "window"]),
    ("imagegate_cache_requests_total", &["outcome"]),
    ("imagegate_cache_bytes", &[]),
    ("imagegate_upstream_queue_depth", &["upstream"]),
    ("imagegate_tasks", &["state"]),
    (
        "imagegate_upstream_key_state",
        &["key", "state", "upstream"],
    ),
    (
        "imagegate_upstream_ratelimit_remaining",
        &["key", "upstream"],
    ),
    ("imagegate_ready", &[]),
];

/// One sample line of the text exposition format.
#[derive(Debug, Clone)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Parses the OpenMetrics text `/metrics` serves (comments skipped, label values unescaped).
pub fn parse_exposition(text: &str) -> Vec<Sample> {
    let mut samples = Vec::new();
    for line in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (series, value) = line.rsplit_once(' ').expect("a sample has a value");
        let value = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("bad value in `{line}`")),
        };
        let (name, labels) = match series.split_once('{') {
            None => (series.to_owned(), BTreeMap::new()),
            Some((name, rest)) => {
                let inner = rest.strip_suffix('}').expect("labels end with }");
                (name.to_owned(), parse_labels(inner))
            }
        };
        samples.push(Sample {
            name,
            labels,
            value,
        });
    }
    samples
}

fn parse_labels(mut rest: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    while !rest.is_empty() {
        let (key, after) = rest.split_once("=\"").expect("label=\"value\"");
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next().expect("label value ends") {
                (_, '\\') => match chars.next().expect("escape") {
                    (_, 'n') => value.push('\n'),
                    (_, c) => value.push(c),
                },
                (i, '"') => break i,
                (_, c) => value.push(c),
            }
        };
        labels.insert(key.to_owned(), value);
        rest = after[end + 1..].trim_start_matches(',');
    }
    labels
}

/// A scrape, queryable by name and labels.
pub struct Scrape {
    pub text: String,
    pub samples: Vec<Sample>,
}

impl Scrape {
    pub async fn take(app: &TestApp) -> Scrape {
        let response = app
            .http
            .get(app.admin_url("/metrics"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let text = response.text().await.unwrap();
        let samples = parse_exposition(&text);
        Scrape { text, samples }
    }

    fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }

    /// The one sample with these labels (others may be unconstrained); panics if absent.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let found: Vec<_> = self.matching(name, labels).collect();
        assert_eq!(
            found.len(),
            1,
            "expected one {name}{labels:?}, found {found:?}"
        );
        found[0].value
    }

    /// The sum over every sample of `name` with these labels.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).map(|s| s.value).sum()
    }

    pub fn label_values(&self, name: &str, label: &str) -> BTreeSet<String> {
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .filter_map(|s| s.labels.get(label).cloned())
            .collect()
    }

    pub fn names(&self) -> BTreeSet<&str> {
        self.samples.iter().map(|s| s.name.as_str()).collect()
    }
}

/// A gateway with prices, quotas, a tight rate limit for team-b, and a second model route;
/// then traffic of every kind: successes of two sizes and qualities, a cache hit, an upstream
/// failure with retries, a rate-limit refusal, an unauthenticated request, a templated route,
/// an unknown route and admin reads.
async fn app_after_traffic() -> TestApp {
    let app = spawn_app_with(MockOptions::default(), |c| {
        c.models[0].price_per_image =
            BTreeMap::from([("standard".to_owned(), 0.02), ("hd".to_owned(), 0.04)]);
        c.clients[0].images_per_day = Some(50);
        c.clients[0].images_per_month = Some(500);
        c.clients[1].requests_per_minute = Some(1);
        c.clients[1].budget_per_month = Some(1.0);
    })
    .await;
    let hd = json!({"model": MODEL, "prompt": "metrics two", "n": 2, "size": "1536x1024", "quality": "hd"});
    assert_eq!(app.generate(&hd).await.status(), 200);
    // The provider reports its remaining allowance on this answer.
    let reported = body("metrics one [mock:remaining_requests=42]");
    assert_eq!(app.generate(&reported).await.status(), 200);
    let hit = app.generate(&reported).await;
    assert_eq!(hit.status(), 200);
    assert_eq!(hit.headers()["x-imagegate-cache"], "hit");
    assert_eq!(
        app.generate(&body("[mock:status=500] metrics fail"))
            .await
            .status(),
        502
    );
    assert_eq!(
        app.generate_as(&app.other_client_key, &body("metrics b"))
            .await
            .status(),
        200
    );
    assert_eq!(
        app.generate_as(&app.other_client_key, &body("metrics b again"))
            .await
            .status(),
        429
    );
    let get = |path: &str, key: Option<&str>| {
        let request = app.http.get(app.url(path));
        match key {
            Some(k) => request.bearer_auth(k),
            None => request,
        }
        .send()
    };
    assert_eq!(get("/v1/models", None).await.unwrap().status(), 401);
    assert_eq!(
        get(&format!("/v1/models/{MODEL}"), Some(&app.client_key))
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        get("/v1/no/such/route", Some(&app.client_key))
            .await
            .unwrap()
            .status(),
        404
    );
    app.admin_json("/admin/usage").await;
    app
}

#[tokio::test]
async fn a_scrape_after_traffic_has_every_spec_metric_with_counts_that_match_the_traffic() {
    let app = app_after_traffic().await;
    let scrape = Scrape::take(&app).await;

    for (name, labels) in SPEC_METRICS {
        let expected: BTreeSet<&str> = labels.iter().copied().collect();
        let series: Vec<_> = scrape.samples.iter().filter(|s| s.name == *name).collect();
        assert!(!series.is_empty(), "{name} missing from the scrape");
        for s in series {
            let got: BTreeSet<&str> = s.labels.keys().map(String::as_str).collect();
            assert_eq!(got, expected, "labels of {name}");
        }
    }

    // Images: what the mock produced, per client, model, size and quality.
    let images = "imagegate_images_total";
    assert_eq!(
        scrape.sum(images, &[]),
        app.mock.images_produced() as f64,
        "images_total equals the images the mock produced"
    );
    assert_eq!(
        scrape.value(
            images,
            &[
                ("client", "team-a"),
                ("size", "1536x1024"),
                ("quality", "hd")
            ]
        ),
        2.0
    );
    assert_eq!(
        scrape.value(
            images,
            &[
                ("client", "team-a"),
                ("model", MODEL),
                ("size", "1024x1024"),
                ("quality", "standard")
            ]
        ),
        1.0,
        "the cache hit generated nothing"
    );
    assert_eq!(scrape.value(images, &[("client", "team-b")]), 1.0);

    // Upstream attempts: one per call the mock saw, each timed.
    let calls = app.mock.call_count() as f64;
    let attempts = "imagegate_upstream_requests_total";
    assert_eq!(scrape.sum(attempts, &[]), calls);
    assert_eq!(
        scrape.value(
            attempts,
            &[
                ("upstream", "primary"),
                ("key", "k1"),
                ("outcome", "success")
            ]
        ),
        3.0
    );
    let failed_calls = app.mock.calls().iter().filter(|c| c.status == 500).count() as f64;
    assert!(failed_calls >= 1.0);
    assert_eq!(
        scrape.value(attempts, &[("outcome", "server_error")]),
        failed_calls
    );
    assert_eq!(
        scrape.value(
            "imagegate_upstream_request_duration_seconds_count",
            &[("upstream", "primary")]
        ),
        calls
    );

    // HTTP requests by matched route, status and configured client.
    let http = "imagegate_http_requests_total";
    let generations = "/v1/images/generations";
    let count = |route: &str, status: &str, client: &str| {
        scrape.value(
            http,
            &[("route", route), ("status", status), ("client", client)],
        )
    };
    assert_eq!(count(generations, "200", "team-a"), 3.0);
    assert_eq!(count(generations, "502", "team-a"), 1.0);
    assert_eq!(count(generations, "200", "team-b"), 1.0);
    assert_eq!(count(generations, "429", "team-b"), 1.0);
    assert_eq!(count("/v1/models", "401", "-"), 1.0);
    assert_eq!(count("/v1/models/{id}", "200", "team-a"), 1.0);
    assert_eq!(count("unmatched", "404", "-"), 1.0);
    assert_eq!(count("/admin/usage", "200", "-"), 1.0);
    assert_eq!(
        scrape.label_values(http, "route"),
        BTreeSet::from(
            [
                generations,
                "/v1/models",
                "/v1/models/{id}",
                "unmatched",
                "/admin/usage"
            ]
            .map(String::from)
        ),
        "routes are matched templates, never raw paths"
    );
    for name in [http, images, "imagegate_rate_limited_total"] {
        let clients = scrape.label_values(name, "client");
        assert!(
            clients.is_subset(&BTreeSet::from(["team-a", "team-b", "-"].map(String::from))),
            "{name} is labelled only with configured client ids: {clients:?}"
        );
    }
    let duration = "imagegate_http_request_duration_seconds";
    assert_eq!(
        scrape.value(&format!("{duration}_count"), &[("route", generations)]),
        6.0
    );
    let buckets = scrape.label_values(&format!("{duration}_bucket"), "le");
    for le in ["0.001", "0.1", "1.0", "60.0", "300.0", "+Inf"] {
        assert!(buckets.contains(le), "bucket le={le} in {buckets:?}");
    }

    assert_eq!(
        scrape.value(
            "imagegate_rate_limited_total",
            &[("client", "team-b"), ("limit", "requests")]
        ),
        1.0
    );

    // Quotas and spend, per configured client and window.
    let quota = |name: &str, client: &str, window: &str| {
        scrape.value(name, &[("client", client), ("window", window)])
    };
    assert_eq!(quota("imagegate_quota_used", "team-a", "day"), 3.0);
    assert_eq!(quota("imagegate_quota_limit", "team-a", "day"), 50.0);
    assert_eq!(quota("imagegate_quota_used", "team-a", "month"), 3.0);
    assert_eq!(quota("imagegate_quota_limit", "team-a", "month"), 500.0);
    assert_eq!(quota("imagegate_quota_used", "team-b", "day"), 1.0);
    assert!((quota("imagegate_quota_used", "team-b", "budget") - 0.02).abs() < 1e-9);
    assert_eq!(quota("imagegate_quota_limit", "team-b", "budget"), 1.0);
    assert!(
        scrape
            .matching(
                "imagegate_quota_limit",
                &[("client", "team-a"), ("window", "budget")]
            )
            .next()
            .is_none(),
        "no budget window for a client without a budget"
    );
    assert!((quota("imagegate_spend", "team-a", "day") - 0.10).abs() < 1e-9);
    assert!((quota("imagegate_spend", "team-a", "month") - 0.10).abs() < 1e-9);
    assert!((quota("imagegate_spend", "team-b", "month") - 0.02).abs() < 1e-9);

    // Cache: the one hit, a miss for every other generation that passed the rate limit.
    let cache = "imagegate_cache_requests_total";
    assert_eq!(scrape.value(cache, &[("outcome", "hit")]), 1.0);
    assert_eq!(scrape.value(cache, &[("outcome", "miss")]), 4.0);
    assert!(scrape.value("imagegate_cache_bytes", &[]) > 0.0);

    // Upstream key state, queue and what the provider reported.
    let state = |s: &str| {
        scrape.value(
            "imagegate_upstream_key_state",
            &[("upstream", "primary"), ("key", "k1"), ("state", s)],
        )
    };
    assert_eq!(state("healthy"), 1.0);
    for other in ["cooling_down", "disabled", "circuit_open"] {
        assert_eq!(state(other), 0.0, "{other}");
    }
    assert_eq!(
        scrape.value(
            "imagegate_upstream_ratelimit_remaining",
            &[("upstream", "primary"), ("key", "k1")]
        ),
        42.0
    );
    assert_eq!(
        scrape.value("imagegate_upstream_queue_depth", &[("upstream", "primary")]),
        0.0
    );
    assert_eq!(scrape.value("imagegate_ready", &[]), 1.0);

    for secret in [
        &app.client_key,
        &app.other_client_key,
        &app.upstream_key,
        &app.admin_token,
    ] {
        assert!(
            !scrape.text.contains(secret.as_str()),
            "a secret in /metrics"
        );
    }
}

#[tokio::test]
async fn readiness_and_key_state_gauges_follow_a_disabled_key() {
    let app = spawn_app_with(MockOptions::default(), |_| {}).await;
    assert_eq!(
        app.generate(&body("[mock:status=401] revoked"))
            .await
            .status(),
        503
    );
    let scrape = Scrape::take(&app).await;
    assert_eq!(
        scrape.value(
            "imagegate_upstream_key_state",
            &[("key", "k1"), ("state", "disabled")]
        ),
        1.0
    );
    assert_eq!(
        scrape.value(
            "imagegate_upstream_key_state",
            &[("key", "k1"), ("state", "healthy")]
        ),
        0.0
    );
    assert_eq!(scrape.value("imagegate_ready", &[]), 0.0);
    let ready = app.http.get(app.admin_url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503, "the gauge and /readyz agree");
}

/// Every `imagegate_*` name in `text` (metric names; recording rules would use `:`).
fn metric_names_in(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("imagegate_") {
        let preceded_by_ident = rest[..at]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        if !preceded_by_ident {
            names.insert(tail[..end].to_owned());
        }
        rest = &tail[end..];
    }
    names
}

fn deploy_file(path: &str) -> String {
    let full = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{}: {e}", full.display()))
}

/// The PromQL of every panel target, including panels nested in rows.
fn grafana_queries(dashboard: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack: Vec<&Value> = dashboard["panels"].as_array().unwrap().iter().collect();
    while let Some(panel) = stack.pop() {
        if let Some(nested) = panel["panels"].as_array() {
            stack.extend(nested);
        }
        for target in panel["targets"].as_array().into_iter().flatten() {
            out.push(target["expr"].as_str().unwrap().to_owned());
        }
    }
    out
}

#[tokio::test]
async fn the_grafana_dashboard_and_alert_rules_query_only_metrics_a_real_scrape_exports() {
    let app = app_after_traffic().await;
    let scrape = Scrape::take(&app).await;
    let exported = scrape.names();

    let dashboard: Value =
        serde_json::from_str(&deploy_file("grafana/imagegate.json")).expect("valid JSON");
    assert_eq!(dashboard["uid"], "imagegate");
    let queries = grafana_queries(&dashboard);
    assert!(queries.len() >= 10, "the dashboard has its panels");
    let mut referenced = BTreeSet::new();
    for query in &queries {
        let names = metric_names_in(query);
        assert!(
            !names.is_empty(),
            "a panel queries no imagegate metric: {query}"
        );
        referenced.extend(names);
    }
    let alerts = deploy_file("prometheus/alerts.yml");
    let alert_names = metric_names_in(&alerts);
    assert!(alert_names.len() >= 5, "the alerts use imagegate metrics");
    referenced.extend(alert_names);

    let missing: Vec<_> = referenced
        .iter()
        .filter(|n| !exported.contains(n.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "deploy/ queries metrics that /metrics does not export: {missing:?}"
    );
}
