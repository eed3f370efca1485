//! Canary secrets: the real binary at debug log level, driven through successes, upstream
//! failures and bad inputs, never shows an upstream key, a client key, or either's SHA-256 —
//! not in logs, not in responses, not in headers.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use imagegate::auth::key_digest_hex;
use imagegate::mock_upstream::{MockOptions, MockUpstream};
use serde_json::json;

use crate::helpers::{MODEL, http_client, random_hex};

const BIN: &str = env!("CARGO_BIN_EXE_imagegate");

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
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("imagegate.toml");
    std::fs::write(
        &config_path,
        format!(
            r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
[storage]
backend = "memory"
[log]
format = "json"
level = "debug"
prompts = "off"
[[upstreams]]
name = "primary"
base_url = "{base}"
  [[upstreams.keys]]
  id = "canary-key"
  env = "CANARY_UPSTREAM_KEY"
[[models]]
name = "{MODEL}"
[[clients]]
id = "canary-client"
key_sha256 = "{digest}"
"#,
            base = mock.base_url(),
            digest = key_digest_hex(&client_key),
        ),
    )
    .unwrap();

    let mut child = Command::new(BIN)
        .arg("serve")
        .arg("--config")
        .arg(&config_path)
        .env_clear()
        .env("CANARY_UPSTREAM_KEY", &upstream_key)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    // Collect stdout (the logs) on a thread, and learn the bound port from the start-up line.
    let logs = Arc::new(Mutex::new(String::new()));
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    let sink = Arc::clone(&logs);
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                && v["message"] == "imagegate listening"
            {
                let _ = addr_tx.send(v["public"].as_str().unwrap_or_default().to_owned());
            }
            let mut all = sink.lock().unwrap();
            all.push_str(&line);
            all.push('\n');
        }
    });
    let public = addr_rx
        .recv_timeout(Duration::from_secs(20))
        .expect("gateway starts and logs its address");
    let base = format!("http://{public}");
    let http = http_client();

    let mut seen = String::new();
    let record = |response: reqwest::Response| async move {
        let mut text = format!("{:?}\n", response.headers());
        text.push_str(&response.text().await.unwrap_or_default());
        text
    };
    let generate = |body: serde_json::Value, key: String| {
        http.post(format!("{base}/v1/images/generations"))
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
            json!({"model": MODEL, "prompt": format!("[mock:status=401] {canary_prompt}")}),
            502,
        ),
        (
            json!({"model": MODEL, "prompt": format!("[mock:status=500] {canary_prompt}")}),
            502,
        ),
        (
            json!({"model": MODEL, "prompt": format!("[mock:bad_json] {canary_prompt}")}),
            502,
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
        .get(format!("{base}/v1/models"))
        .bearer_auth(&client_key)
        .send()
        .await
        .unwrap();
    seen.push_str(&record(models).await);

    // Graceful stop, so every log line is flushed.
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let status = child.wait().unwrap();
    assert!(
        status.success(),
        "gateway exits cleanly on SIGTERM: {status}"
    );
    reader.join().unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let logs = logs.lock().unwrap().clone();

    assert!(
        logs.contains("\"status\":502"),
        "the logs cover the failures"
    );
    assert!(
        logs.contains("canary-key"),
        "the upstream key is identified by its id"
    );
    assert_eq!(
        mock.calls_for_key(&upstream_key),
        5,
        "the mock saw the server-held key"
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
