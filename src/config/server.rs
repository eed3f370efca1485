//! `[server]` and `[admin]`: listeners, HTTP limits, shutdown, the admin token.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Public listener: the OpenAI-compatible API.
    pub listen: SocketAddr,
    /// Admin listener: health, readiness, metrics, /admin.
    pub admin_listen: SocketAddr,
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    /// Whole-request deadline; must exceed every upstream's `timeout_secs`.
    pub request_timeout_secs: u64,
    /// How long a connection may take to send its request headers (slow-loris guard), and
    /// how long a new connection may stay silent before its first byte.
    pub header_read_timeout_secs: u64,
    /// How long a client may take to send a request's body once its headers are in.
    pub body_read_timeout_secs: u64,
    /// How long in-flight requests may take to finish after SIGTERM.
    pub shutdown_grace_secs: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
            max_body_bytes: 1024 * 1024,
            request_timeout_secs: 300,
            header_read_timeout_secs: 10,
            body_read_timeout_secs: 30,
            shutdown_grace_secs: 30,
        }
    }
}

impl ServerConfig {
    pub fn body_read_timeout(&self) -> Duration {
        Duration::from_secs(self.body_read_timeout_secs)
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Env var holding the admin bearer token.
    pub token_env: Option<String>,
    /// Or a file holding it (e.g. a mounted Kubernetes secret). Takes precedence over `token_env`.
    pub token_file: Option<PathBuf>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            token_env: Some("IMAGEGATE_ADMIN_TOKEN".to_owned()),
            token_file: None,
        }
    }
}
