//! `"async": true` and `GET /v1/tasks/{id}`: submit, poll, failure, ownership, bounds,
//! idempotency, expiry, native mode, and tasks surviving a graceful restart and `kill -9`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use imagegate::config::{StorageBackend, TaskMode};
use imagegate::mock_upstream::{MockOptions, MockUpstream};
use serde_json::{Value, json};

use crate::helpers::{
    MODEL, TestApp, UPSTREAM_KEY_VAR, base_config, body, error_body, http_client, random_hex,
    spawn_app, spawn_app_with,
};
use crate::process::{ConfigFile, GatewayProcess, usage_report};

fn async_body(prompt: &str) -> Value {
    let mut b = body(prompt);
    b["async"] = json!(true);
    b
}

async fn submit(app: &TestApp, body: &Value) -> reqwest::Response {
    app.generate(body).await
}

/// Submits and returns the task id, checking the 202 answer's shape.
async fn submit_ok(app: &TestApp, body: &Value) -> String {
    let response = submit(app, body).await;
    assert_eq!(response.status(), 202, "{:?}", response.text().await);
    response.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

async fn get_task(app: &TestApp, key: &str, id: &str) -> reqwest::Response {
    app.http
        .get(app.url(&format!("/v1/tasks/{id}")))
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
}

/// Polls until the task is completed or failed (every 50 ms, at most `within`).
async fn until_finished(app: &TestApp, id: &str, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let response = get_task(app, &app.client_key, id).await;
        assert_eq!(response.status(), 200);
        let task: Value = response.json().await.unwrap();
        if task["status"] == "completed" || task["status"] == "failed" {
            return task;
        }
        assert!(Instant::now() < deadline, "task {id} not finished: {task}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_submit_answers_202_and_the_task_completes_with_what_a_sync_call_gives() {
    let app = spawn_app().await;
    for format in ["b64_json", "url"] {
        let mut request = async_body(&format!("[mock:latency_ms=300] a lighthouse, {format}"));
        request["response_format"] = json!(format);
        let response = submit(&app, &request).await;
        assert_eq!(response.status(), 202);
        let location = response.headers()["location"].to_str().unwrap().to_owned();
        let accepted: Value = response.json().await.unwrap();
        let id = accepted["id"].as_str().unwrap().to_owned();
        assert_eq!(location, format!("/v1/tasks/{id}"));
        assert_eq!(accepted["object"], "image.task");
        assert_eq!(accepted["status"], "queued");
        assert_eq!(accepted["progress"], 0);
        assert!(accepted["created_at"].is_i64());
        assert!(
            id.starts_with("task_") && id.len() == "task_".len() + 32,
            "{id}"
        );

        // While pending: a polling hint and an honest status.
        let pending = get_task(&app, &app.client_key, &id).await;
        let status = pending.headers().get("retry-after").cloned();
        let pending: Value = pending.json().await.unwrap();
        if pending["status"] != "completed" {
            assert_eq!(status.unwrap(), "2");
            assert!(pending["progress"].as_u64().unwrap() < 100);
        }

        let task = until_finished(&app, &id, Duration::from_secs(10)).await;
        assert_eq!(task["status"], "completed", "{task}");
        assert_eq!(task["progress"], 100);
        assert!(
            task["created"].is_i64(),
            "ImagesResponse fields at top level"
        );
        let data = task["data"].as_array().unwrap();
        assert_eq!(data.len(), 1);

        // The same request, synchronously and forced fresh from the upstream.
        let mut sync = request.clone();
        sync.as_object_mut().unwrap().remove("async");
        let sync: Value = app
            .http
            .post(app.url("/v1/images/generations"))
            .bearer_auth(&app.client_key)
            .header("cache-control", "no-cache, no-store")
            .json(&sync)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if format == "b64_json" {
            assert_eq!(task["data"], sync["data"], "the same images as a sync call");
        } else {
            assert_eq!(
                task["data"][0]["revised_prompt"],
                sync["data"][0]["revised_prompt"]
            );
            let url = task["data"][0]["url"].as_str().unwrap();
            let png = app
                .http
                .get(url)
                .send()
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap();
            assert!(
                png.starts_with(b"\x89PNG"),
                "the task's url serves the image"
            );
        }
    }
}

#[tokio::test]
async fn a_task_is_visible_only_to_its_client_and_unknown_ids_are_404() {
    let app = spawn_app().await;
    let id = submit_ok(&app, &async_body("mine")).await;
    let task = until_finished(&app, &id, Duration::from_secs(10)).await;
    assert_eq!(task["status"], "completed");

    let foreign = get_task(&app, &app.other_client_key, &id).await;
    assert_eq!(foreign.status(), 404);
    assert_eq!(error_body(foreign).await["code"], "task_not_found");
    for unknown in [
        "task_00000000000000000000000000000000".to_owned(),
        "task_nope".to_owned(),
        format!("{id}x"),
        // Not UTF-8 once decoded: the router's own rejection was a text/plain 400.
        "%FF".to_owned(),
        "%C0%AF".to_owned(),
    ] {
        let response = get_task(&app, &app.client_key, &unknown).await;
        assert_eq!(response.status(), 404, "{unknown}");
        assert_eq!(error_body(response).await["code"], "task_not_found");
    }
    let anonymous = app
        .http
        .get(app.url(&format!("/v1/tasks/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
}

#[tokio::test]
async fn an_upstream_failure_fails_the_task_with_an_openai_error_and_refunds_its_quota() {
    let app = spawn_app_with(MockOptions::default(), |c| {
        c.client_defaults.images_per_day = 5;
    })
    .await;
    let id = submit_ok(&app, &async_body("[mock:status=500] broken")).await;
    let task = until_finished(&app, &id, Duration::from_secs(10)).await;
    assert_eq!(task["status"], "failed", "{task}");
    let error = &task["error"];
    assert_eq!(error["type"], "upstream_error");
    assert_eq!(error["code"], "upstream_error");
    for key in ["message", "type", "param", "code"] {
        assert!(error.get(key).is_some(), "{task}");
    }
    assert!(task.get("data").is_none());

    let usage = app.admin_json("/admin/usage?client=team-a").await;
    let team = &usage["clients"][0];
    assert_eq!(team["day"]["used"], 0, "{usage}");
    assert_eq!(team["day"]["reserved"], 0, "{usage}");
    assert_eq!(team["today"]["failures"], 1, "{usage}");
}

#[tokio::test]
async fn a_refused_submit_creates_no_task_and_spends_nothing() {
    let app = spawn_app_with(MockOptions::default(), |c| {
        c.client_defaults.images_per_day = 2;
    })
    .await;
    let mut bad = async_body("bad size");
    bad["size"] = json!("7x7");
    let response = submit(&app, &bad).await;
    assert_eq!(response.status(), 400);
    assert_eq!(error_body(response).await["param"], "size");
    let mut not_bool = async_body("bad flag");
    not_bool["async"] = json!("yes");
    let response = submit(&app, &not_bool).await;
    assert_eq!(response.status(), 400);
    assert_eq!(error_body(response).await["param"], "async");

    let mut two = async_body("two images");
    two["n"] = json!(2);
    let id = submit_ok(&app, &two).await;
    assert_eq!(
        until_finished(&app, &id, Duration::from_secs(10)).await["status"],
        "completed"
    );
    let refused = submit(&app, &async_body("over quota")).await;
    assert_eq!(refused.status(), 429);
    assert_eq!(refused.headers()["x-should-retry"], "false");
    assert_eq!(error_body(refused).await["code"], "insufficient_quota");

    assert_eq!(
        app.mock.call_count(),
        1,
        "only the accepted task reached the upstream"
    );
    let usage = app.admin_json("/admin/usage?client=team-a").await;
    assert_eq!(usage["clients"][0]["day"]["used"], 2);
    assert_eq!(usage["clients"][0]["day"]["reserved"], 0);

    let metrics = app
        .http
        .get(app.admin_url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "imagegate_tasks_finished_total{state=\"completed\"} 1",
        "imagegate_tasks{state=\"queued\"} 0",
        "imagegate_tasks{state=\"processing\"} 0",
        "imagegate_task_wait_seconds_count 1",
        "imagegate_task_duration_seconds_count 1",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "no `{line}` in\n{metrics}"
        );
    }
    assert!(!metrics.contains("state=\"failed\"} 1"), "nothing failed");
}

#[tokio::test]
async fn a_full_queue_answers_503_with_retry_after_and_queued_tasks_still_run() {
    let app = spawn_app_with(MockOptions::default(), |c| {
        c.tasks.workers = 1;
        c.tasks.max_queued = 2;
    })
    .await;
    let running = submit_ok(&app, &async_body("[mock:latency_ms=1000] first")).await;
    // Once the one worker has it, the queue holds exactly two more.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let task: Value = get_task(&app, &app.client_key, &running)
            .await
            .json()
            .await
            .unwrap();
        if task["status"] == "processing" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the worker never started: {task}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let queued = [
        submit_ok(&app, &async_body("second")).await,
        submit_ok(&app, &async_body("third")).await,
    ];
    let started = Instant::now();
    let full = submit(&app, &async_body("fourth")).await;
    assert_eq!(full.status(), 503);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "refused at once"
    );
    assert!(full.headers().contains_key("retry-after"));
    assert_eq!(error_body(full).await["code"], "task_queue_full");
    for id in queued.iter().chain([&running]) {
        let task = until_finished(&app, id, Duration::from_secs(15)).await;
        assert_eq!(task["status"], "completed");
    }
    assert_eq!(app.mock.call_count(), 3, "the refused submit never ran");
}

#[tokio::test]
async fn an_idempotency_key_replays_its_task_and_refuses_a_different_body() {
    let app = spawn_app().await;
    let send = |key: &'static str, prompt: &'static str| {
        app.http
            .post(app.url("/v1/images/generations"))
            .bearer_auth(&app.client_key)
            .header("idempotency-key", key)
            .json(&async_body(prompt))
            .send()
    };
    let first = send("order-42", "a kite").await.unwrap();
    assert_eq!(first.status(), 202);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let id = first.json::<Value>().await.unwrap()["id"].clone();
    let again = send("order-42", "a kite").await.unwrap();
    assert_eq!(again.status(), 202);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.json::<Value>().await.unwrap()["id"], id);

    let conflict = send("order-42", "a different kite").await.unwrap();
    assert_eq!(conflict.status(), 409);
    assert_eq!(error_body(conflict).await["code"], "idempotency_key_reused");

    let id = id.as_str().unwrap();
    until_finished(&app, id, Duration::from_secs(10)).await;
    // Replayed after completion: the finished task, not a new one.
    let done = send("order-42", "a kite").await.unwrap();
    let done: Value = done.json().await.unwrap();
    assert_eq!(
        (done["id"].as_str(), done["status"].as_str()),
        (Some(id), Some("completed"))
    );
    assert_eq!(app.mock.call_count(), 1, "one generation for every replay");
    let usage = app.admin_json("/admin/usage?client=team-a").await;
    assert_eq!(usage["clients"][0]["day"]["used"], 1);

    let bad_key = app
        .http
        .post(app.url("/v1/images/generations"))
        .bearer_auth(&app.client_key)
        .header("idempotency-key", "x".repeat(256))
        .json(&async_body("a kite"))
        .send()
        .await
        .unwrap();
    assert_eq!(bad_key.status(), 400);
    assert_eq!(error_body(bad_key).await["code"], "invalid_idempotency_key");
}

#[tokio::test]
async fn a_finished_task_expires_after_its_ttl() {
    let app = spawn_app_with(MockOptions::default(), |c| c.tasks.ttl_secs = 1).await;
    let id = submit_ok(&app, &async_body("short-lived")).await;
    let task = until_finished(&app, &id, Duration::from_secs(10)).await;
    // Served for at least the ttl: the finish's fraction of a second rounds the expiry up.
    let kept = task["expires_at"].as_i64().unwrap() - task["finished_at"].as_i64().unwrap();
    assert!(kept == 1 || kept == 2, "kept for {kept} s");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let response = get_task(&app, &app.client_key, &id).await;
        if response.status() == 404 {
            assert_eq!(error_body(response).await["code"], "task_not_found");
            break;
        }
        assert!(Instant::now() < deadline, "still served after its ttl");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn native_mode_hides_the_upstream_id_and_polls_the_upstream_from_one_place() {
    let app = spawn_app_with(MockOptions::default(), |c| {
        c.upstreams[0].tasks = TaskMode::Native;
    })
    .await;
    let mut request = async_body("[mock:latency_ms=2000] a native lighthouse");
    request["response_format"] = json!("b64_json");
    let id = submit_ok(&app, &request).await;

    // The client polls far more often than the gateway polls the upstream.
    let mut client_polls = 0;
    let mut progress_seen = Vec::new();
    let task = loop {
        let response = get_task(&app, &app.client_key, &id).await;
        let text = response.text().await.unwrap();
        client_polls += 1;
        let task: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(task["id"], id.as_str());
        assert_eq!(
            text.matches("task_").count(),
            1,
            "only imagegate's own id is shown: {text}"
        );
        if task["status"] == "completed" || task["status"] == "failed" {
            break task;
        }
        progress_seen.push(task["progress"].as_u64().unwrap());
        assert!(client_polls < 1_000, "never finished");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(task["status"], "completed", "{task}");
    assert_eq!(task["data"].as_array().unwrap().len(), 1);
    assert!(task["data"][0]["b64_json"].is_string());
    assert!(
        progress_seen.windows(2).all(|w| w[0] <= w[1]),
        "progress never goes back: {progress_seen:?}"
    );

    let calls = app.mock.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(
        calls[0].request["async"], true,
        "submitted in the upstream's async mode"
    );
    let upstream_polls = app.mock.poll_count();
    println!("native task: {client_polls} client polls, {upstream_polls} upstream polls");
    assert!(
        client_polls > 50,
        "the client really polled often ({client_polls})"
    );
    assert!(
        (1..=10).contains(&upstream_polls),
        "one central poller with backoff: {upstream_polls} upstream polls for {client_polls} client polls"
    );
    let usage = app.admin_json("/admin/usage?client=team-a").await;
    assert_eq!(usage["clients"][0]["day"]["used"], 1);
}

#[tokio::test]
async fn graceful_shutdown_leaves_queued_tasks_for_the_next_start() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("imagegate.db");
    let durable = |c: &mut imagegate::Config| {
        c.storage.backend = StorageBackend::Sqlite;
        c.storage.path = db.clone();
        c.tasks.workers = 1;
        c.server.shutdown_grace_secs = 10;
    };
    let app = spawn_app_with(MockOptions::default(), durable).await;
    let ids: Vec<String> = {
        let mut ids = Vec::new();
        for i in 0..4 {
            ids.push(submit_ok(&app, &async_body(&format!("[mock:latency_ms=500] t{i}"))).await);
        }
        ids
    };
    app.begin_shutdown();
    app.join().await.unwrap();

    let app = spawn_app_with(MockOptions::default(), durable).await;
    for id in &ids {
        let task = until_finished(&app, id, Duration::from_secs(20)).await;
        assert_eq!(task["status"], "completed", "{task}");
    }
    let usage = app.admin_json("/admin/usage?client=team-a").await;
    assert_eq!(usage["clients"][0]["day"]["used"], 4, "{usage}");
    assert_eq!(usage["clients"][0]["day"]["reserved"], 0, "{usage}");
}

#[tokio::test]
async fn tasks_survive_kill_9_and_each_resolves_after_restart() {
    let mock = MockUpstream::start(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        MockOptions::default(),
    )
    .await
    .unwrap();
    let client_key = format!("sk-{}", random_hex(12));
    let dir = tempfile::tempdir().unwrap();
    let mut config = base_config(&mock.base_url(), &client_key, "unused");
    config.storage.backend = StorageBackend::Sqlite;
    config.storage.path = dir.path().join("imagegate.db");
    config.cache.enabled = false;
    config.tasks.workers = 4;
    let config = ConfigFile::from_config(&config);
    let env = [(UPSTREAM_KEY_VAR, "sk-upstream")];
    let http = http_client();

    let gateway = GatewayProcess::start(&config.path, &env);
    let mut ids = Vec::new();
    for i in 0..20 {
        let response = http
            .post(gateway.url("/v1/images/generations"))
            .bearer_auth(&client_key)
            .json(
                &json!({"model": MODEL, "prompt": format!("[mock:latency_ms=1500] t{i}"),
                "async": true}),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202);
        ids.push(
            response.json::<Value>().await.unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    // Die with some tasks processing (upstream calls in flight) and the rest queued.
    let deadline = Instant::now() + Duration::from_secs(10);
    while mock.call_count() < 4 {
        assert!(Instant::now() < deadline, "no task reached the upstream");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    gateway.kill9();

    let gateway = GatewayProcess::start(&config.path, &env);
    let started = Instant::now();
    // One task at a time, a few polls a second: well inside the poll limit.
    for id in &ids {
        loop {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "task {id} never resolved"
            );
            let task: Value = http
                .get(gateway.url(&format!("/v1/tasks/{id}")))
                .bearer_auth(&client_key)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            match task["status"].as_str() {
                Some("completed") => {
                    assert_eq!(task["data"].as_array().unwrap().len(), 1);
                    break;
                }
                Some("failed") => panic!("no task should fail here: {task}"),
                Some("queued" | "processing") => {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                _ => panic!("a task was lost: {task}"),
            }
        }
    }
    let resolved_in = started.elapsed();
    println!(
        "kill -9: 20 tasks resolved {:.1} s after restart; upstream calls {}",
        resolved_in.as_secs_f64(),
        mock.call_count()
    );
    let (clean, logs, _) = gateway.stop();
    assert!(clean, "{logs}");
    assert!(
        logs.contains("resumed async tasks left by the previous run"),
        "{logs}"
    );
    // Each task is charged once, whatever the upstream was asked across the crash.
    let report = usage_report(&config.path, &env);
    let day = &report["clients"][0]["day"];
    assert_eq!(
        (day["used"].as_u64(), day["reserved"].as_u64()),
        (Some(20), Some(0)),
        "{report}"
    );
    assert!(mock.call_count() >= 20);
}
