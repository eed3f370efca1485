//! The happy path through real OpenAI clients.

use async_openai::Client;
use async_openai::config::OpenAIConfig;
use async_openai::types::images::{
    CreateImageRequestArgs, Image, ImageModel, ImageResponseFormat, ImageSize,
};
use base64::Engine;
use serde_json::{Value, json};

use crate::helpers::{MODEL, body, error_body, spawn_app};

fn openai_client(base_url: &str, key: &str) -> Client<OpenAIConfig> {
    Client::with_config(
        OpenAIConfig::new()
            .with_api_base(base_url)
            .with_api_key(key),
    )
}

#[allow(
    deprecated,
    reason = "response_format is deprecated for GPT image models, not for the seed model"
)]
fn request(
    format: ImageResponseFormat,
    prompt: &str,
) -> async_openai::types::images::CreateImageRequest {
    CreateImageRequestArgs::default()
        .model(ImageModel::Other(MODEL.to_owned()))
        .prompt(prompt)
        .size(ImageSize::S1024x1024)
        .n(1u8)
        .response_format(format)
        .build()
        .expect("request builds")
}

#[tokio::test]
async fn async_openai_gets_a_url_image_through_the_gateway_with_the_server_held_key() {
    let app = spawn_app().await;
    let client = openai_client(&app.base_url(), &app.client_key);

    let response = client
        .images()
        .generate(request(
            ImageResponseFormat::Url,
            "A cozy coffee shop interior",
        ))
        .await
        .expect("generation succeeds");

    assert_eq!(response.data.len(), 1);
    let Image::Url { url, .. } = response.data[0].as_ref() else {
        panic!("expected a url image, got {:?}", response.data[0]);
    };
    let png = app
        .http
        .get(url)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");

    let calls = app.mock.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(
        calls[0].key, app.upstream_key,
        "the mock sees the server-held key"
    );
    assert_eq!(
        app.mock.calls_for_key(&app.client_key),
        0,
        "the client key never reaches the upstream"
    );
    assert_eq!(calls[0].request["model"], MODEL);
}

#[tokio::test]
async fn async_openai_gets_b64_json_identical_to_what_the_upstream_sent() {
    let app = spawn_app().await;
    let client = openai_client(&app.base_url(), &app.client_key);

    let response = client
        .images()
        .generate(request(
            ImageResponseFormat::B64Json,
            "A lighthouse at dusk",
        ))
        .await
        .expect("generation succeeds");
    let Image::B64Json { b64_json, .. } = response.data[0].as_ref() else {
        panic!("expected b64_json");
    };
    let png = base64::engine::general_purpose::STANDARD
        .decode(b64_json.as_bytes())
        .unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");

    // Byte-for-byte: the gateway passes the upstream body through without reshaping it.
    let raw = app.generate(&json!({"model": MODEL, "prompt": "A lighthouse at dusk", "response_format": "b64_json"})).await;
    assert_eq!(raw.status(), 200);
    let got = raw.bytes().await.unwrap();
    let sent = app.mock.calls().last().unwrap().response_body.clone();
    assert_eq!(got, sent);
}

#[tokio::test]
async fn forwarded_request_has_normalised_fields_mapped_model_and_no_async_or_client_headers() {
    let app = spawn_app().await;
    let response = app
        .http
        .post(app.url("/v1/images/generations"))
        .bearer_auth(&app.other_client_key)
        .header("x-custom-secret", "do-not-forward")
        .header("user-agent", "client-app/9")
        .header("accept", "text/plain")
        .header("x-request-id", "client-req-1")
        .header("openai-organization", "org-client")
        .header("cookie", "session=client")
        .header("x-forwarded-for", "10.9.8.7")
        .json(&json!({"model": MODEL, "prompt": "p", "style": "vivid", "async": false, "user": "u-1", "quality": null}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let call = app.mock.calls().pop().unwrap();
    // Only the gateway's own headers reach the provider: its key, its JSON content type and
    // accept, its user agent, and what HTTP itself needs. None of the client's.
    let mut names: Vec<&str> = call.headers.iter().map(|(n, _)| n.as_str()).collect();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            "accept",
            "authorization",
            "content-length",
            "content-type",
            "host",
            "user-agent"
        ],
        "{:?}",
        call.headers
    );
    let value = |name: &str| {
        call.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .unwrap()
    };
    assert_eq!(value("content-type"), "application/json");
    assert_eq!(
        value("accept"),
        "application/json",
        "the client's accept was not passed"
    );
    assert!(value("user-agent").starts_with("imagegate/"));
    assert_eq!(
        call.key, app.upstream_key,
        "the server-held key, not the client's"
    );
    assert!(
        call.headers.iter().all(|(_, v)| !v.contains("client")),
        "no client header value leaked: {:?}",
        call.headers
    );
    assert_eq!(
        call.request,
        json!({"model": MODEL, "prompt": "p", "size": "1024x1024", "quality": "standard", "n": 1,
               "response_format": "url", "style": "vivid", "user": "u-1"})
    );

    // A model whose upstream name differs is mapped.
    let response = app
        .generate(&json!({"model": "other-model", "prompt": "p"}))
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        app.mock.calls().pop().unwrap().request["model"],
        "other-upstream-model"
    );
}

#[tokio::test]
async fn n_images_come_back_as_n_items() {
    let app = spawn_app().await;
    let response = app
        .generate(&json!({"model": MODEL, "prompt": "three cats", "n": 3}))
        .await;
    assert_eq!(response.status(), 200);
    let json: Value = response.json().await.unwrap();
    assert_eq!(json["data"].as_array().unwrap().len(), 3);
    assert!(json["created"].is_i64());
}

#[tokio::test]
async fn models_lists_only_what_the_client_may_use() {
    let app = spawn_app().await;
    let client = openai_client(&app.base_url(), &app.client_key);
    let all = client.models().list().await.expect("models list");
    let ids: Vec<_> = all.data.iter().map(|m| m.id.clone()).collect();
    assert_eq!(ids, vec![MODEL.to_owned(), "other-model".to_owned()]);
    assert!(all.data.iter().all(|m| m.owned_by == "imagegate"));

    let restricted = openai_client(&app.base_url(), &app.other_client_key);
    let ids: Vec<_> = restricted
        .models()
        .list()
        .await
        .unwrap()
        .data
        .into_iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(ids, vec![MODEL.to_owned()]);

    let one = restricted
        .models()
        .retrieve(MODEL)
        .await
        .expect("retrieve a model");
    assert_eq!(one.id, MODEL);
    assert!(
        restricted.models().retrieve("other-model").await.is_err(),
        "not this client's"
    );
    // An id that is not UTF-8 once decoded: a JSON 404 like any unknown model.
    let not_utf8 = app
        .http
        .get(app.url("/v1/models/%FF"))
        .bearer_auth(&app.client_key)
        .send()
        .await
        .unwrap();
    assert_eq!(not_utf8.status(), 404);
    assert_eq!(error_body(not_utf8).await["code"], "model_not_found");

    let response = app
        .generate_as(
            &app.other_client_key,
            &json!({"model": "other-model", "prompt": "p"}),
        )
        .await;
    assert_eq!(response.status(), 404);
    assert_eq!(app.mock.call_count(), 0);
}

#[tokio::test]
async fn upstream_request_id_is_passed_back() {
    let app = spawn_app().await;
    let response = app.generate(&body("id please")).await;
    assert_eq!(response.status(), 200);
    let upstream_id = response.headers()["x-upstream-request-id"]
        .to_str()
        .unwrap();
    assert!(upstream_id.starts_with("mock-"), "{upstream_id}");
}
