//! SIGHUP reloads clients, keys, models and limits without a restart or dropped requests, and
//! without resetting what protects the upstream (key pools) or the usage ledger.

use std::net::SocketAddr;
use std::time::Duration;

use imagegate::auth::key_digest_hex;
use imagegate::config::ClientConfig;
use imagegate::mock_upstream::{Fault, MockOptions, MockUpstream};
use serde_json::json;

use crate::helpers::{
    MODEL, UPSTREAM_KEY_VAR, base_config, body, error_body, http_client, random_hex, spawn_app,
    spawn_app_with, wait_until,
};
use crate::process::{ConfigFile, GatewayProcess};

/// The gateway's config with `clients` (id, key) as its only clients.
fn config_text(base_url: &str, clients: &[(&str, &str)]) -> String {
    let mut config = base_config(base_url, "unused", "unused");
    config.clients = clients
        .iter()
        .map(|(id, key)| ClientConfig::new(id, &key_digest_hex(key)))
        .collect();
    config.to_toml()
}

fn reloaded(v: &serde_json::Value) -> bool {
    v["message"] == "config reloaded"
}

#[tokio::test]
async fn sighup_adds_clients_revokes_keys_and_keeps_the_old_config_when_the_file_is_invalid() {
    let mock = MockUpstream::start(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        MockOptions::default(),
    )
    .await
    .unwrap();
    let base = mock.base_url();
    let key_a = format!("sk-a-{}", random_hex(8));
    let key_b = format!("sk-b-{}", random_hex(8));
    let config = ConfigFile::new(&config_text(&base, &[("team-a", &key_a)]));
    let gateway = GatewayProcess::start(&config.path, &[(UPSTREAM_KEY_VAR, "sk-upstream")]);
    let http = http_client();
    let generate = |key: &str, prompt: &str| {
        http.post(gateway.url("/v1/images/generations"))
            .bearer_auth(key)
            .json(&json!({"model": MODEL, "prompt": prompt}))
            .send()
    };
    assert_eq!(generate(&key_a, "a").await.unwrap().status(), 200);
    assert_eq!(generate(&key_b, "b").await.unwrap().status(), 401);

    // A slow request in flight across the reload finishes normally.
    let in_flight = tokio::spawn(generate(&key_a, "[mock:latency_ms=1500] slow").into_future());

    // Add team-b.
    config.write(&config_text(
        &base,
        &[("team-a", &key_a), ("team-b", &key_b)],
    ));
    let mark = gateway.log_len();
    gateway.signal("HUP");
    gateway
        .wait_for_log_after(mark, reloaded, Duration::from_secs(10))
        .expect("reload logged");
    assert_eq!(
        generate(&key_b, "b").await.unwrap().status(),
        200,
        "new client accepted"
    );

    // Revoke team-a's key (rotate it to a new one).
    let key_a2 = format!("sk-a2-{}", random_hex(8));
    config.write(&config_text(
        &base,
        &[("team-a", &key_a2), ("team-b", &key_b)],
    ));
    let mark = gateway.log_len();
    gateway.signal("HUP");
    gateway
        .wait_for_log_after(mark, reloaded, Duration::from_secs(10))
        .expect("reload logged");
    assert_eq!(
        generate(&key_a, "a").await.unwrap().status(),
        401,
        "revoked key refused at once"
    );
    assert_eq!(
        generate(&key_a2, "a").await.unwrap().status(),
        200,
        "rotated key accepted"
    );

    // An invalid file keeps the running config and says why.
    config.write("[server]\nlisten = 5\n");
    let mark = gateway.log_len();
    gateway.signal("HUP");
    let failure = gateway
        .wait_for_log_after(
            mark,
            |v| {
                v["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("reload failed"))
            },
            Duration::from_secs(10),
        )
        .expect("failed reload logged");
    assert!(
        failure["error"].as_str().unwrap().contains("server.listen"),
        "{failure}"
    );
    assert_eq!(
        generate(&key_b, "b").await.unwrap().status(),
        200,
        "old config still serving"
    );

    let finished = in_flight.await.unwrap().unwrap();
    assert_eq!(
        finished.status(),
        200,
        "the request in flight during reloads completed"
    );
    let (clean, _, _) = gateway.stop();
    assert!(clean);
}

// In-process reloads below: `Gateway::reload` is what SIGHUP runs after re-reading the file.

#[tokio::test]
async fn a_key_cooling_after_a_429_stays_cooling_across_a_reload() {
    let app = spawn_app().await;
    app.mock.set_key_fault(
        &app.upstream_key,
        Some("status=429 retry_after=30".parse::<Fault>().unwrap()),
    );
    let first = app.generate(&body("cooled")).await;
    assert_eq!(first.status(), 503);
    app.mock.set_key_fault(&app.upstream_key, None);

    // Reload with the key's limits changed: its state is kept and the new limits apply.
    app.reload_with(|c| c.upstreams[0].keys[0].max_concurrent = 7);
    let view = app.admin_json("/admin/upstreams").await;
    let k1 = &view["upstreams"][0]["keys"][0];
    assert_eq!(
        (k1["state"].as_str(), k1["max_concurrent"].as_u64()),
        (Some("cooling_down"), Some(7))
    );

    let second = app.generate(&body("after the reload")).await;
    assert_eq!(second.status(), 503, "still cooling: answered at once");
    let retry_after: u64 = second.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (25..=30).contains(&retry_after),
        "the remaining cooldown, not a fresh start: {retry_after}"
    );
    assert_eq!(error_body(second).await["code"], "upstream_busy");
    assert_eq!(
        app.mock.call_count(),
        1,
        "the cooling key got no call after the reload"
    );
}

#[tokio::test]
async fn a_keys_concurrency_holds_across_a_reload() {
    let app = spawn_app_with(MockOptions::default(), |c| {
        c.upstreams[0].keys[0].max_concurrent = 1;
    })
    .await;
    let slow = {
        let (http, url, key) = (
            app.http.clone(),
            app.url("/v1/images/generations"),
            app.client_key.clone(),
        );
        tokio::spawn(async move {
            http.post(url)
                .bearer_auth(key)
                .json(&body("[mock:latency_ms=1000] slow"))
                .send()
                .await
                .unwrap()
                .status()
        })
    };
    wait_until(
        "the slow call reaches the upstream",
        Duration::from_secs(10),
        || app.mock.call_count() == 1,
    )
    .await;
    app.reload_with(|_| {});
    let view = app.admin_json("/admin/upstreams").await;
    assert_eq!(
        view["upstreams"][0]["keys"][0]["in_flight"], 1,
        "the call in flight on the old config counts in the new one"
    );
    assert_eq!(app.generate(&body("fast")).await.status(), 200);
    assert_eq!(slow.await.unwrap(), 200);
    let calls = app.mock.calls();
    let gap = calls[1].at.duration_since(calls[0].at);
    assert!(
        gap >= Duration::from_millis(1000),
        "the second call waited for the first to end (max_concurrent = 1): {gap:?}"
    );
}

#[tokio::test]
async fn a_keys_rate_window_holds_across_a_reload() {
    let app = spawn_app_with(MockOptions::default(), |c| {
        c.upstreams[0].keys[0].requests_per_minute = 2;
        c.upstreams[0].queue_timeout_secs = 1;
    })
    .await;
    for i in 0..2 {
        assert_eq!(app.generate(&body(&format!("r{i}"))).await.status(), 200);
    }
    app.reload_with(|_| {});
    let third = app.generate(&body("r2")).await;
    assert_eq!(third.status(), 503, "the window still holds two sends");
    assert_eq!(error_body(third).await["code"], "upstream_busy");
    assert_eq!(app.mock.call_count(), 2);
}

#[tokio::test]
async fn a_changed_client_limit_takes_effect_and_usage_is_kept_across_a_reload() {
    let app = spawn_app_with(MockOptions::default(), |c| {
        c.clients[0].images_per_day = Some(5);
    })
    .await;
    for i in 0..2 {
        assert_eq!(app.generate(&body(&format!("a{i}"))).await.status(), 200);
    }
    for i in 0..3 {
        let response = app
            .generate_as(&app.other_client_key, &body(&format!("b{i}")))
            .await;
        assert_eq!(response.status(), 200, "team-b is not limited yet");
    }

    app.reload_with(|c| {
        c.clients[0].images_per_day = Some(3);
        c.clients[1].requests_per_minute = Some(1);
    });
    let usage = app.admin_json("/admin/usage?client=team-a").await;
    let day = &usage["clients"][0]["day"];
    assert_eq!(
        (day["used"].as_u64(), day["limit"].as_u64()),
        (Some(2), Some(3)),
        "usage from before the reload is kept; the new quota is in force"
    );
    assert_eq!(app.generate(&body("a2")).await.status(), 200);
    let over = app.generate(&body("a3")).await;
    assert_eq!(over.status(), 429);
    assert_eq!(error_body(over).await["code"], "insufficient_quota");

    assert_eq!(
        app.generate_as(&app.other_client_key, &body("b3"))
            .await
            .status(),
        200
    );
    let limited = app.generate_as(&app.other_client_key, &body("b4")).await;
    assert_eq!(
        limited.status(),
        429,
        "the new requests_per_minute = 1 applies"
    );
    assert_eq!(limited.headers()["x-ratelimit-limit-requests"], "1");
    assert_eq!(error_body(limited).await["code"], "rate_limit_exceeded");
    assert_eq!(app.mock.call_count(), 2 + 3 + 1 + 1);
}
