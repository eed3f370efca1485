//! Every bad input gets the right 4xx with an OpenAI error body, and none reaches the upstream.

use serde_json::{Value, json};

use crate::helpers::{MODEL, error_body, spawn_app};

enum Auth {
    Client,
    Restricted,
    Header(&'static str),
    /// The client's valid key, then a second `Authorization` header.
    Twice,
    Missing,
}

struct Case {
    name: &'static str,
    method: &'static str,
    path: &'static str,
    auth: Auth,
    content_type: Option<&'static str>,
    body: Vec<u8>,
    status: u16,
    param: Option<&'static str>,
    code: Option<&'static str>,
}

/// A JSON body case on the generation route with team-a's key.
fn json_case(name: &'static str, body: Value, status: u16, param: Option<&'static str>) -> Case {
    Case {
        name,
        method: "POST",
        path: "/v1/images/generations",
        auth: Auth::Client,
        content_type: Some("application/json"),
        body: serde_json::to_vec(&body).unwrap(),
        status,
        param,
        code: None,
    }
}

fn raw_case(name: &'static str, body: &[u8], param: Option<&'static str>) -> Case {
    Case {
        body: body.to_vec(),
        ..json_case(name, Value::Null, 400, param)
    }
}

/// `{"model": MODEL, "prompt": "a cat"}` with `field` set to `value`.
fn with(field: &str, value: Value) -> Value {
    let mut body = json!({"model": MODEL, "prompt": "a cat"});
    body[field] = value;
    body
}

fn cases() -> Vec<Case> {
    let over_limit_prompt = "é".repeat(4001);
    let deep = format!("{{\"model\": {}1{}}}", "[".repeat(300), "]".repeat(300));
    vec![
        raw_case("malformed JSON", br#"{"model": "x", "prompt": "#, None),
        raw_case("empty body", b"", None),
        raw_case("whitespace body", b"  \n ", None),
        raw_case("top-level array", b"[]", None),
        raw_case("top-level string", br#""a cat""#, None),
        raw_case("top-level null", b"null", None),
        raw_case("top-level number", b"42", None),
        raw_case(
            "invalid UTF-8",
            b"{\"model\": \"\xff\xfe\", \"prompt\": \"a\"}",
            None,
        ),
        raw_case(
            "nesting deeper than the parser allows",
            deep.as_bytes(),
            None,
        ),
        raw_case(
            "trailing garbage",
            br#"{"model": "m", "prompt": "a"} x"#,
            None,
        ),
        // Last-wins would validate and send one prompt while a proxy in front read another.
        raw_case(
            "a field given twice",
            br#"{"model": "m", "prompt": "a", "prompt": "b"}"#,
            Some("prompt"),
        ),
        raw_case(
            "a field given twice, the second valid",
            br#"{"n": 99, "model": "m", "prompt": "a", "n": 1}"#,
            Some("n"),
        ),
        json_case(
            "missing prompt",
            json!({"model": MODEL}),
            400,
            Some("prompt"),
        ),
        json_case(
            "missing model",
            json!({"prompt": "a cat"}),
            400,
            Some("model"),
        ),
        json_case(
            "null model",
            json!({"model": null, "prompt": "a cat"}),
            400,
            Some("model"),
        ),
        json_case(
            "model is a number",
            with("model", json!(7)),
            400,
            Some("model"),
        ),
        json_case(
            "model is empty",
            with("model", json!("")),
            400,
            Some("model"),
        ),
        json_case(
            "prompt is a number",
            with("prompt", json!(1)),
            400,
            Some("prompt"),
        ),
        json_case(
            "prompt is an array",
            with("prompt", json!(["a"])),
            400,
            Some("prompt"),
        ),
        json_case(
            "prompt is empty",
            with("prompt", json!("")),
            400,
            Some("prompt"),
        ),
        json_case(
            "prompt is blank",
            with("prompt", json!("   ")),
            400,
            Some("prompt"),
        ),
        json_case(
            "prompt one character over the limit in Unicode scalar values",
            with("prompt", json!(over_limit_prompt)),
            400,
            Some("prompt"),
        ),
        json_case("n = 0", with("n", json!(0)), 400, Some("n")),
        json_case("n = -1", with("n", json!(-1)), 400, Some("n")),
        json_case("n = 11", with("n", json!(11)), 400, Some("n")),
        json_case(
            "n above the model's max_n",
            with("n", json!(5)),
            400,
            Some("n"),
        ),
        json_case("n = 2.5", with("n", json!(2.5)), 400, Some("n")),
        json_case("n = \"2\"", with("n", json!("2")), 400, Some("n")),
        json_case("n = true", with("n", json!(true)), 400, Some("n")),
        json_case(
            "unknown size",
            with("size", json!("512x512")),
            400,
            Some("size"),
        ),
        json_case(
            "size in the wrong case",
            with("size", json!("1024X1024")),
            400,
            Some("size"),
        ),
        json_case(
            "size is a number",
            with("size", json!(1024)),
            400,
            Some("size"),
        ),
        json_case(
            "unknown quality",
            with("quality", json!("ultra")),
            400,
            Some("quality"),
        ),
        json_case(
            "quality is a number",
            with("quality", json!(1)),
            400,
            Some("quality"),
        ),
        json_case(
            "unknown response_format",
            with("response_format", json!("png")),
            400,
            Some("response_format"),
        ),
        json_case(
            "response_format is a bool",
            with("response_format", json!(true)),
            400,
            Some("response_format"),
        ),
        json_case(
            "async is a string",
            with("async", json!("yes")),
            400,
            Some("async"),
        ),
        json_case(
            "stream: true",
            with("stream", json!(true)),
            400,
            Some("stream"),
        ),
        json_case(
            "stream is a string",
            with("stream", json!("false")),
            400,
            Some("stream"),
        ),
        json_case(
            "partial_images without streaming",
            with("partial_images", json!(2)),
            400,
            Some("partial_images"),
        ),
        json_case(
            "unknown top-level field api_base",
            with("api_base", json!("http://evil.example")),
            400,
            Some("api_base"),
        ),
        json_case(
            "field names are case-sensitive",
            with("Prompt", json!("x")),
            400,
            Some("Prompt"),
        ),
        json_case(
            "style not allowed for the model",
            with("style", json!("bogus")),
            400,
            Some("style"),
        ),
        json_case(
            "background the model does not support",
            with("background", json!("transparent")),
            400,
            Some("background"),
        ),
        json_case(
            "moderation the model does not support",
            with("moderation", json!("low")),
            400,
            Some("moderation"),
        ),
        json_case(
            "output_compression the model does not support",
            with("output_compression", json!(50)),
            400,
            Some("output_compression"),
        ),
        json_case(
            "user is a number",
            with("user", json!(123)),
            400,
            Some("user"),
        ),
        json_case(
            "user is too long",
            with("user", json!("u".repeat(257))),
            400,
            Some("user"),
        ),
        Case {
            code: Some("model_not_found"),
            ..json_case(
                "unknown model",
                with("model", json!("dall-e-9")),
                404,
                Some("model"),
            )
        },
        Case {
            auth: Auth::Restricted,
            code: Some("model_not_found"),
            ..json_case(
                "model the client may not use",
                with("model", json!("other-model")),
                404,
                Some("model"),
            )
        },
        Case {
            content_type: Some("text/plain"),
            ..json_case("wrong content type", with("n", json!(1)), 415, None)
        },
        Case {
            content_type: None,
            ..json_case("no content type", with("n", json!(1)), 415, None)
        },
        Case {
            content_type: Some("application/x-www-form-urlencoded"),
            body: b"model=gemini-3.1-flash-image&prompt=cat".to_vec(),
            ..json_case(
                "form-encoded body (curl -d without a header)",
                Value::Null,
                415,
                None,
            )
        },
        Case {
            body: {
                let mut big = br#"{"model": "gemini-3.1-flash-image", "prompt": ""#.to_vec();
                big.extend(std::iter::repeat_n(b'a', 2 * 1024 * 1024));
                big.extend(br#""}"#);
                big
            },
            code: Some("request_too_large"),
            ..json_case("body over the limit", Value::Null, 413, None)
        },
        Case {
            auth: Auth::Missing,
            code: Some("invalid_api_key"),
            ..json_case("no Authorization header", with("n", json!(1)), 401, None)
        },
        Case {
            auth: Auth::Header("Basic dXNlcjpwYXNz"),
            code: Some("invalid_api_key"),
            ..json_case("Basic instead of Bearer", with("n", json!(1)), 401, None)
        },
        Case {
            auth: Auth::Header("Bearer sk-not-a-configured-key"),
            code: Some("invalid_api_key"),
            ..json_case("unknown bearer key", with("n", json!(1)), 401, None)
        },
        Case {
            auth: Auth::Header("Bearer "),
            code: Some("invalid_api_key"),
            ..json_case("empty bearer key", with("n", json!(1)), 401, None)
        },
        Case {
            auth: Auth::Twice,
            code: Some("invalid_api_key"),
            ..json_case(
                "two Authorization headers, the first valid",
                with("n", json!(1)),
                401,
                None,
            )
        },
        Case {
            method: "GET",
            body: Vec::new(),
            content_type: None,
            code: Some("method_not_allowed"),
            ..json_case("GET on the POST route", Value::Null, 405, None)
        },
        Case {
            method: "PUT",
            code: Some("method_not_allowed"),
            ..json_case("PUT on the POST route", with("n", json!(1)), 405, None)
        },
        Case {
            method: "POST",
            path: "/v1/images/edits",
            code: Some("not_found"),
            ..json_case(
                "a route that does not exist",
                with("n", json!(1)),
                404,
                None,
            )
        },
        Case {
            method: "POST",
            path: "/v1/models",
            code: Some("method_not_allowed"),
            ..json_case("POST on the models route", with("n", json!(1)), 405, None)
        },
    ]
}

#[tokio::test]
async fn every_bad_input_gets_an_openai_error_with_the_right_status_and_no_upstream_call() {
    let app = spawn_app().await;
    let cases = cases();
    assert!(
        cases.len() >= 40,
        "the suite covers at least 40 cases, has {}",
        cases.len()
    );
    for case in &cases {
        let method = reqwest::Method::from_bytes(case.method.as_bytes()).unwrap();
        let mut request = app
            .http
            .request(method, app.url(case.path))
            .body(case.body.clone());
        if let Some(ct) = case.content_type {
            request = request.header("content-type", ct);
        }
        request = match &case.auth {
            Auth::Client => request.bearer_auth(&app.client_key),
            Auth::Restricted => request.bearer_auth(&app.other_client_key),
            Auth::Header(value) => request.header("authorization", *value),
            Auth::Twice => request
                .bearer_auth(&app.client_key)
                .header("authorization", "Bearer sk-another"),
            Auth::Missing => request,
        };
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let www_authenticate = response.headers().get("www-authenticate").cloned();
        assert!(
            response.headers().contains_key("x-request-id"),
            "{}: no x-request-id",
            case.name
        );
        let error = error_body(response).await;
        assert_eq!(status, case.status, "{}: status ({error})", case.name);
        assert_eq!(
            error["type"], "invalid_request_error",
            "{}: type",
            case.name
        );
        assert_eq!(
            error["param"].as_str(),
            case.param,
            "{}: param ({error})",
            case.name
        );
        if let Some(code) = case.code {
            assert_eq!(error["code"].as_str(), Some(code), "{}: code", case.name);
        }
        if status == 401 {
            assert_eq!(
                www_authenticate.as_ref().map(|v| v.to_str().unwrap()),
                Some("Bearer"),
                "{}",
                case.name
            );
        }
    }
    assert_eq!(
        app.mock.call_count(),
        0,
        "no bad input reached the upstream"
    );
}

#[tokio::test]
async fn a_chunked_body_over_the_limit_is_refused_with_413() {
    let app = spawn_app().await;
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..40).map(|_| Ok(vec![b' '; 64 * 1024])).collect();
    let response = app
        .http
        .post(app.url("/v1/images/generations"))
        .bearer_auth(&app.client_key)
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    assert_eq!(error_body(response).await["code"], "request_too_large");
    assert_eq!(app.mock.call_count(), 0);
}
