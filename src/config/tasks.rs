//! `[tasks]`: asynchronous generation tasks.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct TasksConfig {
    /// How long a finished task and its result are kept.
    pub ttl_secs: u64,
    /// Bound on tasks waiting for a worker.
    pub max_queued: usize,
    /// Tasks processed at once.
    pub workers: usize,
    /// A native-mode task the upstream has not finished after this long fails (and is
    /// refunded).
    pub native_timeout_secs: u64,
}

impl Default for TasksConfig {
    fn default() -> Self {
        TasksConfig {
            ttl_secs: 86_400,
            max_queued: 10_000,
            workers: 64,
            native_timeout_secs: 3_600,
        }
    }
}
