//! Upstream key pools through HTTP: cooldown, disabled keys, failover, retries within bounds,
//! exact per-key admission, a fair queue, and immediate answers when nothing is usable.

use std::time::{Duration, Instant};

use futures_util::future::join_all;
use imagegate::config::{Config, UpstreamConfig, UpstreamKeyConfig};
use imagegate::mock_upstream::{Fault, MockOptions};
use serde_json::{Value, json};

use crate::helpers::{
    MODEL, TestApp, UPSTREAM_KEY_2_VAR, UPSTREAM_KEY_VAR, body, error_body, random_hex,
    spawn_app_with, wait_until,
};

fn prompts(prefix: &str, count: usize) -> Vec<Value> {
    let tag = random_hex(4);
    (0..count)
        .map(|i| body(&format!("{prefix} {tag} {i}")))
        .collect()
}

/// Adds a second key to the first upstream.
fn two_keys(c: &mut Config) {
    let mut k2 = UpstreamKeyConfig::from_env("k2", UPSTREAM_KEY_2_VAR);
    k2.requests_per_minute = 10_000;
    k2.max_concurrent = 1_000;
    c.upstreams[0].keys.push(k2);
}

async fn cooling_key_gets_no_call_during_its_cooldown(fault: &str) {
    let app = spawn_app_with(MockOptions::default(), two_keys).await;
    app.mock
        .set_key_fault(&app.upstream_key_2, Some(fault.parse::<Fault>().unwrap()));
    let bodies = prompts("cooldown", 20);
    for b in &bodies {
        let response = app.generate(b).await;
        assert_eq!(
            response.status(),
            200,
            "the client never sees the key's 429"
        );
    }
    let calls = app.mock.calls();
    let cooling: Vec<_> = calls
        .iter()
        .filter(|c| c.key == app.upstream_key_2)
        .collect();
    assert_eq!(
        cooling.len(),
        1,
        "after its 429 the key got no call during the 30 s cooldown"
    );
    assert_eq!(cooling[0].status, 429);
    let first_429 = cooling[0].at;
    let healthy_after = calls
        .iter()
        .filter(|c| c.key == app.upstream_key && c.at > first_429)
        .count();
    assert!(healthy_after >= 19, "traffic moved to the other key");
    let view = app.admin_json("/admin/upstreams").await;
    let k2 = &view["upstreams"][0]["keys"][1];
    assert_eq!(k2["state"], "cooling_down");
    let until = k2["until_unix"].as_u64().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        (now + 25..=now + 31).contains(&until),
        "cooling until {until}, now {now}"
    );
}

#[tokio::test]
async fn a_key_answering_429_cools_down_for_retry_after_seconds_and_the_other_key_serves() {
    cooling_key_gets_no_call_during_its_cooldown("status=429 retry_after=30").await;
}

#[tokio::test]
async fn a_retry_after_given_as_an_http_date_is_honoured_too() {
    cooling_key_gets_no_call_during_its_cooldown("status=429 retry_after_date=30").await;
}

#[tokio::test]
async fn a_key_answering_401_is_disabled_and_shown_as_disabled_while_traffic_continues() {
    let app = spawn_app_with(MockOptions::default(), two_keys).await;
    app.mock.set_key_fault(
        &app.upstream_key,
        Some("status=401".parse::<Fault>().unwrap()),
    );
    for b in &prompts("disabled", 10) {
        assert_eq!(app.generate(b).await.status(), 200);
    }
    assert_eq!(
        app.mock.calls_for_key(&app.upstream_key),
        1,
        "a disabled key is not tried again"
    );
    let view = app.admin_json("/admin/upstreams").await;
    let k1 = &view["upstreams"][0]["keys"][0];
    assert_eq!(
        (k1["id"].as_str(), k1["state"].as_str()),
        (Some("k1"), Some("disabled"))
    );
    assert_eq!(k1["disabled_status"], 401);
    let ready = app.http.get(app.admin_url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200, "one usable key is enough to be ready");
}

#[tokio::test]
async fn when_the_first_upstream_fails_requests_fail_over_and_retries_stay_bounded() {
    let app = spawn_app_with(MockOptions::default(), |c| {
        let mut secondary = UpstreamConfig::new("secondary", &c.upstreams[0].base_url);
        secondary.timeout_secs = 10;
        secondary
            .keys
            .push(UpstreamKeyConfig::from_env("s1", UPSTREAM_KEY_2_VAR));
        c.upstreams.push(secondary);
        c.upstreams[0].max_retries = 2;
        c.models[0].upstreams = vec!["primary".into(), "secondary".into()];
    })
    .await;
    app.mock.set_key_fault(
        &app.upstream_key,
        Some("status=500".parse::<Fault>().unwrap()),
    );
    let started = Instant::now();
    for b in &prompts("failover", 20) {
        assert_eq!(
            app.generate(b).await.status(),
            200,
            "the client never sees the failing upstream"
        );
    }
    let primary = app.mock.calls_for_key(&app.upstream_key);
    let secondary = app.mock.calls_for_key(&app.upstream_key_2);
    println!(
        "failover: 20 requests → {primary} calls to the failing primary, {secondary} to the secondary, {:?}",
        started.elapsed()
    );
    assert_eq!(secondary, 20);
    assert_eq!(
        primary, 5,
        "the primary key's circuit opened after 5 consecutive failures"
    );
    let view = app.admin_json("/admin/upstreams").await;
    assert_eq!(view["upstreams"][0]["keys"][0]["state"], "circuit_open");
}

#[tokio::test]
async fn during_an_outage_retries_stay_within_max_retries_and_stop_multiplying_load() {
    let app = spawn_app_with(MockOptions::default(), |c| {
        two_keys(c);
        c.upstreams[0].max_retries = 2;
    })
    .await;
    for key in [&app.upstream_key, &app.upstream_key_2] {
        app.mock
            .set_key_fault(key, Some("status=503".parse::<Fault>().unwrap()));
    }
    let mut statuses = Vec::new();
    for b in &prompts("outage", 30) {
        let calls_before = app.mock.call_count();
        statuses.push(app.generate(b).await.status().as_u16());
        assert!(
            app.mock.call_count() - calls_before <= 3,
            "at most 1 + max_retries calls per request"
        );
    }
    let calls = app.mock.call_count();
    println!("outage: 30 requests → {calls} upstream calls; statuses {statuses:?}");
    assert!(
        calls <= 10,
        "circuits (5 failures per key) stop the outage from multiplying load: {calls}"
    );
    assert!(statuses.iter().all(|s| *s == 502 || *s == 503));
}

#[tokio::test]
async fn during_an_outage_the_retry_budget_bounds_retries_where_circuits_and_max_retries_do_not() {
    const KEYS: usize = 40;
    const REQUESTS: usize = 40;
    const MAX_RETRIES: usize = 5;
    let app = spawn_app_with(MockOptions::default(), |c| {
        // 40 keys (one secret, so one mock fault fails them all): spread round-robin, no key
        // reaches the 5 consecutive failures that open its circuit, so circuits bound nothing.
        c.upstreams[0].keys = (0..KEYS)
            .map(|i| {
                let mut k = UpstreamKeyConfig::from_env(&format!("k{i}"), UPSTREAM_KEY_VAR);
                k.requests_per_minute = 10_000;
                k.max_concurrent = 1_000;
                k
            })
            .collect();
        c.upstreams[0].max_retries = MAX_RETRIES as u32;
    })
    .await;
    app.mock.set_key_fault(
        &app.upstream_key,
        Some("status=503".parse::<Fault>().unwrap()),
    );
    let started = Instant::now();
    for b in &prompts("budget", REQUESTS) {
        let response = app.generate(b).await;
        assert_eq!(response.status(), 502);
        assert_eq!(error_body(response).await["code"], "upstream_error");
    }
    let calls = app.mock.call_count();
    // The budget: a reserve of 10 retries, plus 0.2 of a retry per request.
    let budget = 10 + REQUESTS / 5;
    println!(
        "retry budget: {REQUESTS} requests in an outage → {calls} upstream calls ({} retries; \
         max_retries alone would allow {}), {:?}",
        calls - REQUESTS,
        REQUESTS * (1 + MAX_RETRIES),
        started.elapsed()
    );
    assert_eq!(
        calls,
        REQUESTS + budget,
        "every request is tried once; retries stop when the budget is spent"
    );
    let view = app.admin_json("/admin/upstreams").await;
    let keys = view["upstreams"][0]["keys"].as_array().unwrap();
    assert!(
        keys.iter().all(|k| k["state"] == "healthy"),
        "no circuit opened: the budget alone did the bounding"
    );
}

#[tokio::test]
async fn a_key_never_receives_more_than_its_requests_per_minute_even_under_200_concurrent_requests()
{
    let app = spawn_app_with(MockOptions::default(), |c| {
        c.upstreams[0].keys[0].requests_per_minute = 30;
        c.upstreams[0].queue_timeout_secs = 2;
    })
    .await;
    let bodies = prompts("admission", 200);
    let responses = join_all(bodies.iter().map(|b| app.generate(b))).await;
    let ok = responses.iter().filter(|r| r.status() == 200).count();
    let busy = responses.iter().filter(|r| r.status() == 503).count();
    assert_eq!((ok, busy), (30, 170));
    let calls = app.mock.calls();
    assert_eq!(calls.len(), 30);
    let span = calls.last().unwrap().at.duration_since(calls[0].at);
    assert!(
        span < Duration::from_secs(60),
        "all 30 within one minute: {span:?}"
    );
    for r in responses.into_iter().filter(|r| r.status() == 503) {
        assert!(r.headers().contains_key("retry-after"));
        assert_eq!(error_body(r).await["code"], "upstream_busy");
    }
}

#[tokio::test]
async fn a_flooding_client_cannot_starve_another_on_a_saturated_key() {
    let app = spawn_app_with(
        MockOptions {
            latency: Duration::from_millis(100),
            ..MockOptions::default()
        },
        |c| {
            c.upstreams[0].keys[0].max_concurrent = 2;
            c.upstreams[0].queue_timeout_secs = 120;
        },
    )
    .await;
    let flood_bodies = prompts("flood", 100);
    let flood = {
        let app: &TestApp = &app;
        join_all(flood_bodies.iter().map(|b| app.generate(b)))
    };
    let other = async {
        // Start once the flood has filled the queue (98 at most wait behind 2 slots).
        wait_until("the flood fills the queue", Duration::from_secs(20), || {
            app.state.runtime().upstreams.status()[0].queue_depth >= 80
        })
        .await;
        let backlog = app.state.runtime().upstreams.status()[0].queue_depth;
        let mut waits = Vec::new();
        for b in &prompts("patient", 10) {
            let started = Instant::now();
            let response = app.generate_as(&app.other_client_key, b).await;
            assert_eq!(response.status(), 200);
            waits.push(started.elapsed());
        }
        (backlog, waits)
    };
    let (flooded, (backlog, waits)) = tokio::join!(flood, other);
    assert!(flooded.iter().all(|r| r.status() == 200));
    let worst = waits.iter().max().unwrap();
    let mean = waits.iter().sum::<Duration>() / waits.len() as u32;
    println!(
        "fairness: client B's 10 sequential requests behind A's backlog of {backlog} queued (~{:.1} s deep on a 2-slot key, 100 ms upstream): waits {waits:?}, mean {mean:?}, worst {worst:?}",
        backlog as f64 * 0.05
    );
    // A's backlog is ~5 s deep; B is served within a turn or two of the 100 ms upstream.
    assert!(*worst < Duration::from_millis(800), "B waited {worst:?}");
}

#[tokio::test]
async fn a_full_queue_answers_503_with_retry_after_at_once() {
    let app = spawn_app_with(
        MockOptions {
            latency: Duration::from_secs(1),
            ..MockOptions::default()
        },
        |c| {
            c.upstreams[0].keys[0].max_concurrent = 1;
            c.upstreams[0].max_queue = 5;
        },
    )
    .await;
    let bodies = prompts("queue", 20);
    let started = Instant::now();
    let timed: Vec<_> = join_all(bodies.iter().map(|b| async {
        let response = app.generate(b).await;
        let status = response.status().as_u16();
        let elapsed = started.elapsed();
        let retry_after = response.headers().get("retry-after").is_some();
        let code = if status == 200 {
            None
        } else {
            error_body(response).await["code"]
                .as_str()
                .map(str::to_owned)
        };
        (status, elapsed, retry_after, code)
    }))
    .await;
    let ok = timed.iter().filter(|t| t.0 == 200).count();
    let refused: Vec<_> = timed.iter().filter(|t| t.0 == 503).collect();
    assert_eq!(
        (ok, refused.len()),
        (6, 14),
        "one in flight and five queued are served"
    );
    let slowest_refusal = refused.iter().map(|t| t.1).max().unwrap();
    println!("queue bound: 14 refusals, slowest after {slowest_refusal:?}");
    assert!(slowest_refusal < Duration::from_millis(500));
    assert!(
        refused.iter().all(|t| t.2),
        "every refusal carries Retry-After"
    );
    assert!(
        refused
            .iter()
            .all(|t| t.3.as_deref() == Some("upstream_busy")),
        "{refused:?}"
    );
}

#[tokio::test]
async fn with_every_key_disabled_the_answer_is_immediate() {
    let app = spawn_app_with(MockOptions::default(), |_| {}).await;
    app.mock.set_key_fault(
        &app.upstream_key,
        Some("status=403".parse::<Fault>().unwrap()),
    );
    assert_eq!(app.generate(&body("first")).await.status(), 503);
    let started = Instant::now();
    let response = app
        .generate(&json!({"model": MODEL, "prompt": "second"}))
        .await;
    assert!(
        started.elapsed() < Duration::from_millis(200),
        "no hang: {:?}",
        started.elapsed()
    );
    assert_eq!(response.status(), 503);
    assert_eq!(error_body(response).await["code"], "upstream_unavailable");
    assert_eq!(
        app.mock.call_count(),
        1,
        "the disabled key was not tried again"
    );
    let ready = app.http.get(app.admin_url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503, "not ready without a usable key");
}

#[tokio::test]
async fn keys_that_keep_answering_429_cannot_make_a_request_cycle_until_its_deadline() {
    // Each 429 takes longer than the cooldown it asks for, so by the time one key has answered
    // the other is usable again: without a bound on moves the request would go round and
    // round until the request timeout.
    let app = spawn_app_with(MockOptions::default(), two_keys).await;
    let started = Instant::now();
    let response = app
        .generate(&body(
            "[mock:latency_ms=1100 status=429 retry_after=1] always limited",
        ))
        .await;
    let took = started.elapsed();
    assert_eq!(response.status(), 503);
    assert_eq!(error_body(response).await["code"], "upstream_busy");
    let calls = app.mock.call_count();
    assert!(
        (2..=4).contains(&calls),
        "moves are bounded by twice the keys: {calls} calls in {took:?}"
    );
    assert!(took < Duration::from_secs(8), "gave up in {took:?}");
}

/// The ALPN protocols in the first TLS ClientHello that reaches `listener`.
fn offered_alpn(listener: std::net::TcpListener) -> Vec<Vec<u8>> {
    let (mut stream, _) = listener.accept().unwrap();
    let mut acceptor = rustls::server::Acceptor::default();
    loop {
        acceptor.read_tls(&mut stream).unwrap();
        if let Some(accepted) = acceptor.accept().map_err(|(e, _)| e).unwrap() {
            return accepted
                .client_hello()
                .alpn()
                .map(|protocols| protocols.map(<[u8]>::to_vec).collect())
                .unwrap_or_default();
        }
    }
}

#[tokio::test]
async fn an_https_upstream_is_offered_http1_only_so_concurrency_is_not_capped_by_h2_streams() {
    // Over h2, hyper's pool keeps one connection per host and queues requests past the
    // provider's stream limit inside the client; over HTTP/1.1 each request in flight gets a
    // connection. The ClientHello says which the gateway asked for.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let hello = std::thread::spawn(move || offered_alpn(listener));
    let app = spawn_app_with(MockOptions::default(), |c| {
        c.upstreams[0].base_url = format!("https://{addr}/v1");
        c.upstreams[0].max_retries = 0;
    })
    .await;
    let response = app.generate(&body("over tls")).await;
    // The listener drops the connection after the hello: the gateway answers a 5xx of its own.
    assert!(response.status().is_server_error(), "{}", response.status());
    let alpn = tokio::task::spawn_blocking(move || hello.join().unwrap())
        .await
        .unwrap();
    assert_eq!(alpn, vec![b"http/1.1".to_vec()]);
}
