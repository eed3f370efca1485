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
    #[serde(default)]
    pub keys: Vec<UpstreamKeyConfig>,
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
