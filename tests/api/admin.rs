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
