//! Upstream failures become the SPEC §3 errors: sanitised, bounded in time, never a panic.

use std::time::{Duration, Instant};

use imagegate::mock_upstream::MockOptions;
use serde_json::json;

use crate::helpers::{MODEL, body, error_body, spawn_app, spawn_app_with};

/// The client-visible text of an error must not leak the upstream's address, key or body.
fn assert_sanitised(error: &serde_json::Value, app: &crate::helpers::TestApp) {
    let text = error.to_string();
    assert!(
        !text.contains(&app.mock.addr().to_string()),
        "upstream address leaked: {text}"
    );
    assert!(
        !text.contains(&app.upstream_key),
        "upstream key leaked: {text}"
    );
    assert!(!text.contains("mock:"), "upstream body leaked: {text}");
}

#[tokio::test]
async fn an_upstream_429_on_the_only_key_reaches_the_client_as_busy_with_its_retry_after() {
    let app = spawn_app().await;
    let response = app
        .generate(&body("[mock:status=429 retry_after=30] a cat"))
        .await;
    // The key cools down for the upstream's Retry-After; with no other key, the client is told
    // to come back then.
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "30");
    let ms: u64 = response.headers()["retry-after-ms"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((29_000..=30_000).contains(&ms), "retry-after-ms {ms}");
    let error = error_body(response).await;
    assert_eq!(error["type"], "server_error");
    assert_eq!(error["code"], "upstream_busy");
    assert_sanitised(&error, &app);
    assert_eq!(
        app.mock.call_count(),
        1,
        "a cooling key is not called again"
    );
}

#[tokio::test]
async fn upstream_429_with_an_http_date_retry_after_is_converted_to_seconds() {
    let app = spawn_app().await;
    let response = app
        .generate(&body("[mock:status=429 retry_after_date=30] a cat"))
        .await;
    assert_eq!(response.status(), 503);
    let secs: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((28..=31).contains(&secs), "retry-after {secs}");
}

#[tokio::test]
async fn upstream_5xx_becomes_502_with_a_sanitised_message() {
    for status in [500, 502, 503] {
        // A fresh gateway each time: repeated failures would (rightly) open the key's circuit.
        let app = spawn_app().await;
        let response = app
            .generate(&body(&format!("[mock:status={status}] a cat")))
            .await;
        assert_eq!(response.status(), 502, "upstream {status}");
        let error = error_body(response).await;
        assert_eq!(error["type"], "upstream_error");
        assert_eq!(error["code"], "upstream_error");
        assert_sanitised(&error, &app);
    }
}

#[tokio::test]
async fn upstream_refusing_the_only_server_key_is_a_503_not_a_client_401() {
    let app = spawn_app().await;
    let response = app.generate(&body("[mock:status=401] a cat")).await;
    assert_eq!(response.status(), 503);
    assert!(response.headers().get("www-authenticate").is_none());
    let error = error_body(response).await;
    assert_eq!(error["type"], "server_error");
    assert_eq!(error["code"], "upstream_unavailable");
    assert_sanitised(&error, &app);
}

#[tokio::test]
async fn upstream_400_is_a_client_error_without_the_upstream_text() {
    let app = spawn_app().await;
    let response = app.generate(&body("[mock:status=400] a cat")).await;
    assert_eq!(response.status(), 400);
    let error = error_body(response).await;
    assert_eq!(error["code"], "upstream_rejected");
    assert_sanitised(&error, &app);
}

#[tokio::test]
async fn a_hanging_upstream_times_out_with_504_within_the_configured_timeout() {
    let app = spawn_app_with(MockOptions::default(), |c| c.upstreams[0].timeout_secs = 1).await;
    let started = Instant::now();
    let response = app.generate(&body("[mock:hang] a cat")).await;
    let elapsed = started.elapsed();
    assert_eq!(response.status(), 504);
    let error = error_body(response).await;
    assert_eq!(error["code"], "upstream_timeout");
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(3),
        "took {elapsed:?}"
    );
}

#[tokio::test]
async fn malformed_upstream_json_becomes_502() {
    let app = spawn_app().await;
    let response = app.generate(&body("[mock:bad_json] a cat")).await;
    assert_eq!(response.status(), 502);
    let error = error_body(response).await;
    assert_eq!(error["code"], "upstream_bad_response");
    assert_sanitised(&error, &app);
}

#[tokio::test]
async fn a_connection_reset_becomes_502_and_the_gateway_keeps_serving() {
    let app = spawn_app().await;
    let response = app.generate(&body("[mock:reset] a cat")).await;
    assert_eq!(response.status(), 502);
    error_body(response).await;
    let response = app.generate(&body("a cat")).await;
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn an_unreachable_upstream_becomes_502() {
    let app = spawn_app_with(MockOptions::default(), |c| {
        // Port 9 on loopback (discard) is closed on test machines: connection refused.
        c.upstreams[0].base_url = "http://127.0.0.1:9/v1".to_owned();
    })
    .await;
    let response = app
        .generate(&json!({"model": MODEL, "prompt": "a cat"}))
        .await;
    assert_eq!(response.status(), 502);
    let error = error_body(response).await;
    assert_eq!(error["type"], "upstream_error");
    assert!(!error.to_string().contains("127.0.0.1:9"));
}

#[tokio::test]
async fn an_oversized_upstream_response_is_refused_not_buffered() {
    let app = spawn_app_with(MockOptions::default(), |c| {
        c.upstreams[0].max_response_bytes = 1024
    })
    .await;
    let response = app
        .generate(&json!({"model": MODEL, "prompt": "big", "response_format": "b64_json"}))
        .await;
    assert_eq!(response.status(), 502);
    assert_eq!(error_body(response).await["code"], "upstream_bad_response");
}
