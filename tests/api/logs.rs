//! The per-request log line (SPEC §8) of the real binary, and `log.prompts`: `off` keeps a
//! canary prompt out of every log line, `hash` logs only its hash, `full` the prompt itself —
//! across successes, cache hits, upstream failures and refusals, at debug level.

use std::net::SocketAddr;

use imagegate::config::PromptLogging;
use imagegate::mock_upstream::{MockOptions, MockUpstream};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::helpers::{MODEL, UPSTREAM_KEY_VAR, base_config, http_client, random_hex};
use crate::process::{ConfigFile, GatewayProcess};

struct Run {
    canary: String,
    lines: Vec<Value>,
    raw: String,
}

/// Runs the binary with `policy`, sends a success (twice: miss then hit), an upstream failure,
/// a validation failure and an unauthenticated request, all carrying the canary prompt; stops
/// it gracefully so every line is flushed.
async fn run_with(policy: PromptLogging) -> Run {
    let mock = MockUpstream::start(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        MockOptions::default(),
    )
    .await
    .unwrap();
    let canary = format!("canary prompt {}", random_hex(8));
    let client_key = format!("sk-client-{}", random_hex(12));
    let mut config = base_config(&mock.base_url(), &client_key, "sk-unused");
    config.log.level = "debug".to_owned();
    config.log.prompts = policy;
    let config = ConfigFile::from_config(&config);
    let upstream_key = format!("sk-upstream-{}", random_hex(12));
    let gateway = GatewayProcess::start(&config.path, &[(UPSTREAM_KEY_VAR, upstream_key.as_str())]);
    let http = http_client();
    let send = |body: Value, key: &str| {
        http.post(gateway.url("/v1/images/generations"))
            .bearer_auth(key)
            .json(&body)
            .send()
    };
    let cases = [
        (json!({"model": MODEL, "prompt": canary}), 200),
        (json!({"model": MODEL, "prompt": canary}), 200),
        (
            json!({"model": MODEL, "prompt": format!("[mock:status=500] {canary}")}),
            502,
        ),
        (
            json!({"model": MODEL, "prompt": canary, "size": "7x7"}),
            400,
        ),
    ];
    for (body, status) in cases {
        assert_eq!(send(body, &client_key).await.unwrap().status(), status);
    }
    let anonymous = send(json!({"model": MODEL, "prompt": canary}), "sk-nobody")
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);

    let (clean, raw, stderr) = gateway.stop();
    assert!(clean, "gateway exits cleanly");
    let lines: Vec<Value> = raw
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("a log line is JSON: {l}")))
        .collect();
    Run {
        canary,
        lines,
        raw: format!("{raw}\n{stderr}"),
    }
}

impl Run {
    fn requests(&self) -> Vec<&Value> {
        self.lines
            .iter()
            .filter(|l| l["target"] == "imagegate::request")
            .collect()
    }

    fn generations(&self, status: u64) -> Vec<&Value> {
        self.requests()
            .into_iter()
            .filter(|l| l["route"] == "/v1/images/generations" && l["status"] == status)
            .collect()
    }
}

fn hash_of(prompt: &str) -> String {
    format!(
        "sha256:{}",
        &hex::encode(Sha256::digest(prompt.as_bytes()))[..16]
    )
}

#[tokio::test]
async fn each_request_has_one_line_with_the_spec_fields() {
    let run = run_with(PromptLogging::Off).await;
    assert_eq!(run.requests().len(), 5, "one line per request");
    let ok = run.generations(200);
    assert_eq!(ok.len(), 2);
    for line in &ok {
        for field in [
            "request_id",
            "client",
            "model",
            "route",
            "status",
            "latency_ms",
            "upstream",
            "upstream_key",
            "cache",
            "images",
        ] {
            assert!(!line[field].is_null(), "`{field}` missing from {line}");
        }
        assert_eq!(line["client"], "team-a");
        assert_eq!(line["upstream"], "primary");
        assert_eq!(line["upstream_key"], "k1");
        assert_eq!(line["images"], 1);
    }
    assert_eq!(ok[0]["cache"], "miss");
    assert_eq!(ok[1]["cache"], "hit");
    let failed = run.generations(502);
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0]["error_kind"], "upstream_error");
    let refused = run.generations(401);
    assert_eq!(refused.len(), 1);
    assert!(refused[0]["client"].is_null(), "no client before auth");
    assert!(refused[0]["error_kind"].is_string());
}

#[tokio::test]
async fn with_prompts_off_a_canary_prompt_appears_nowhere_in_the_logs() {
    let run = run_with(PromptLogging::Off).await;
    assert!(
        !run.raw.contains(&run.canary),
        "the canary prompt was logged"
    );
    let canary_word = run.canary.rsplit(' ').next().unwrap();
    assert!(
        !run.raw.contains(canary_word),
        "part of the canary was logged"
    );
    assert!(!run.raw.contains(&hash_of(&run.canary)[7..]));
    assert!(run.requests().iter().all(|l| l.get("prompt").is_none()));
}

#[tokio::test]
async fn with_prompts_hash_only_the_hash_of_the_canary_is_logged() {
    let run = run_with(PromptLogging::Hash).await;
    let canary_word = run.canary.rsplit(' ').next().unwrap();
    assert!(
        !run.raw.contains(canary_word),
        "the canary prompt was logged"
    );
    let hash = hash_of(&run.canary);
    let ok = run.generations(200);
    assert_eq!(ok.len(), 2);
    for line in ok {
        assert_eq!(line["prompt"], hash.as_str());
    }
    let failed = run.generations(502);
    assert_eq!(
        failed[0]["prompt"],
        hash_of(&format!("[mock:status=500] {}", run.canary)).as_str()
    );
}

#[tokio::test]
async fn with_prompts_full_the_prompt_is_in_its_request_line() {
    let run = run_with(PromptLogging::Full).await;
    for line in run.generations(200) {
        assert_eq!(line["prompt"], run.canary.as_str());
    }
    // Still only in request lines: nothing else echoes prompts.
    for line in &run.lines {
        if line["target"] != "imagegate::request" {
            assert!(!line.to_string().contains(&run.canary), "{line}");
        }
    }
}
