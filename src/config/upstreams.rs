//! `[[upstreams]]`: OpenAI-compatible providers and their key pools.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Who runs `async: true` requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskMode {
    /// imagegate runs the request in its own worker pool.
    Gateway,
    /// The upstream's own async flag and `/v1/tasks/{id}`.
    Native,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    pub name: String,
    /// OpenAI-compatible base, up to and including `/v1`.
    pub base_url: String,
    #[serde(default = "default_timeout_secs")]
    pub timeout_secs: u64,
    #[serde(default = "default_connect_timeout_secs")]
    pub connect_timeout_secs: u64,
    #[serde(default = "default_max_retries")]
    pub max_retries: u32,
    #[serde(default = "default_task_mode")]
    pub tasks: TaskMode,
    /// Responses larger than this are refused (502) instead of buffered.
    #[serde(default = "default_max_response_bytes")]
    pub max_response_bytes: usize,
    /// Requests waiting for a key when every key is busy; more are refused with 503.
    #[serde(default = "default_max_queue")]
    pub max_queue: usize,
    /// Longest wait for a key before 503 `upstream_busy`.
    #[serde(default = "default_queue_timeout_secs")]
    pub queue_timeout_secs: u64,
    /// How long the image URLs in this upstream's `url` answers stay fetchable. The cache's
    /// `ttl_secs` must stay below it (see `Config::check_cache_ttl`).
    #[serde(default = "default_url_lifetime_secs")]
    pub url_lifetime_secs: u64,
    #[serde(default)]
    pub keys: Vec<UpstreamKeyConfig>,
}

fn default_max_queue() -> usize {
    1000
}
/// Signed or temporary image URLs of OpenAI-compatible providers typically live an hour
/// (OpenAI's own DALL·E URLs do); relays rarely keep them longer.
fn default_url_lifetime_secs() -> u64 {
    3600
}
fn default_queue_timeout_secs() -> u64 {
    30
}

impl UpstreamConfig {
    /// An upstream with every setting at its default and no keys yet.
    pub fn new(name: &str, base_url: &str) -> Self {
        UpstreamConfig {
            name: name.to_owned(),
            base_url: base_url.to_owned(),
            timeout_secs: default_timeout_secs(),
            connect_timeout_secs: default_connect_timeout_secs(),
            max_retries: default_max_retries(),
            tasks: default_task_mode(),
            max_response_bytes: default_max_response_bytes(),
            max_queue: default_max_queue(),
            queue_timeout_secs: default_queue_timeout_secs(),
            url_lifetime_secs: default_url_lifetime_secs(),
            keys: Vec::new(),
        }
    }
}

impl UpstreamKeyConfig {
    /// A key read from env var `env`, with default limits.
    pub fn from_env(id: &str, env: &str) -> Self {
        UpstreamKeyConfig {
            id: id.to_owned(),
            env: Some(env.to_owned()),
            file: None,
            requests_per_minute: default_key_rpm(),
            max_concurrent: default_key_concurrency(),
        }
    }
}

fn default_timeout_secs() -> u64 {
    180
}
fn default_connect_timeout_secs() -> u64 {
    5
}
fn default_max_retries() -> u32 {
    2
}
fn default_task_mode() -> TaskMode {
    TaskMode::Gateway
}
fn default_max_response_bytes() -> usize {
    64 * 1024 * 1024
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamKeyConfig {
    /// Shown in logs, metrics and /admin instead of the key.
    pub id: String,
    /// Env var holding the key.
    pub env: Option<String>,
    /// Or a file holding it.
    pub file: Option<PathBuf>,
    /// What the upstream allows this key per minute; imagegate never exceeds it.
    #[serde(default = "default_key_rpm")]
    pub requests_per_minute: u32,
    /// Requests in flight on this key at once.
    #[serde(default = "default_key_concurrency")]
    pub max_concurrent: u32,
}

fn default_key_rpm() -> u32 {
    60
}
fn default_key_concurrency() -> u32 {
    8
}
