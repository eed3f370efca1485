//! Spawning the gateway in-process on port 0, in front of a real mock upstream.

use std::net::SocketAddr;
use std::time::Duration;

use imagegate::App;
use imagegate::app::AppState;
use imagegate::auth::key_digest_hex;
use imagegate::config::{
    ClientConfig, Config, Env, ModelConfig, StorageBackend, UpstreamConfig, UpstreamKeyConfig,
};
use imagegate::mock_upstream::{MockOptions, MockUpstream};
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const MODEL: &str = "gemini-3.1-flash-image";
pub const UPSTREAM_KEY_VAR: &str = "TEST_UPSTREAM_KEY";
/// A second server-held key, for tests that configure a second key or upstream.
pub const UPSTREAM_KEY_2_VAR: &str = "TEST_UPSTREAM_KEY_2";
/// A third server-held key.
pub const UPSTREAM_KEY_3_VAR: &str = "TEST_UPSTREAM_KEY_3";
pub const ADMIN_TOKEN_VAR: &str = "TEST_ADMIN_TOKEN";

/// A running gateway, its mock upstream, and the keys involved.
pub struct TestApp {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub mock: MockUpstream,
    /// The server-held key the mock should see.
    pub upstream_key: String,
    /// The value of `UPSTREAM_KEY_2_VAR`.
    pub upstream_key_2: String,
    /// The value of `UPSTREAM_KEY_3_VAR`.
    pub upstream_key_3: String,
    /// Client `team-a`'s key.
    pub client_key: String,
    /// Client `team-b`'s key (may only use MODEL).
    pub other_client_key: String,
    pub admin_token: String,
    pub http: reqwest::Client,
    pub state: AppState,
    /// The config the gateway started with, and its env: what [`TestApp::reload_with`] edits.
    pub config: Config,
    pub env: Env,
    shutdown: CancellationToken,
    handle: Option<JoinHandle<anyhow::Result<()>>>,
}

pub fn random_hex(bytes: usize) -> String {
    (0..bytes)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}

/// The config every test starts from; `tweak` adjusts it before start.
pub fn base_config(mock_base_url: &str, client_key: &str, other_client_key: &str) -> Config {
    let mut config = Config::default();
    config.server.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.server.admin_listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.server.request_timeout_secs = 20;
    config.server.shutdown_grace_secs = 5;
    config.storage.backend = StorageBackend::Memory;
    config.admin.token_env = Some(ADMIN_TOKEN_VAR.to_owned());
    // Generous defaults so only tests about limits meet them.
    config.client_defaults.requests_per_minute = 100_000;
    config.client_defaults.images_per_minute = 100_000;
    config.client_defaults.max_concurrent = 10_000;
    config.client_defaults.images_per_day = 1_000_000;
    config.client_defaults.images_per_month = 10_000_000;
    let mut upstream = UpstreamConfig::new("primary", mock_base_url);
    upstream.timeout_secs = 10;
    upstream.connect_timeout_secs = 2;
    let mut key = UpstreamKeyConfig::from_env("k1", UPSTREAM_KEY_VAR);
    key.requests_per_minute = 10_000;
    key.max_concurrent = 1_000;
    upstream.keys.push(key);
    config.upstreams.push(upstream);
    let mut model = ModelConfig::new(MODEL, &["primary"]);
    model.max_prompt_chars = 4000;
    model.styles = vec!["vivid".to_owned(), "natural".to_owned()];
    config.models.push(model);
    let mut other = ModelConfig::new("other-model", &["primary"]);
    other.upstream_model = Some("other-upstream-model".to_owned());
    config.models.push(other);
    config
        .clients
        .push(ClientConfig::new("team-a", &key_digest_hex(client_key)));
    let mut b = ClientConfig::new("team-b", &key_digest_hex(other_client_key));
    b.models = vec![MODEL.to_owned()];
    config.clients.push(b);
    config
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(MockOptions::default(), |_| {}).await
}

pub async fn spawn_app_with(options: MockOptions, tweak: impl FnOnce(&mut Config)) -> TestApp {
    let mock = MockUpstream::start(SocketAddr::from(([127, 0, 0, 1], 0)), options)
        .await
        .expect("mock upstream starts");
    let upstream_key = format!("sk-upstream-{}", random_hex(16));
    let upstream_key_2 = format!("sk-upstream2-{}", random_hex(16));
    let upstream_key_3 = format!("sk-upstream3-{}", random_hex(16));
    let client_key = format!("sk-client-{}", random_hex(16));
    let other_client_key = format!("sk-client-{}", random_hex(16));
    let admin_token = format!("sk-admin-{}", random_hex(16));
    let mut config = base_config(&mock.base_url(), &client_key, &other_client_key);
    tweak(&mut config);
    let env = Env::from_pairs([
        (UPSTREAM_KEY_VAR, upstream_key.as_str()),
        (UPSTREAM_KEY_2_VAR, upstream_key_2.as_str()),
        (UPSTREAM_KEY_3_VAR, upstream_key_3.as_str()),
        (ADMIN_TOKEN_VAR, admin_token.as_str()),
    ]);
    let app = App::build(config.clone(), &env).await.expect("app builds");
    let addr = app.public_addr();
    let admin_addr = app.admin_addr();
    let state = app.state().clone();
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    let handle = tokio::spawn(async move { app.run(stop.cancelled_owned()).await });
    TestApp {
        addr,
        admin_addr,
        mock,
        upstream_key,
        upstream_key_2,
        upstream_key_3,
        client_key,
        other_client_key,
        admin_token,
        http: http_client(),
        state,
        config,
        env,
        shutdown,
        handle: Some(handle),
    }
}

pub fn http_client() -> reqwest::Client {
    imagegate::app::install_crypto_provider();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client builds")
}

pub fn body(prompt: &str) -> Value {
    json!({"model": MODEL, "prompt": prompt, "size": "1024x1024", "n": 1})
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin_addr, path)
    }

    pub fn base_url(&self) -> String {
        self.url("/v1")
    }

    /// GETs an admin route with the admin token; returns the JSON.
    pub async fn admin_json(&self, path: &str) -> Value {
        let response = self
            .http
            .get(self.admin_url(path))
            .bearer_auth(&self.admin_token)
            .send()
            .await
            .expect("admin request is sent");
        assert_eq!(response.status(), 200, "{path}");
        response.json().await.expect("admin JSON")
    }

    /// POSTs `body` as JSON with team-a's key.
    pub async fn generate(&self, body: &Value) -> reqwest::Response {
        self.generate_as(&self.client_key, body).await
    }

    pub async fn generate_as(&self, key: &str, body: &Value) -> reqwest::Response {
        self.http
            .post(self.url("/v1/images/generations"))
            .bearer_auth(key)
            .json(body)
            .send()
            .await
            .expect("request is sent")
    }

    /// Reloads the gateway in-process with the start config changed by `tweak`: what
    /// `SIGHUP` does after re-reading the file.
    pub fn reload_with(&self, tweak: impl FnOnce(&mut Config)) {
        let mut config = self.config.clone();
        tweak(&mut config);
        self.state
            .reload(config, &self.env)
            .expect("the reloaded config is valid");
    }

    pub fn begin_shutdown(&self) {
        self.shutdown.cancel();
    }

    pub async fn join(mut self) -> anyhow::Result<()> {
        match self.handle.take() {
            Some(handle) => handle.await.expect("app task does not panic"),
            None => Ok(()),
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Polls `condition` every 10 ms until it holds, for state that changes with no event to
/// wait on (the mock's counters, the gateway's queue); fails the test after `within`.
pub async fn wait_until(what: &str, within: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Reads an error response and checks it is OpenAI-shaped; returns `error`.
pub async fn error_body(response: reqwest::Response) -> Value {
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    assert!(
        content_type.starts_with("application/json"),
        "content-type {content_type}"
    );
    let json: Value = response.json().await.expect("error body is JSON");
    let error = json
        .get("error")
        .unwrap_or_else(|| panic!("no `error` in {json}"));
    for key in ["message", "type", "param", "code"] {
        assert!(error.get(key).is_some(), "error lacks `{key}`: {json}");
    }
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "empty message: {json}"
    );
    error.clone()
}
