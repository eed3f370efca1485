#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};

use super::png;
use super::*;

// A plain test client: the production client's limits (upstream/http.rs)
// are irrelevant to driving the mock.
#[allow(clippy::disallowed_methods)]
fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

async fn start_with(options: MockOptions) -> MockUpstream {
    MockUpstream::start("127.0.0.1:0".parse().unwrap(), options)
        .await
        .unwrap()
}

async fn start() -> MockUpstream {
    start_with(MockOptions::default()).await
}

fn gen_url(mock: &MockUpstream) -> String {
    format!("{}/images/generations", mock.base_url())
}

async fn generate(
    c: &reqwest::Client,
    mock: &MockUpstream,
    key: &str,
    body: Value,
) -> reqwest::Response {
    c.post(gen_url(mock))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .unwrap()
}

async fn json_of(resp: reqwest::Response) -> Value {
    serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap()
}

fn assert_openai_error(body: &Value) {
    let err = &body["error"];
    assert!(err["message"].is_string(), "{body}");
    assert!(err["type"].is_string(), "{body}");
    assert!(err.get("param").is_some_and(Value::is_null), "{body}");
    assert!(err.get("code").is_some(), "{body}");
}

#[tokio::test]
async fn url_mode_answers_and_serves_real_pngs() {
    let mock = start().await;
    let c = client();
    let resp = generate(
        &c,
        &mock,
        "k1",
        json!({"model": "m", "prompt": "a lighthouse"}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let rid = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert!(rid.starts_with("mock-") && rid.len() > 5, "{rid}");
    let body = json_of(resp).await;
    assert!(body["created"].is_u64(), "{body}");
    let data = body["data"].as_array().unwrap();
    assert_eq!(data.len(), 1);
    assert!(
        data[0].get("b64_json").is_none(),
        "optional fields are omitted, not null"
    );
    assert_eq!(data[0]["revised_prompt"], "a lighthouse");
    let url = data[0]["url"].as_str().unwrap();
    assert!(
        url.starts_with(&format!("http://{}/images/", mock.addr())),
        "{url}"
    );
    assert!(url.ends_with(".png"));

    let img = c.get(url).send().await.unwrap();
    assert_eq!(img.status(), 200);
    assert_eq!(img.headers()["content-type"], "image/png");
    let bytes = img.bytes().await.unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    assert_eq!(&bytes[12..16], b"IHDR");
    let ihdr_crc = u32::from_be_bytes(bytes[29..33].try_into().unwrap());
    assert_eq!(ihdr_crc, png::crc32(&bytes[12..29]));
    let decoded = png::decode(&bytes).unwrap();
    assert_eq!((decoded.width, decoded.height), (64, 64));

    let missing = c
        .get(format!("http://{}/images/nope.png", mock.addr()))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    mock.shutdown().await;
}

#[tokio::test]
async fn b64_mode_decodes_to_png_of_expected_size() {
    let mock = start().await;
    let c = client();
    let body = json!({"prompt": "p", "size": "512x256", "response_format": "b64_json"});
    let body = json_of(generate(&c, &mock, "k", body).await).await;
    let item = &body["data"][0];
    assert!(item.get("url").is_none());
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(item["b64_json"].as_str().unwrap())
        .unwrap();
    let decoded = png::decode(&bytes).unwrap();
    assert_eq!((decoded.width, decoded.height), (32, 16));

    let big = start_with(MockOptions {
        image_divisor: 2,
        ..MockOptions::default()
    })
    .await;
    let body = json!({"prompt": "p", "size": "1024x1024", "response_format": "b64_json"});
    let body = json_of(generate(&c, &big, "k", body).await).await;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(body["data"][0]["b64_json"].as_str().unwrap())
        .unwrap();
    let decoded = png::decode(&bytes).unwrap();
    assert_eq!((decoded.width, decoded.height), (512, 512));
    mock.shutdown().await;
    big.shutdown().await;
}

#[tokio::test]
async fn n_items_are_distinct_and_deterministic() {
    let mock = start().await;
    let c = client();
    let req = json!({"prompt": "cats", "n": 3, "response_format": "b64_json"});
    let first = json_of(generate(&c, &mock, "k", req.clone()).await).await;
    let second = json_of(generate(&c, &mock, "k", req).await).await;
    let items: Vec<&str> = first["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["b64_json"].as_str().unwrap())
        .collect();
    assert_eq!(items.len(), 3);
    assert_ne!(items[0], items[1]);
    assert_ne!(items[1], items[2]);
    assert_eq!(first["data"], second["data"]);
    let other = json_of(
        generate(
            &c,
            &mock,
            "k",
            json!({"prompt": "dogs", "response_format": "b64_json"}),
        )
        .await,
    )
    .await;
    assert_ne!(other["data"][0]["b64_json"].as_str().unwrap(), items[0]);
    assert_eq!(mock.images_produced(), 7);
}

#[tokio::test]
async fn status_directives_answer_openai_errors() {
    let mock = start().await;
    let c = client();
    let resp = generate(&c, &mock, "k", json!({"prompt": "x [mock:status=500]"})).await;
    assert_eq!(resp.status(), 500);
    assert!(
        resp.headers()["x-request-id"]
            .to_str()
            .unwrap()
            .starts_with("mock-")
    );
    assert_eq!(resp.headers()["content-type"], "application/json");
    let body = json_of(resp).await;
    assert_openai_error(&body);
    assert_eq!(body["error"]["type"], "server_error");

    let resp = generate(&c, &mock, "k", json!({"prompt": "[mock:status=401] x"})).await;
    assert_eq!(resp.status(), 401);
    let body = json_of(resp).await;
    assert_openai_error(&body);
    assert_eq!(body["error"]["code"], "invalid_api_key");
    assert_eq!(mock.images_produced(), 0);
}

#[tokio::test]
async fn retry_after_seconds_and_http_date() {
    let mock = start().await;
    let c = client();
    let resp = generate(
        &c,
        &mock,
        "k",
        json!({"prompt": "[mock:status=429 retry_after=30]"}),
    )
    .await;
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["retry-after"], "30");
    let body = json_of(resp).await;
    assert_openai_error(&body);
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");

    let resp = generate(
        &c,
        &mock,
        "k",
        json!({"prompt": "[mock:status=429 retry_after_date=30]"}),
    )
    .await;
    assert_eq!(resp.status(), 429);
    let date = resp.headers()["retry-after"].to_str().unwrap().to_owned();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    // The header has one-second resolution and was produced a moment ago.
    let candidates: Vec<String> = (now + 28..=now + 31).map(fault::http_date).collect();
    assert!(candidates.contains(&date), "{date} not in {candidates:?}");
    assert_eq!(date.len(), 29);
    assert!(date.ends_with(" GMT"));

    let resp = generate(&c, &mock, "k", json!({"prompt": "[mock:status=503]"})).await;
    assert!(resp.headers().get("retry-after").is_none());
}

#[tokio::test]
async fn bad_json_directive_sends_unparseable_json() {
    let mock = start().await;
    let c = client();
    let resp = generate(&c, &mock, "k", json!({"prompt": "[mock:bad_json]"})).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let bytes = resp.bytes().await.unwrap();
    assert!(serde_json::from_slice::<Value>(&bytes).is_err());
    assert!(bytes.starts_with(b"{\"created\":"));
    let calls = mock.calls();
    assert_eq!(calls[0].status, 200);
    assert_eq!(calls[0].images, 0);
    assert_eq!(calls[0].response_body, bytes);
}

#[tokio::test]
async fn hang_never_answers() {
    let mock = start().await;
    let c = client();
    let started = Instant::now();
    let err = c
        .post(gen_url(&mock))
        .bearer_auth("k")
        .json(&json!({"prompt": "[mock:hang]"}))
        .timeout(Duration::from_millis(300))
        .send()
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err:?}");
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(mock.call_count(), 1);
    assert_eq!(mock.calls()[0].status, 0);
}

#[tokio::test]
async fn reset_drops_the_connection_and_server_keeps_serving() {
    let mock = start().await;
    let c = client();
    let err = c
        .post(gen_url(&mock))
        .bearer_auth("k")
        .json(&json!({"prompt": "[mock:reset]"}))
        .send()
        .await
        .unwrap_err();
    assert!(!err.is_timeout(), "{err:?}");
    assert!(err.is_request() || err.is_connect(), "{err:?}");
    // Same client (pool) and a fresh one both still get answers.
    let ok = generate(&c, &mock, "k", json!({"prompt": "fine"})).await;
    assert_eq!(ok.status(), 200);
    let ok = generate(&client(), &mock, "k", json!({"prompt": "fine"})).await;
    assert_eq!(ok.status(), 200);
    assert_eq!(mock.call_count(), 3);
    assert_eq!(mock.calls()[0].status, 0);
    mock.shutdown().await;
}

#[tokio::test]
async fn per_key_faults_via_handle_and_route() {
    let mock = start().await;
    let c = client();
    mock.set_key_fault("bad", Some("status=401".parse().unwrap()));
    assert_eq!(
        generate(&c, &mock, "bad", json!({"prompt": "x"}))
            .await
            .status(),
        401
    );
    assert_eq!(
        generate(&c, &mock, "good", json!({"prompt": "x"}))
            .await
            .status(),
        200
    );
    // A prompt directive overrides the key's failure.
    assert_eq!(
        generate(&c, &mock, "bad", json!({"prompt": "[mock:status=502]"}))
            .await
            .status(),
        502
    );
    mock.set_key_fault("bad", None);
    assert_eq!(
        generate(&c, &mock, "bad", json!({"prompt": "x"}))
            .await
            .status(),
        200
    );

    let control = format!("http://{}/__mock/faults", mock.addr());
    let resp = c
        .post(&control)
        .json(&json!({"key": "good", "fault": "status=429 retry_after=7"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(json_of(resp).await["fault"], "status=429 retry_after=7");
    let resp = generate(&c, &mock, "good", json!({"prompt": "x"})).await;
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["retry-after"], "7");
    // Key faults apply before body validation, like a provider's auth check.
    let resp = c
        .post(gen_url(&mock))
        .bearer_auth("good")
        .body("{")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 429);

    let resp = c
        .post(&control)
        .json(&json!({"key": "good", "fault": "explode"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert_openai_error(&json_of(resp).await);
    let resp = c
        .post(&control)
        .json(&json!({"key": "good", "fault": null}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        generate(&c, &mock, "good", json!({"prompt": "x"}))
            .await
            .status(),
        200
    );

    // A latency key fault delays without failing.
    mock.set_key_fault("slow", Some(Fault::Latency(Duration::from_millis(120))));
    let started = Instant::now();
    assert_eq!(
        generate(&c, &mock, "slow", json!({"prompt": "x"}))
            .await
            .status(),
        200
    );
    assert!(started.elapsed() >= Duration::from_millis(120));
    assert_eq!(mock.calls_for_key("bad"), 3);
}

#[tokio::test]
async fn records_calls_and_counts() {
    let mock = start().await;
    let c = client();
    let before = unix_ms();
    generate(&c, &mock, "a", json!({"prompt": "one", "n": 2})).await;
    generate(&c, &mock, "b", json!({"prompt": "two [mock:status=500]"})).await;
    let sent = generate(
        &c,
        &mock,
        "a",
        json!({"prompt": "three", "response_format": "b64_json"}),
    )
    .await;
    let sent = sent.bytes().await.unwrap();

    assert_eq!(mock.call_count(), 3);
    assert_eq!(mock.calls_for_key("a"), 2);
    assert_eq!(mock.calls_for_key("b"), 1);
    assert_eq!(mock.calls_for_key("zzz"), 0);
    assert_eq!(mock.images_produced(), 3);
    let calls = mock.calls();
    assert_eq!(calls.len(), 3);
    assert_eq!(calls[0].key, "a");
    assert_eq!(calls[0].request["n"], 2);
    assert_eq!((calls[0].status, calls[0].images), (200, 2));
    assert_eq!((calls[1].status, calls[1].images), (500, 0));
    assert_openai_error(&serde_json::from_slice(&calls[1].response_body).unwrap());
    assert_eq!(calls[2].response_body, sent);
    assert!(calls[0].at <= calls[1].at && calls[1].at <= calls[2].at);
    assert!(calls[0].unix_ms >= before);

    let stats_url = format!("http://{}/__mock/stats", mock.addr());
    let stats = json_of(c.get(&stats_url).send().await.unwrap()).await;
    assert_eq!(
        stats,
        json!({"calls": 3, "calls_by_key": {"a": 2, "b": 1}, "images": 3, "polls": 0})
    );

    let resp = c
        .post(format!("http://{}/__mock/reset", mock.addr()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(mock.call_count(), 0);
    assert!(mock.calls().is_empty());
    let stats = json_of(c.get(&stats_url).send().await.unwrap()).await;
    assert_eq!(
        stats,
        json!({"calls": 0, "calls_by_key": {}, "images": 0, "polls": 0})
    );

    generate(&c, &mock, "a", json!({"prompt": "again"})).await;
    mock.reset();
    assert_eq!((mock.call_count(), mock.images_produced()), (0, 0));
}

#[tokio::test]
async fn async_tasks_complete_after_latency() {
    let mock = start().await;
    let c = client();
    let started = Instant::now();
    let resp = generate(
        &c,
        &mock,
        "owner",
        json!({"prompt": "t [mock:latency_ms=300]", "n": 2, "async": true}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let created = json_of(resp).await;
    assert_eq!(created["status"], "queued");
    assert_eq!(created["progress"], 0);
    // The task's clock starts before the answer is sent.
    let created_at = Instant::now();
    let id = created["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("task_"));
    assert!(
        started.elapsed() < Duration::from_millis(300),
        "creation must not wait"
    );

    let task_url = format!("{}/tasks/{id}", mock.base_url());
    let poll = json_of(c.get(&task_url).bearer_auth("owner").send().await.unwrap()).await;
    assert_eq!(poll["status"], "processing");
    let progress = poll["progress"].as_u64().unwrap();
    assert!((1..=99).contains(&progress), "{poll}");
    assert!(poll.get("data").is_none());

    let other = c
        .get(&task_url)
        .bearer_auth("intruder")
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 404);
    assert_openai_error(&json_of(other).await);
    assert_eq!(c.get(&task_url).send().await.unwrap().status(), 401);

    tokio::time::sleep(Duration::from_millis(300).saturating_sub(created_at.elapsed())).await;
    let done = json_of(c.get(&task_url).bearer_auth("owner").send().await.unwrap()).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["progress"], 100);
    assert!(done["created"].is_u64());
    let data = done["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    let img = c
        .get(data[0]["url"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(img.status(), 200);
    assert!(png::decode(&img.bytes().await.unwrap()).is_ok());

    assert_eq!(mock.poll_count(), 4);
    assert_eq!(mock.call_count(), 1);
    assert_eq!(mock.images_produced(), 2);

    // b64 tasks without latency complete on the first poll.
    let created = json_of(
        generate(
            &c,
            &mock,
            "owner",
            json!({"prompt": "b", "async": true, "response_format": "b64_json"}),
        )
        .await,
    )
    .await;
    let task_url = format!(
        "{}/tasks/{}",
        mock.base_url(),
        created["id"].as_str().unwrap()
    );
    let done = json_of(c.get(&task_url).bearer_auth("owner").send().await.unwrap()).await;
    assert_eq!(done["status"], "completed");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(done["data"][0]["b64_json"].as_str().unwrap())
        .unwrap();
    assert!(png::decode(&bytes).is_ok());
    let unknown = c
        .get(format!("{}/tasks/task_nope", mock.base_url()))
        .bearer_auth("owner")
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
}

#[tokio::test]
async fn latency_option_and_directive_delay_answers() {
    let mock = start_with(MockOptions {
        latency: Duration::from_millis(100),
        ..MockOptions::default()
    })
    .await;
    let c = client();
    let started = Instant::now();
    assert_eq!(
        generate(&c, &mock, "k", json!({"prompt": "x"}))
            .await
            .status(),
        200
    );
    assert!(started.elapsed() >= Duration::from_millis(100));
    // The directive overrides the default, in both directions.
    let started = Instant::now();
    assert_eq!(
        generate(&c, &mock, "k", json!({"prompt": "x [mock:latency_ms=0]"}))
            .await
            .status(),
        200
    );
    assert!(started.elapsed() < Duration::from_millis(100));
    let started = Instant::now();
    let resp = generate(
        &c,
        &mock,
        "k",
        json!({"prompt": "[mock:latency_ms=150 status=503]"}),
    )
    .await;
    assert_eq!(resp.status(), 503);
    assert!(started.elapsed() >= Duration::from_millis(150));
}

#[tokio::test]
async fn malformed_requests_get_openai_errors() {
    let mock = start().await;
    let c = client();
    let resp = c
        .post(gen_url(&mock))
        .json(&json!({"prompt": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert_openai_error(&json_of(resp).await);

    let resp = c
        .post(gen_url(&mock))
        .bearer_auth("k")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert_openai_error(&json_of(resp).await);

    for body in [
        json!([1, 2]),
        json!({"model": "m"}),
        json!({"prompt": 5}),
        json!({"prompt": "x", "size": "big"}),
        json!({"prompt": "x", "size": "0x10"}),
        json!({"prompt": "x", "n": 0}),
        json!({"prompt": "x", "n": 11}),
        json!({"prompt": "x", "response_format": "gif"}),
        json!({"prompt": "x", "async": "yes"}),
        json!({"prompt": "x [mock:explode]"}),
        json!({"prompt": "x [mock:status=500"}),
    ] {
        let resp = generate(&c, &mock, "k", body.clone()).await;
        assert_eq!(resp.status(), 400, "{body}");
        assert_openai_error(&json_of(resp).await);
    }
    // Unknown fields are ignored; nulls mean "default".
    let resp = generate(
        &c,
        &mock,
        "k",
        json!({"prompt": "x", "style": "vivid", "n": null, "quality": "hd"}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(mock.call_count(), 14);
    assert_eq!(mock.calls()[1].request, Value::Null);
    assert_eq!(mock.calls_for_key(""), 1);
    assert_eq!(
        c.get(format!("http://{}/nope", mock.addr()))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
}

#[tokio::test]
async fn shutdown_releases_hanging_requests() {
    let mock = start().await;
    let c = client();
    let url = gen_url(&mock);
    let pending = tokio::spawn({
        let c = c.clone();
        async move {
            c.post(url)
                .bearer_auth("k")
                .json(&json!({"prompt": "[mock:hang]"}))
                .send()
                .await
                .map(|r| r.status().as_u16())
        }
    });
    while mock.call_count() == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let waiter = mock.clone();
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(2), mock.shutdown())
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(1), waiter.wait())
        .await
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(pending.await.unwrap().unwrap(), 503);
    assert!(
        c.get(format!("{}/tasks/x", waiter.base_url()))
            .send()
            .await
            .is_err()
    );
}
