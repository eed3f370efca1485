//! Quotas through HTTP: reserved before the upstream call, exact under concurrency, refunded
//! on failure, and durable across `kill -9`.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::future::join_all;
use imagegate::config::StorageBackend;
use imagegate::mock_upstream::{MockOptions, MockUpstream};
use serde_json::{Value, json};

use crate::helpers::{
    MODEL, TestApp, UPSTREAM_KEY_VAR, base_config, error_body, http_client, random_hex,
    spawn_app_with, wait_until,
};
use crate::process::{BIN, ConfigFile, GatewayProcess, usage_report};

fn slow() -> MockOptions {
    MockOptions {
        latency: Duration::from_secs(1),
        ..MockOptions::default()
    }
}

/// Sends `count` concurrent requests with distinct prompts; returns (ok, insufficient_quota).
async fn flood(app: &TestApp, count: usize, n: u32) -> (usize, usize) {
    let bodies: Vec<Value> = (0..count)
        .map(|i| json!({"model": MODEL, "prompt": format!("flood {i} {}", random_hex(4)), "n": n}))
        .collect();
    let responses = join_all(bodies.iter().map(|b| app.generate(b))).await;
    let mut ok = 0;
    let mut refused = 0;
    for response in responses {
        match response.status().as_u16() {
            200 => ok += 1,
            429 => {
                assert_eq!(response.headers()["x-should-retry"], "false");
                let error = error_body(response).await;
                assert_eq!(
                    (error["type"].as_str(), error["code"].as_str()),
                    (Some("insufficient_quota"), Some("insufficient_quota"))
                );
                refused += 1;
            }
            other => panic!("unexpected status {other}"),
        }
    }
    (ok, refused)
}

#[tokio::test]
async fn a_quota_of_100_under_300_concurrent_requests_lets_exactly_100_through() {
    let app = spawn_app_with(slow(), |c| c.clients[0].images_per_day = Some(100)).await;
    let (ok, refused) = flood(&app, 300, 1).await;
    assert_eq!((ok, refused), (100, 200));
    assert_eq!(
        app.mock.call_count(),
        100,
        "refused requests never reached the upstream"
    );

    let usage = app.admin_json("/admin/usage?client=team-a").await;
    let day = &usage["clients"][0]["day"];
    assert_eq!(
        (
            day["used"].as_u64(),
            day["limit"].as_u64(),
            day["remaining"].as_u64()
        ),
        (Some(100), Some(100), Some(0))
    );
}

#[tokio::test]
async fn with_n_4_a_quota_of_100_lets_exactly_25_requests_through() {
    let app = spawn_app_with(slow(), |c| c.clients[0].images_per_day = Some(100)).await;
    let (ok, refused) = flood(&app, 300, 4).await;
    assert_eq!((ok, refused), (25, 275));
    assert_eq!(app.mock.images_produced(), 100);
}

#[tokio::test]
async fn a_budget_is_reserved_like_a_quota() {
    let app = spawn_app_with(MockOptions::default(), |c| {
        c.models[0].price_per_image.insert("standard".into(), 0.04);
        c.clients[0].budget_per_month = Some(1.0);
    })
    .await;
    let (ok, refused) = flood(&app, 40, 1).await;
    assert_eq!((ok, refused), (25, 15), "1.00 / 0.04 = 25 images");
    let usage = app.admin_json("/admin/usage?client=team-a").await;
    let budget = &usage["clients"][0]["budget"];
    assert!(
        (budget["spent"].as_f64().unwrap() - 1.0).abs() < 1e-9,
        "{budget}"
    );
}

#[tokio::test]
async fn failures_are_refunded_and_ledger_usage_and_upstream_images_agree_exactly() {
    let app = spawn_app_with(MockOptions::default(), |c| {
        c.clients[0].images_per_day = Some(10);
        // One attempt per request, so the four failures below stay under the circuit threshold.
        c.upstreams[0].max_retries = 0;
    })
    .await;
    for prompt in [
        "[mock:status=500] a",
        "[mock:status=503] b",
        "[mock:reset] c",
        "[mock:reset] d",
    ] {
        let response = app
            .generate(&json!({"model": MODEL, "prompt": prompt}))
            .await;
        assert_eq!(response.status(), 502, "{prompt}");
    }
    let (ok, refused) = flood(&app, 12, 1).await;
    assert_eq!((ok, refused), (10, 2), "the failed requests spent nothing");

    let usage = app.admin_json("/admin/usage?client=team-a").await;
    let today = &usage["clients"][0]["today"];
    assert_eq!(today["images"].as_u64(), Some(10));
    assert_eq!(today["failures"].as_u64(), Some(4));
    assert_eq!(
        app.mock.images_produced(),
        10,
        "ledger = usage report = images the upstream produced"
    );
}

#[tokio::test]
async fn cache_hits_spend_no_quota_but_count_as_cached() {
    let app = spawn_app_with(MockOptions::default(), |c| {
        c.clients[0].images_per_day = Some(1)
    })
    .await;
    let body = json!({"model": MODEL, "prompt": "cached thumbnail"});
    assert_eq!(app.generate(&body).await.status(), 200);
    for _ in 0..3 {
        assert_eq!(app.generate(&body).await.status(), 200, "hits are free");
    }
    let other = app
        .generate(&json!({"model": MODEL, "prompt": "new"}))
        .await;
    assert_eq!(other.status(), 429, "the quota of 1 is spent");
    let usage = app.admin_json("/admin/usage?client=team-a").await;
    assert_eq!(usage["clients"][0]["today"]["cached"].as_u64(), Some(3));
    assert_eq!(usage["clients"][0]["day"]["used"].as_u64(), Some(1));
}

/// A client that disconnects while its upstream call runs: the call finishes and its images
/// are charged (not refunded, not lost), through the cache's path or around it.
async fn a_call_whose_client_left_is_still_charged(cache: bool) {
    let app = spawn_app_with(slow(), |c| {
        c.clients[0].cache = Some(cache);
        c.clients[0].images_per_day = Some(10);
    })
    .await;
    let request = tokio::spawn(
        app.http
            .post(app.url("/v1/images/generations"))
            .bearer_auth(&app.client_key)
            .json(&json!({"model": MODEL, "prompt": "left early", "n": 2}))
            .send(),
    );
    wait_until(
        "the call reaches the upstream",
        Duration::from_secs(10),
        || app.mock.call_count() == 1,
    )
    .await;
    request.abort();
    assert!(request.await.unwrap_err().is_cancelled(), "the client left");
    assert_eq!(
        app.mock.calls()[0].status,
        0,
        "it left before the upstream answered"
    );
    wait_until(
        "the upstream answers the orphaned call",
        Duration::from_secs(5),
        || app.mock.images_produced() == 2,
    )
    .await;
    // The commit follows the answer in the request's task; the report shows it once written.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let usage = loop {
        let usage = app.admin_json("/admin/usage?client=team-a").await;
        if usage["clients"][0]["day"]["reserved"] == 0 {
            break usage;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the reservation was never settled: {usage}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let client = &usage["clients"][0];
    assert_eq!(
        (
            client["day"]["used"].as_u64(),
            client["today"]["images"].as_u64()
        ),
        (Some(2), Some(2)),
        "the 2 images the upstream made are charged: {usage}"
    );
    assert_eq!(client["today"]["failures"].as_u64(), Some(0));
    assert_eq!(app.mock.call_count(), 1);
}

#[tokio::test]
async fn a_client_that_leaves_mid_call_is_charged_for_what_the_upstream_made_without_the_cache() {
    a_call_whose_client_left_is_still_charged(false).await;
}

#[tokio::test]
async fn a_client_that_leaves_mid_call_is_charged_for_what_the_upstream_made_with_the_cache() {
    a_call_whose_client_left_is_still_charged(true).await;
}

/// A gateway on a real SQLite file, cache off, a daily quota of 30 for team-a.
fn durable_config(base_url: &str, client_key: &str, db: &std::path::Path) -> String {
    let mut config = base_config(base_url, client_key, "unused");
    config.storage.backend = StorageBackend::Sqlite;
    config.storage.path = db.to_owned();
    config.cache.enabled = false;
    config.client_defaults.images_per_day = 30;
    config.to_toml()
}

#[tokio::test]
async fn usage_survives_kill_9_and_is_never_below_what_clients_received() {
    let mock = MockUpstream::start(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        MockOptions::default(),
    )
    .await
    .unwrap();
    let client_key = format!("sk-{}", random_hex(12));
    let placeholder = ConfigFile::new("");
    let db = placeholder.path.with_file_name("imagegate.db");
    let config = ConfigFile::new(&durable_config(&mock.base_url(), &client_key, &db));
    let env = [(UPSTREAM_KEY_VAR, "sk-upstream")];
    let http = http_client();

    let gateway = GatewayProcess::start(&config.path, &env);
    let generate = |url: String, prompt: String| {
        http.post(url)
            .bearer_auth(&client_key)
            .json(&json!({"model": MODEL, "prompt": prompt}))
            .send()
    };
    let mut received = 0;
    for i in 0..20 {
        let response = generate(gateway.url("/v1/images/generations"), format!("before {i}"))
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        received += 1;
    }
    // Five more in flight on a slow upstream when the process dies.
    let in_flight: Vec<_> = (0..5)
        .map(|i| {
            tokio::spawn(generate(
                gateway.url("/v1/images/generations"),
                format!("[mock:latency_ms=5000] during {i}"),
            ))
        })
        .collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while mock.call_count() < 25 {
        assert!(
            std::time::Instant::now() < deadline,
            "in-flight requests never reached the upstream"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    gateway.kill9();
    for task in in_flight {
        assert!(
            task.await.unwrap().is_err(),
            "the client saw the connection die"
        );
    }

    // The usage command reads the file while nothing runs.
    let report = usage_report(&config.path, &env);
    let day = &report["clients"][0]["day"];
    let (used, reserved) = (
        day["used"].as_u64().unwrap(),
        day["reserved"].as_u64().unwrap(),
    );
    let called = mock.call_count() as u64;
    assert!(used >= received, "usage {used} < received {received}");
    assert_eq!(
        used + reserved,
        called,
        "every call the upstream got is on disk, charged or reserved: the {} in flight were \
         reserved durably before they were sent",
        called - received
    );

    // Restart on the same file: pending reservations are charged in full (the upstream may
    // have made and billed those images), and the quota still holds.
    let gateway = GatewayProcess::start(&config.path, &env);
    let mut passed = 0;
    for i in 0..10 {
        let response = generate(gateway.url("/v1/images/generations"), format!("after {i}"))
            .await
            .unwrap();
        match response.status().as_u16() {
            200 => passed += 1,
            429 => {}
            other => panic!("status {other}"),
        }
    }
    assert_eq!(
        passed,
        30 - called,
        "the {called} images of every call made before the crash are charged; exactly the rest of \
         the quota passes"
    );
    let (clean, _, _) = gateway.stop();
    assert!(clean);

    let table = std::process::Command::new(BIN)
        .args(["usage", "--config"])
        .arg(&config.path)
        .env_clear()
        .env(UPSTREAM_KEY_VAR, "sk-upstream")
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains("team-a") && table.contains("30/30"),
        "{table}"
    );
}
