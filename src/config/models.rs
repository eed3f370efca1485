//! `[[models]]`: what clients may ask for, and which upstreams serve it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// The name clients send as `model`.
    pub name: String,
    /// Upstreams in failover order; empty means every upstream in file order.
    #[serde(default)]
    pub upstreams: Vec<String>,
    /// The name sent upstream; defaults to `name`.
    pub upstream_model: Option<String>,
    #[serde(default = "default_sizes")]
    pub sizes: Vec<String>,
    #[serde(default = "default_qualities")]
    pub qualities: Vec<String>,
    #[serde(default = "default_response_formats")]
    pub response_formats: Vec<String>,
    #[serde(default = "default_max_n")]
    pub max_n: u32,
    /// Counted in Unicode scalar values, as OpenAI documents its limits.
    #[serde(default = "default_max_prompt_chars")]
    pub max_prompt_chars: usize,
    /// Price of one image per quality, in budget units. A quality without a price costs 0.
    #[serde(default)]
    pub price_per_image: BTreeMap<String, f64>,
    /// Allowed `style` values; empty means the field is refused for this model.
    #[serde(default)]
    pub styles: Vec<String>,
    /// Allowed `background` values; empty means refused.
    #[serde(default)]
    pub backgrounds: Vec<String>,
    /// Allowed `output_format` values; empty means refused (and so is `output_compression`).
    #[serde(default)]
    pub output_formats: Vec<String>,
    /// Allowed `moderation` values; empty means refused.
    #[serde(default)]
    pub moderations: Vec<String>,
}

fn default_sizes() -> Vec<String> {
    ["1024x1024", "1536x1024", "1024x1536"]
        .map(String::from)
        .to_vec()
}
fn default_qualities() -> Vec<String> {
    ["standard", "hd"].map(String::from).to_vec()
}
fn default_response_formats() -> Vec<String> {
    ["url", "b64_json"].map(String::from).to_vec()
}
fn default_max_n() -> u32 {
    4
}
fn default_max_prompt_chars() -> usize {
    4000
}

impl ModelConfig {
    /// A model with every rule at its default, serving from `upstreams`.
    pub fn new(name: &str, upstreams: &[&str]) -> Self {
        ModelConfig {
            name: name.to_owned(),
            upstreams: upstreams.iter().map(|s| (*s).to_owned()).collect(),
            upstream_model: None,
            sizes: default_sizes(),
            qualities: default_qualities(),
            response_formats: default_response_formats(),
            max_n: default_max_n(),
            max_prompt_chars: default_max_prompt_chars(),
            price_per_image: BTreeMap::new(),
            styles: Vec::new(),
            backgrounds: Vec::new(),
            output_formats: Vec::new(),
            moderations: Vec::new(),
        }
    }

    pub fn upstream_model(&self) -> &str {
        self.upstream_model.as_deref().unwrap_or(&self.name)
    }
}
