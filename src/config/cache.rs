//! `[cache]`: the response cache.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheScope {
    /// Entries are per client: one team never receives another team's image.
    Client,
    /// Entries are shared by every client.
    Shared,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    pub enabled: bool,
    pub scope: CacheScope,
    /// Entry lifetime; below every upstream's `url_lifetime_secs` (validated), so the image
    /// URLs in a cached answer still work when it is served.
    pub ttl_secs: u64,
    /// Bound on the stored response bytes.
    pub max_bytes: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            enabled: true,
            scope: CacheScope::Client,
            ttl_secs: 600,
            max_bytes: 256 * 1024 * 1024,
        }
    }
}
