//! `imagegate demo`: the gateway in front of a built-in mock upstream, on a machine with no
//! network and no config. The config is built here in code; nothing is written to disk.

use std::net::SocketAddr;
use std::time::Duration;

use crate::app::App;
use crate::auth::key_digest_hex;
use crate::config::{
    ClientConfig, Config, Env, LogFormat, ModelConfig, StorageBackend, UpstreamConfig,
    UpstreamKeyConfig,
};
use crate::mock_upstream::{MockOptions, MockUpstream};

/// The documented demo client key.
pub const DEMO_CLIENT_KEY: &str = "sk-demo";
/// The demo's admin token (for `/admin` on the admin listener).
pub const DEMO_ADMIN_TOKEN: &str = "sk-demo-admin";
pub const DEMO_MODEL: &str = "gemini-3.1-flash-image";

const UPSTREAM_KEY_VAR: &str = "IMAGEGATE_DEMO_UPSTREAM_KEY";
const ADMIN_TOKEN_VAR: &str = "IMAGEGATE_DEMO_ADMIN_TOKEN";

/// The demo's config and the env holding its secrets, for an upstream at `upstream_base_url`.
pub fn config(
    upstream_base_url: &str,
    listen: SocketAddr,
    admin_listen: SocketAddr,
) -> (Config, Env) {
    let mut config = Config::default();
    config.server.listen = listen;
    config.server.admin_listen = admin_listen;
    config.server.shutdown_grace_secs = 5;
    config.storage.backend = StorageBackend::Memory;
    config.log.format = LogFormat::Pretty;
    config.admin.token_env = Some(ADMIN_TOKEN_VAR.to_owned());
    let mut upstream = UpstreamConfig::new("mock", upstream_base_url);
    upstream.timeout_secs = 60;
    let mut key = UpstreamKeyConfig::from_env("mock-key-1", UPSTREAM_KEY_VAR);
    key.requests_per_minute = 600;
    key.max_concurrent = 64;
    upstream.keys.push(key);
    config.upstreams.push(upstream);
    config.models.push(ModelConfig::new(DEMO_MODEL, &["mock"]));
    config
        .clients
        .push(ClientConfig::new("demo", &key_digest_hex(DEMO_CLIENT_KEY)));
    // The mock's "real" key is random per run: it exists only to show that the client never
    // sees or sends it.
    let upstream_key = format!("sk-upstream-{}", hex::encode(rand::random::<[u8; 16]>()));
    let env = Env::from_pairs([
        (UPSTREAM_KEY_VAR, upstream_key.as_str()),
        (ADMIN_TOKEN_VAR, DEMO_ADMIN_TOKEN),
    ]);
    (config, env)
}

/// Starts the mock upstream and the gateway, prints how to try it, and serves until `shutdown`.
pub async fn run(
    listen: SocketAddr,
    admin_listen: SocketAddr,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let mock = MockUpstream::start(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        MockOptions {
            latency: Duration::from_millis(300),
            ..MockOptions::default()
        },
    )
    .await?;
    let (config, env) = config(&mock.base_url(), listen, admin_listen);
    let app = App::build(config, &env).await?;
    println!("{}", banner(app.public_addr(), app.admin_addr()));
    let result = app.run(shutdown).await;
    mock.shutdown().await;
    result
}

fn banner(public: SocketAddr, admin: SocketAddr) -> String {
    format!(
        r#"
imagegate demo: the gateway on http://{public}, in front of a built-in mock upstream.
Client key: {DEMO_CLIENT_KEY}
Admin listener: http://{admin} (/healthz, /readyz, /metrics; /admin/usage and /admin/upstreams
with 'Authorization: Bearer {DEMO_ADMIN_TOKEN}')
Dashboard: http://{admin}/admin/ (sign in with the admin token {DEMO_ADMIN_TOKEN})

Try it with curl:

  curl http://{public}/v1/images/generations \
    -H "Authorization: Bearer {DEMO_CLIENT_KEY}" \
    -H "Content-Type: application/json" \
    -d '{{"model": "{DEMO_MODEL}", "prompt": "A cozy coffee shop interior with warm lighting and bookshelves", "size": "1024x1024", "n": 1}}'

or with the OpenAI Python SDK (pip install openai):

  from openai import OpenAI
  client = OpenAI(base_url="http://{public}/v1", api_key="{DEMO_CLIENT_KEY}")
  response = client.images.generate(
      model="{DEMO_MODEL}",
      prompt="A cozy coffee shop interior with warm lighting and bookshelves",
      size="1024x1024",
      n=1,
  )
  print(response.data[0].url)

Ctrl-C stops it.
"#
    )
}
