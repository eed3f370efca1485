//! Canary secrets: the real binary at debug log level, driven through successes, upstream
//! failures and bad inputs, never shows an upstream key, a client key, or either's SHA-256 —
//! not in logs, not in responses, not in headers.

use std::net::SocketAddr;

use imagegate::auth::key_digest_hex;
use imagegate::config::PromptLogging;
use imagegate::mock_upstream::{MockOptions, MockUpstream};
use serde_json::json;

use crate::helpers::{MODEL, UPSTREAM_KEY_VAR, base_config, http_client, random_hex};
use crate::process::{ConfigFile, GatewayProcess};

#[tokio::test]
async fn canary_keys_never_appear_in_logs_responses_or_headers() {
    let mock = MockUpstream::start(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        MockOptions::default(),
    )
    .await
    .unwrap();
    let upstream_key = format!("sk-canary-upstream-{}", random_hex(12));
    let client_key = format!("sk-canary-client-{}", random_hex(12));
    let canary_prompt = format!("canary-prompt-{}", random_hex(8));
    let mut config = base_config(
        &mock.base_url(),
        &client_key,
        &format!("sk-other-{}", random_hex(8)),
    );
    config.log.level = "debug".to_owned();
    config.log.prompts = PromptLogging::Off;
    config.upstreams[0].keys[0].id = "canary-key".to_owned();
    let config = ConfigFile::from_config(&config);
    let gateway = GatewayProcess::start(&config.path, &[(UPSTREAM_KEY_VAR, upstream_key.as_str())]);
    let http = http_client();

    let mut seen = String::new();
    let record = |response: reqwest::Response| async move {
        let mut text = format!("{:?}\n", response.headers());
        text.push_str(&response.text().await.unwrap_or_default());
        text
    };
    let generate = |body: serde_json::Value, key: String| {
        http.post(gateway.url("/v1/images/generations"))
            .bearer_auth(key)
            .json(&body)
            .send()
    };
    let cases = [
        (json!({"model": MODEL, "prompt": canary_prompt}), 200),
        (
            json!({"model": MODEL, "prompt": format!("{canary_prompt} b64"), "response_format": "b64_json"}),
            200,
        ),
        (
            json!({"model": MODEL, "prompt": format!("[mock:status=500] {canary_prompt}")}),
            502,
        ),
        (
            json!({"model": MODEL, "prompt": format!("[mock:bad_json] {canary_prompt}")}),
            502,
        ),
        // The last upstream call: it disables the only key.
        (
            json!({"model": MODEL, "prompt": format!("[mock:status=401] {canary_prompt}")}),
            503,
        ),
        (
            json!({"model": MODEL, "prompt": canary_prompt, "n": 0}),
            400,
        ),
        (
            json!({"model": MODEL, "prompt": canary_prompt, "api_key": client_key}),
            400,
        ),
        (json!({"model": "nope", "prompt": canary_prompt}), 404),
    ];
    for (body, status) in cases {
        let response = generate(body, client_key.clone()).await.unwrap();
        assert_eq!(response.status().as_u16(), status);
        seen.push_str(&record(response).await);
    }
    // A near-miss key and the upstream key used as a client key are refused.
    for key in [format!("{client_key}x"), upstream_key.clone()] {
        let response = generate(json!({"model": MODEL, "prompt": "x"}), key)
            .await
            .unwrap();
        assert_eq!(response.status(), 401);
        seen.push_str(&record(response).await);
    }
    let models = http
        .get(gateway.url("/v1/models"))
        .bearer_auth(&client_key)
        .send()
        .await
        .unwrap();
    seen.push_str(&record(models).await);

    // Graceful stop, so every log line is flushed.
    let (clean, logs, stderr) = gateway.stop();
    assert!(clean, "gateway exits cleanly on SIGTERM");

    assert!(
        logs.contains("\"status\":502"),
        "the logs cover the failures"
    );
    assert!(
        logs.contains("canary-key"),
        "the upstream key is identified by its id"
    );
    assert!(mock.call_count() >= 5);
    assert_eq!(
        mock.calls_for_key(&upstream_key),
        mock.call_count(),
        "the mock saw only the server-held key"
    );
    let secrets = [
        ("upstream key", upstream_key.clone()),
        ("upstream key digest", key_digest_hex(&upstream_key)),
        ("client key", client_key.clone()),
        ("client key digest", key_digest_hex(&client_key)),
    ];
    for (what, secret) in &secrets {
        assert!(!logs.contains(secret.as_str()), "{what} found in the logs");
        assert!(!stderr.contains(secret.as_str()), "{what} found on stderr");
        assert!(
            !seen.contains(secret.as_str()),
            "{what} found in a response"
        );
    }
    assert!(
        !logs.contains(&canary_prompt),
        "log.prompts = off keeps prompts out of the logs"
    );
}
