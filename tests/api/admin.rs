//! The admin listener: token-protected /admin, open health and metrics, nothing admin on the
//! public listener.

use serde_json::json;

use crate::helpers::{MODEL, error_body, spawn_app};

#[tokio::test]
async fn admin_routes_need_the_admin_token_and_exist_only_on_the_admin_listener() {
    let app = spawn_app().await;
    for path in ["/admin/usage", "/admin/upstreams"] {
        let none = app.http.get(app.admin_url(path)).send().await.unwrap();
        assert_eq!(none.status(), 401, "{path} without a token");
        error_body(none).await;
        let client = app
            .http
            .get(app.admin_url(path))
            .bearer_auth(&app.client_key)
            .send()
            .await
            .unwrap();
        assert_eq!(client.status(), 401, "{path} with a client key");
        let admin = app
            .http
            .get(app.admin_url(path))
            .bearer_auth(&app.admin_token)
            .send()
            .await
            .unwrap();
        assert_eq!(admin.status(), 200, "{path} with the admin token");

        let public = app
            .http
            .get(app.url(path))
            .bearer_auth(&app.admin_token)
            .send()
            .await
            .unwrap();
        assert_eq!(public.status(), 404, "{path} on the public listener");
        let public = app
            .http
            .get(app.url(path))
            .bearer_auth(&app.client_key)
            .send()
            .await
            .unwrap();
        assert_eq!(
            public.status(),
            404,
            "{path} on the public listener with a client key"
        );
    }
}

#[tokio::test]
async fn usage_report_covers_every_client_and_can_be_narrowed() {
    let app = spawn_app().await;
    assert_eq!(
        app.generate(&json!({"model": MODEL, "prompt": "one", "n": 2}))
            .await
            .status(),
        200
    );
    let all = app.admin_json("/admin/usage").await;
    let ids: Vec<_> = all["clients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["client"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids, ["team-a", "team-b"]);
    let a = app.admin_json("/admin/usage?client=team-a&days=3").await;
    assert_eq!(a["clients"].as_array().unwrap().len(), 1);
    assert_eq!(a["clients"][0]["today"]["images"], 2);
    assert_eq!(a["clients"][0]["daily"].as_array().unwrap().len(), 3);
    let unknown = app
        .http
        .get(app.admin_url("/admin/usage?client=nobody"))
        .bearer_auth(&app.admin_token)
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
    error_body(unknown).await;
    for bad in ["days=abc", "days=-1", "days=1.5"] {
        let response = app
            .http
            .get(app.admin_url(&format!("/admin/usage?{bad}")))
            .bearer_auth(&app.admin_token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{bad}");
        assert_eq!(error_body(response).await["param"], "days", "{bad}");
    }
}

#[tokio::test]
async fn upstreams_view_shows_each_key_state_and_counts() {
    let app = spawn_app().await;
    assert_eq!(
        app.generate(&json!({"model": MODEL, "prompt": "x"}))
            .await
            .status(),
        200
    );
    let view = app.admin_json("/admin/upstreams").await;
    let key = &view["upstreams"][0]["keys"][0];
    assert_eq!(view["upstreams"][0]["upstream"], "primary");
    assert_eq!(key["id"], "k1");
    assert_eq!(key["state"], "healthy");
    assert_eq!(key["totals"]["success"], 1);
    assert!(!view.to_string().contains(&app.upstream_key));
}

#[tokio::test]
async fn the_dashboard_page_is_static_locked_down_and_only_on_the_admin_listener() {
    let app = spawn_app().await;
    // No token needed for the page itself: it holds no data and asks for the token.
    let page = app.http.get(app.admin_url("/admin/")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let headers = page.headers().clone();
    assert!(
        headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let csp = headers["content-security-policy"].to_str().unwrap();
    assert!(csp.starts_with("default-src 'none';"), "{csp}");
    assert!(csp.contains("connect-src 'self'"), "{csp}");
    assert_eq!(headers["cache-control"], "no-store");
    assert_eq!(headers["referrer-policy"], "no-referrer");
    let html = page.text().await.unwrap();
    assert!(html.contains("id=\"login\""));
    for data in ["team-a", "team-b", "primary", "k1"] {
        assert!(
            !html.contains(data),
            "the page itself carries no data ({data})"
        );
    }

    let redirect = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .get(app.admin_url("/admin"))
        .send()
        .await
        .unwrap();
    assert_eq!(redirect.status(), 308);
    assert_eq!(redirect.headers()["location"], "/admin/");

    // Nothing of the admin listener answers on the public one, whatever the credentials.
    for path in ["/admin/", "/admin", "/metrics", "/healthz", "/readyz"] {
        for key in [None, Some(&app.admin_token), Some(&app.client_key)] {
            let mut request = app.http.get(app.url(path));
            if let Some(key) = key {
                request = request.bearer_auth(key);
            }
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), 404, "{path} on the public listener");
            error_body(response).await;
        }
    }
    // And the admin token is not a client key.
    let models = app
        .http
        .get(app.url("/v1/models"))
        .bearer_auth(&app.admin_token)
        .send()
        .await
        .unwrap();
    assert_eq!(models.status(), 401);
}

#[tokio::test]
async fn a_wrong_admin_token_is_refused_with_an_openai_shaped_401() {
    let app = spawn_app().await;
    for token in [
        format!("{}x", app.admin_token),
        String::new(),
        "Bearer".to_owned(),
    ] {
        let response = app
            .http
            .get(app.admin_url("/admin/usage"))
            .header("authorization", format!("Bearer {token}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 401, "token {token:?}");
        let error = error_body(response).await;
        assert!(!error.to_string().contains(&app.admin_token));
    }
}
