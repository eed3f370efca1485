//! `[client_defaults]` and `[[clients]]`: who may call, with which limits.

use serde::{Deserialize, Serialize};

/// Limits every client has unless its own entry overrides them.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClientLimits {
    pub requests_per_minute: u32,
    /// A request costs `n` images.
    pub images_per_minute: u32,
    /// Requests in flight at once.
    pub max_concurrent: u32,
    /// UTC day.
    pub images_per_day: u64,
    /// UTC calendar month.
    pub images_per_month: u64,
    /// In the price units of `models.price_per_image`; absent means no budget.
    pub budget_per_month: Option<f64>,
    /// Whether this client's responses use the cache.
    pub cache: bool,
}

impl Default for ClientLimits {
    fn default() -> Self {
        ClientLimits {
            requests_per_minute: 60,
            images_per_minute: 30,
            max_concurrent: 8,
            images_per_day: 1000,
            images_per_month: 20_000,
            budget_per_month: None,
            cache: true,
        }
    }
}

/// One key digest, or several while a key is being rotated.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(untagged)]
pub enum KeyDigests {
    One(String),
    Many(Vec<String>),
}

impl KeyDigests {
    pub fn iter(&self) -> impl Iterator<Item = &str> {
        let slice: &[String] = match self {
            KeyDigests::One(one) => std::slice::from_ref(one),
            KeyDigests::Many(many) => many,
        };
        slice.iter().map(String::as_str)
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// Stable name used in logs, metrics and usage reports.
    pub id: String,
    /// Hex SHA-256 of the client's key (`imagegate keygen` prints it); a list while rotating.
    pub key_sha256: KeyDigests,
    /// Models this client may use; empty means all.
    #[serde(default)]
    pub models: Vec<String>,
    pub requests_per_minute: Option<u32>,
    pub images_per_minute: Option<u32>,
    pub max_concurrent: Option<u32>,
    pub images_per_day: Option<u64>,
    pub images_per_month: Option<u64>,
    pub budget_per_month: Option<f64>,
    pub cache: Option<bool>,
}

impl ClientConfig {
    /// A client with one key digest and no overrides.
    pub fn new(id: &str, key_sha256: &str) -> Self {
        ClientConfig {
            id: id.to_owned(),
            key_sha256: KeyDigests::One(key_sha256.to_owned()),
            models: Vec::new(),
            requests_per_minute: None,
            images_per_minute: None,
            max_concurrent: None,
            images_per_day: None,
            images_per_month: None,
            budget_per_month: None,
            cache: None,
        }
    }

    /// This client's effective limits: its own values over the defaults.
    pub fn limits(&self, defaults: &ClientLimits) -> ClientLimits {
        ClientLimits {
            requests_per_minute: self
                .requests_per_minute
                .unwrap_or(defaults.requests_per_minute),
            images_per_minute: self.images_per_minute.unwrap_or(defaults.images_per_minute),
            max_concurrent: self.max_concurrent.unwrap_or(defaults.max_concurrent),
            images_per_day: self.images_per_day.unwrap_or(defaults.images_per_day),
            images_per_month: self.images_per_month.unwrap_or(defaults.images_per_month),
            budget_per_month: self.budget_per_month.or(defaults.budget_per_month),
            cache: self.cache.unwrap_or(defaults.cache),
        }
    }
}
