//! SIGHUP reloads clients, keys, models and limits without a restart or dropped requests.

use std::net::SocketAddr;
use std::time::Duration;

use imagegate::auth::key_digest_hex;
use imagegate::config::ClientConfig;
use imagegate::mock_upstream::{MockOptions, MockUpstream};
use serde_json::json;

use crate::helpers::{MODEL, UPSTREAM_KEY_VAR, base_config, http_client, random_hex};
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
