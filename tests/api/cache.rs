//! The response cache through HTTP: coalescing, hits, scopes, what is and is not stored.

use std::time::{Duration, Instant};

use futures_util::future::join_all;
use imagegate::config::CacheScope;
use imagegate::mock_upstream::{Fault, MockOptions};
use serde_json::{Value, json};

use crate::helpers::{MODEL, TestApp, spawn_app, spawn_app_with, wait_until};
use imagegate::upstream::pool::KeyHealth;

fn slow() -> MockOptions {
    MockOptions {
        latency: Duration::from_secs(1),
        ..MockOptions::default()
    }
}

async fn send(
    app: &TestApp,
    key: &str,
    body: &Value,
    cache_control: Option<&str>,
) -> (u16, String, bytes::Bytes) {
    let mut request = app
        .http
        .post(app.url("/v1/images/generations"))
        .bearer_auth(key)
        .json(body);
    if let Some(cc) = cache_control {
        request = request.header("cache-control", cc);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let outcome = response
        .headers()
        .get("x-imagegate-cache")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (status, outcome, response.bytes().await.unwrap())
}

#[tokio::test]
async fn fifty_identical_concurrent_requests_make_one_upstream_call() {
    let app = spawn_app_with(slow(), |_| {}).await;
    let body = json!({"model": MODEL, "prompt": "the same thumbnail"});
    let results = join_all((0..50).map(|_| send(&app, &app.client_key, &body, None))).await;
    assert_eq!(
        app.mock.call_count(),
        1,
        "one upstream call for 50 identical requests"
    );
    assert!(results.iter().all(|(status, _, _)| *status == 200));
    let first = &results[0].2;
    assert!(
        results.iter().all(|(_, _, b)| b == first),
        "every waiter got the same body"
    );
    let misses = results.iter().filter(|(_, o, _)| o == "miss").count();
    let coalesced = results.iter().filter(|(_, o, _)| o == "coalesced").count();
    assert_eq!((misses, coalesced), (1, 49));

    let started = Instant::now();
    let (status, outcome, again) = send(&app, &app.client_key, &body, None).await;
    assert_eq!((status, outcome.as_str()), (200, "hit"));
    assert_eq!(&again, first);
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "a hit does not wait for the upstream"
    );
    assert_eq!(app.mock.call_count(), 1);

    // scope = "client" (the default): another client gets its own generation.
    let (_, outcome, _) = send(&app, &app.other_client_key, &body, None).await;
    assert_eq!(outcome, "miss");
    assert_eq!(app.mock.call_count(), 2);
}

#[tokio::test]
async fn under_shared_scope_another_client_gets_the_cached_answer() {
    let app = spawn_app_with(MockOptions::default(), |c| {
        c.cache.scope = CacheScope::Shared
    })
    .await;
    let body = json!({"model": MODEL, "prompt": "shared"});
    let (_, first, a) = send(&app, &app.client_key, &body, None).await;
    let (_, second, b) = send(&app, &app.other_client_key, &body, None).await;
    assert_eq!((first.as_str(), second.as_str()), ("miss", "hit"));
    assert_eq!(a, b);
    assert_eq!(app.mock.call_count(), 1);
}

#[tokio::test]
async fn changing_any_generated_field_is_a_miss_but_user_is_not_part_of_the_key() {
    let app = spawn_app().await;
    let base = json!({"model": MODEL, "prompt": "p", "size": "1024x1024", "quality": "standard", "n": 1, "response_format": "url"});
    assert_eq!(send(&app, &app.client_key, &base, None).await.1, "miss");
    let variants = [
        ("model", json!("other-model")),
        ("prompt", json!("q")),
        ("size", json!("1536x1024")),
        ("quality", json!("hd")),
        ("n", json!(2)),
        ("response_format", json!("b64_json")),
    ];
    for (i, (field, value)) in variants.iter().enumerate() {
        let mut body = base.clone();
        body[*field] = value.clone();
        let (status, outcome, _) = send(&app, &app.client_key, &body, None).await;
        assert_eq!(
            (status, outcome.as_str()),
            (200, "miss"),
            "changing {field}"
        );
        assert_eq!(app.mock.call_count(), i + 2);
    }
    let mut tagged = base.clone();
    tagged["user"] = json!("end-user-7");
    assert_eq!(
        send(&app, &app.client_key, &tagged, None).await.1,
        "hit",
        "user is not part of the key"
    );
}

#[tokio::test]
async fn an_upstream_500_is_never_served_from_the_cache() {
    let app = spawn_app().await;
    let body = json!({"model": MODEL, "prompt": "flaky"});
    app.mock.set_key_fault(
        &app.upstream_key,
        Some("status=500".parse::<Fault>().unwrap()),
    );
    let (status, _, _) = send(&app, &app.client_key, &body, None).await;
    assert_eq!(status, 502);
    app.mock.set_key_fault(&app.upstream_key, None);
    let calls = app.mock.call_count();
    let (status, outcome, _) = send(&app, &app.client_key, &body, None).await;
    assert_eq!((status, outcome.as_str()), (200, "miss"));
    assert_eq!(
        app.mock.call_count(),
        calls + 1,
        "the next request went upstream"
    );
}

#[tokio::test]
async fn a_429_from_the_upstream_is_not_cached_either() {
    let app = spawn_app().await;
    let body = json!({"model": MODEL, "prompt": "limited"});
    app.mock.set_key_fault(
        &app.upstream_key,
        Some("status=429 retry_after=1".parse::<Fault>().unwrap()),
    );
    let (status, _, _) = send(&app, &app.client_key, &body, None).await;
    assert_eq!(status, 503);
    app.mock.set_key_fault(&app.upstream_key, None);
    // The key rests for the 429's Retry-After (1 s); the next request needs it back.
    wait_until("the key's cooldown ends", Duration::from_secs(5), || {
        app.state.runtime().upstreams.status()[0].keys[0].state == KeyHealth::Healthy
    })
    .await;
    let (status, outcome, _) = send(&app, &app.client_key, &body, None).await;
    assert_eq!((status, outcome.as_str()), (200, "miss"));
    assert_eq!(app.mock.call_count(), 2);
}

#[tokio::test]
async fn no_cache_forces_a_fresh_generation_and_refreshes_the_entry() {
    let app = spawn_app().await;
    let body = json!({"model": MODEL, "prompt": "refresh me"});
    let (_, _, first) = send(&app, &app.client_key, &body, None).await;
    let (status, outcome, fresh) = send(&app, &app.client_key, &body, Some("no-cache")).await;
    assert_eq!((status, outcome.as_str()), (200, "miss"));
    assert_eq!(app.mock.call_count(), 2, "no-cache went upstream");
    assert_ne!(fresh, first, "a new image");
    let (_, outcome, cached) = send(&app, &app.client_key, &body, None).await;
    assert_eq!(outcome, "hit");
    assert_eq!(cached, fresh, "the entry was refreshed");
}

#[tokio::test]
async fn no_store_keeps_nothing() {
    let app = spawn_app().await;
    let body = json!({"model": MODEL, "prompt": "private"});
    let (_, outcome, _) = send(&app, &app.client_key, &body, Some("No-Store")).await;
    assert_eq!(outcome, "miss");
    let (_, outcome, _) = send(&app, &app.client_key, &body, None).await;
    assert_eq!(outcome, "miss", "nothing was stored");
    assert_eq!(app.mock.call_count(), 2);
}

#[tokio::test]
async fn a_client_with_cache_off_bypasses_it() {
    let app = spawn_app_with(MockOptions::default(), |c| c.clients[0].cache = Some(false)).await;
    let body = json!({"model": MODEL, "prompt": "never cached"});
    for _ in 0..2 {
        assert_eq!(send(&app, &app.client_key, &body, None).await.1, "bypass");
    }
    assert_eq!(app.mock.call_count(), 2);
}

#[tokio::test]
async fn filling_the_cache_with_b64_responses_stays_within_max_bytes() {
    const MAX: u64 = 4 * 1024 * 1024;
    let app = spawn_app_with(
        MockOptions {
            image_divisor: 4,
            ..MockOptions::default()
        },
        |c| c.cache.max_bytes = MAX,
    )
    .await;
    let mut stored = 0;
    for i in 0..40 {
        let body =
            json!({"model": MODEL, "prompt": format!("big {i}"), "response_format": "b64_json"});
        let (status, _, bytes) = send(&app, &app.client_key, &body, None).await;
        assert_eq!(status, 200);
        stored += bytes.len() as u64;
    }
    assert!(
        stored > 2 * MAX,
        "the test really overfills the cache ({stored} bytes)"
    );
    app.state.cache.settle().await;
    let stats = app.state.cache.stats();
    assert!(stats.weighted_bytes <= MAX, "{stats:?}");
    assert!(stats.entries > 0 && stats.evictions > 0, "{stats:?}");
}

#[tokio::test]
async fn a_client_that_disconnects_mid_call_does_not_cancel_it_and_the_next_request_hits() {
    let app = spawn_app_with(slow(), |_| {}).await;
    let body = json!({"model": MODEL, "prompt": "impatient"});
    let request = tokio::spawn(
        app.http
            .post(app.url("/v1/images/generations"))
            .bearer_auth(&app.client_key)
            .json(&body)
            .send(),
    );
    // Give up once the call has reached the upstream, long before it answers (1 s).
    wait_until(
        "the call reaches the upstream",
        Duration::from_secs(10),
        || app.mock.call_count() == 1,
    )
    .await;
    request.abort();
    assert!(
        request.await.unwrap_err().is_cancelled(),
        "the client left before the answer"
    );
    assert_eq!(
        app.mock.calls()[0].status,
        0,
        "the upstream had not answered yet"
    );

    wait_until(
        "the upstream answers the orphaned call",
        Duration::from_secs(5),
        || app.mock.calls().first().is_some_and(|c| c.status != 0),
    )
    .await;
    let (status, outcome, _) = send(&app, &app.client_key, &body, None).await;
    // Either the stored answer, or (if the store lags the answer by a moment) joined in flight.
    assert_eq!(status, 200);
    assert!(outcome == "hit" || outcome == "coalesced", "{outcome}");
    assert_eq!(
        app.mock.call_count(),
        1,
        "the orphaned call was finished and reused, not repeated"
    );
}
