//! `[storage]`: where durable state (usage ledger, tasks) lives.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageBackend {
    /// One embedded SQLite file (the default).
    Sqlite,
    /// Nothing persists; for the demo and tests.
    Memory,
    /// Shared state for several replicas.
    Redis,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    pub backend: StorageBackend,
    /// SQLite file; created with its directory on first start.
    pub path: PathBuf,
    /// Env var holding the Redis URL (backend = "redis").
    pub url_env: Option<String>,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            backend: StorageBackend::Sqlite,
            path: PathBuf::from("imagegate-data/imagegate.db"),
            url_env: None,
        }
    }
}
