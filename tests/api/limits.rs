//! Per-client rate limits through HTTP: exact under concurrency, honest Retry-After, nothing
//! consumed or sent upstream by a rejected request.

use std::time::Duration;

use futures_util::future::join_all;
use imagegate::mock_upstream::MockOptions;
use serde_json::json;

use crate::helpers::{MODEL, body, error_body, spawn_app_with};

#[tokio::test]
async fn requests_per_minute_holds_exactly_under_concurrency_and_retry_after_is_honest() {
    let app = spawn_app_with(MockOptions::default(), |c| {
        c.clients[0].requests_per_minute = Some(10);
        // Distinct prompts below, so the cache plays no part.
    })
    .await;
    let bodies: Vec<_> = (0..50).map(|i| body(&format!("rate {i}"))).collect();
    let responses = join_all(bodies.iter().map(|b| app.generate(b))).await;
    let ok = responses.iter().filter(|r| r.status() == 200).count();
    let limited: Vec<_> = responses
        .into_iter()
        .filter(|r| r.status() == 429)
        .collect();
    assert_eq!((ok, limited.len()), (10, 40), "exactly the limit passes");
    assert_eq!(
        app.mock.call_count(),
        10,
        "rejected requests never reach the upstream"
    );

    let mut longest = 0;
    for response in limited {
        let headers = response.headers().clone();
        let secs: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
        let ms: u64 = headers["retry-after-ms"].to_str().unwrap().parse().unwrap();
        assert!(
            secs >= 1 && ms <= secs * 1000,
            "retry-after {secs} s / {ms} ms"
        );
        assert_eq!(headers["x-ratelimit-limit-requests"], "10");
        assert_eq!(headers["x-ratelimit-remaining-requests"], "0");
        assert!(headers.contains_key("x-ratelimit-reset-requests"));
        assert!(headers.contains_key("x-ratelimit-limit-images"));
        let error = error_body(response).await;
        assert_eq!(
            (error["type"].as_str(), error["code"].as_str()),
            (Some("requests"), Some("rate_limit_exceeded"))
        );
        longest = longest.max(ms);
    }

    // Another client is unaffected.
    let other = app
        .generate_as(&app.other_client_key, &body("other client"))
        .await;
    assert_eq!(other.status(), 200);

    // Waiting as long as Retry-After said is enough (the value is not premature).
    let last = app.generate(&body("one more")).await;
    assert_eq!(last.status(), 429);
    let wait: u64 = last.headers()["retry-after-ms"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(wait <= longest + 50);
    tokio::time::sleep(Duration::from_millis(wait)).await;
    let retried = app.generate(&body("one more")).await;
    assert_eq!(retried.status(), 200, "retrying after Retry-After succeeds");
}

/// `retry-after-ms` and `Retry-After` of a 429, checked to agree (seconds rounded up).
fn advertised_wait(response: &reqwest::Response) -> Duration {
    assert_eq!(response.status(), 429);
    let header =
        |name: &str| -> u64 { response.headers()[name].to_str().unwrap().parse().unwrap() };
    let (secs, ms) = (header("retry-after"), header("retry-after-ms"));
    assert_eq!(
        secs,
        ms.div_ceil(1000),
        "Retry-After is retry-after-ms rounded up"
    );
    Duration::from_millis(ms)
}

#[tokio::test]
async fn retry_after_is_not_inflated_a_retry_a_second_early_is_still_refused() {
    // 60 images a minute: one image conforms every second, so a request of n = 4 after the
    // burst waits at most 4 s, and exactly until its fourth image's second has come.
    let app = spawn_app_with(MockOptions::default(), |c| {
        c.clients[0].images_per_minute = Some(60);
    })
    .await;
    let n4 = |i: usize| json!({"model": MODEL, "prompt": format!("burst {i}"), "n": 4});
    let bodies: Vec<_> = (0..15).map(n4).collect();
    let burst = join_all(bodies.iter().map(|b| app.generate(b))).await;
    assert!(
        burst.iter().all(|r| r.status() == 200),
        "15 × 4 = the burst of 60"
    );

    let refused = app.generate(&n4(15)).await;
    let wait = advertised_wait(&refused);
    assert!(
        wait <= Duration::from_secs(4),
        "never more than four emission intervals: {wait:?}"
    );
    assert!(
        wait > Duration::from_millis(1500),
        "the burst took too long for this test to say anything: {wait:?}"
    );

    // One second before the advertised time the request still does not conform, and the new
    // advertised wait is the old one less the time slept (an inflated value fails both).
    let early = wait - Duration::from_secs(1);
    tokio::time::sleep(early).await;
    let still = app.generate(&n4(15)).await;
    let rest = advertised_wait(&still);
    let expected = wait - early;
    assert!(
        rest <= expected && expected - rest < Duration::from_millis(250),
        "advertised {wait:?}, slept {early:?}, now advertised {rest:?}"
    );

    tokio::time::sleep(rest).await;
    assert_eq!(
        app.generate(&n4(15)).await.status(),
        200,
        "on time, it passes"
    );
    assert_eq!(
        app.mock.call_count(),
        16,
        "refused requests never reached the upstream"
    );
}

#[tokio::test]
async fn images_per_minute_counts_n_and_a_request_above_the_burst_is_a_400() {
    let app = spawn_app_with(MockOptions::default(), |c| {
        c.clients[0].images_per_minute = Some(10)
    })
    .await;
    let too_big = app
        .generate(&json!({"model": MODEL, "prompt": "x", "n": 4}))
        .await;
    assert_eq!(too_big.status(), 200);
    let second = app
        .generate(&json!({"model": MODEL, "prompt": "y", "n": 4}))
        .await;
    assert_eq!(second.status(), 200);
    assert_eq!(second.headers()["x-ratelimit-remaining-images"], "2");
    let third = app
        .generate(&json!({"model": MODEL, "prompt": "z", "n": 4}))
        .await;
    assert_eq!(third.status(), 429);
    // The rejected request consumed no request unit either.
    let remaining_before: u64 = third.headers()["x-ratelimit-remaining-requests"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let small = app
        .generate(&json!({"model": MODEL, "prompt": "w", "n": 2}))
        .await;
    assert_eq!(small.status(), 200);
    let remaining_after: u64 = small.headers()["x-ratelimit-remaining-requests"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(remaining_after, remaining_before - 1);

    let app = spawn_app_with(MockOptions::default(), |c| {
        c.clients[0].images_per_minute = Some(3);
    })
    .await;
    let impossible = app
        .generate(&json!({"model": MODEL, "prompt": "x", "n": 4}))
        .await;
    assert_eq!(
        impossible.status(),
        400,
        "n above the images burst can never pass"
    );
    let error = error_body(impossible).await;
    assert_eq!(error["param"], "n");
    assert_eq!(app.mock.call_count(), 0);
}

#[tokio::test]
async fn concurrency_beyond_max_concurrent_is_refused_and_frees_up_after() {
    let app = spawn_app_with(
        MockOptions {
            latency: Duration::from_millis(500),
            ..MockOptions::default()
        },
        |c| c.clients[0].max_concurrent = Some(2),
    )
    .await;
    let bodies: Vec<_> = (0..5).map(|i| body(&format!("slow {i}"))).collect();
    let responses = join_all(bodies.iter().map(|b| app.generate(b))).await;
    let ok = responses.iter().filter(|r| r.status() == 200).count();
    assert_eq!(ok, 2);
    assert!(
        responses
            .iter()
            .filter(|r| r.status() == 429)
            .all(|r| r.headers().contains_key("retry-after"))
    );
    assert_eq!(app.generate(&body("after")).await.status(), 200);
}
