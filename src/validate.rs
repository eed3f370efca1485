//! Every rule a generation request must pass, and the only constructor of [`ValidRequest`].
//!
//! The body arrives as a JSON object (the HTTP layer has already refused non-JSON, non-objects
//! and oversize bodies). Each field is checked by hand rather than by a derived `Deserialize` so
//! that every refusal names its field (`param`) and says what was expected, and so that unknown
//! fields are refused instead of passed through to the upstream. `null` means "use the
//! default" for every optional field, as in OpenAI's published schema.
//!
//! A [`ValidRequest`] holds the normalised values that will be forwarded (defaults filled in),
//! which is also what the cache key is computed from.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::{Map, Value};

use crate::auth::Client;
use crate::config::{Config, ModelConfig};
use crate::error::ApiError;

/// A configured model: its rules and the upstreams (indexes into `config.upstreams`) that serve it.
#[derive(Debug)]
pub struct ModelRoute {
    pub rules: ModelConfig,
    pub upstreams: Vec<usize>,
}

impl ModelRoute {
    pub fn name(&self) -> &str {
        &self.rules.name
    }

    /// Price of one image at `quality`, in budget units.
    pub fn price(&self, quality: &str) -> f64 {
        self.rules
            .price_per_image
            .get(quality)
            .copied()
            .unwrap_or(0.0)
    }
}

/// The configured models, by the name clients send.
#[derive(Debug, Default)]
pub struct Models {
    by_name: HashMap<String, Arc<ModelRoute>>,
    ordered: Vec<Arc<ModelRoute>>,
}

impl Models {
    pub fn from_config(config: &Config) -> Self {
        let mut models = Models::default();
        for m in &config.models {
            let upstreams = if m.upstreams.is_empty() {
                (0..config.upstreams.len()).collect()
            } else {
                m.upstreams
                    .iter()
                    .filter_map(|name| config.upstreams.iter().position(|u| &u.name == name))
                    .collect()
            };
            let route = Arc::new(ModelRoute {
                rules: m.clone(),
                upstreams,
            });
            models.by_name.insert(m.name.clone(), Arc::clone(&route));
            models.ordered.push(route);
        }
        models
    }

    pub fn get(&self, name: &str) -> Option<&Arc<ModelRoute>> {
        self.by_name.get(name)
    }

    /// Models in config order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<ModelRoute>> {
        self.ordered.iter()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseFormat {
    Url,
    B64Json,
}

impl ResponseFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            ResponseFormat::Url => "url",
            ResponseFormat::B64Json => "b64_json",
        }
    }
}

/// Proof that a request passed every rule. Only [`validate`] can build one (the private
/// `Sealed` field), and the upstream call takes one, so nothing unvalidated reaches a provider.
#[derive(Debug, Clone)]
pub struct ValidRequest {
    pub model: Arc<ModelRoute>,
    pub prompt: String,
    pub size: String,
    pub quality: String,
    pub n: u32,
    pub response_format: ResponseFormat,
    pub style: Option<String>,
    pub user: Option<String>,
    pub background: Option<String>,
    pub output_format: Option<String>,
    pub output_compression: Option<u8>,
    pub moderation: Option<String>,
    /// imagegate's own flag; never forwarded.
    pub is_async: bool,
    _sealed: Sealed,
}

#[derive(Debug, Clone)]
struct Sealed;

/// Fields a request may carry. Anything else is refused by name.
const KNOWN_FIELDS: &[&str] = &[
    "model",
    "prompt",
    "size",
    "quality",
    "n",
    "response_format",
    "async",
    "style",
    "user",
    "background",
    "output_format",
    "output_compression",
    "moderation",
    "stream",
    "partial_images",
];

const MAX_USER_CHARS: usize = 256;

/// Checks `body` against the model's rules and the client's rights.
pub fn validate(
    body: &Map<String, Value>,
    models: &Models,
    client: &Client,
) -> Result<ValidRequest, ApiError> {
    if let Some(unknown) = body.keys().find(|k| !KNOWN_FIELDS.contains(&k.as_str())) {
        let shown: String = unknown.chars().take(64).collect();
        return Err(ApiError::invalid_request(
            format!("Unrecognized request argument supplied: {shown}"),
            Some(&shown),
        ));
    }

    let model_name = match body.get("model") {
        Some(Value::String(s)) if !s.is_empty() => s.as_str(),
        None | Some(Value::Null) => return Err(missing("model")),
        Some(Value::String(_)) => {
            return Err(ApiError::invalid_request(
                "model must not be empty",
                Some("model"),
            ));
        }
        Some(_) => return Err(wrong_type("model", "a string")),
    };
    let model = match models.get(model_name) {
        Some(m) if client.may_use(model_name) => Arc::clone(m),
        _ => return Err(ApiError::model_not_found(model_name)),
    };
    let rules = &model.rules;

    let prompt = match body.get("prompt") {
        Some(Value::String(s)) => s,
        None | Some(Value::Null) => return Err(missing("prompt")),
        Some(_) => return Err(wrong_type("prompt", "a string")),
    };
    if prompt.trim().is_empty() {
        return Err(ApiError::invalid_request(
            "prompt must not be empty",
            Some("prompt"),
        ));
    }
    let chars = prompt.chars().count();
    if chars > rules.max_prompt_chars {
        return Err(ApiError::invalid_request(
            format!(
                "prompt is {chars} characters long; the maximum for {} is {}",
                rules.name, rules.max_prompt_chars
            ),
            Some("prompt"),
        ));
    }

    let size = one_of(body, "size", &rules.sizes, "1024x1024", &rules.name)?;
    let quality = one_of(body, "quality", &rules.qualities, "standard", &rules.name)?;
    let response_format = match one_of(
        body,
        "response_format",
        &rules.response_formats,
        "url",
        &rules.name,
    )?
    .as_str()
    {
        "b64_json" => ResponseFormat::B64Json,
        _ => ResponseFormat::Url,
    };

    let n = match body.get("n") {
        None | Some(Value::Null) => 1,
        Some(Value::Number(num)) if num.is_i64() || num.is_u64() => match num.as_u64() {
            Some(v) if (1..=u64::from(rules.max_n)).contains(&v) => v as u32,
            _ => {
                return Err(ApiError::invalid_request(
                    format!("n must be between 1 and {} for {}", rules.max_n, rules.name),
                    Some("n"),
                ));
            }
        },
        Some(_) => return Err(wrong_type("n", "an integer")),
    };

    let is_async = optional_bool(body, "async")?.unwrap_or(false);
    if optional_bool(body, "stream")?.unwrap_or(false) {
        return Err(ApiError::invalid_request(
            "stream: true is not supported yet; omit it or send false",
            Some("stream"),
        ));
    }
    match body.get("partial_images") {
        None | Some(Value::Null) => {}
        Some(Value::Number(n)) if n.as_u64() == Some(0) => {}
        Some(_) => {
            return Err(ApiError::invalid_request(
                "partial_images is only meaningful with streaming, which is not supported yet; omit it or send 0",
                Some("partial_images"),
            ));
        }
    }

    let user = match body.get("user") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.chars().count() <= MAX_USER_CHARS => Some(s.clone()),
        Some(Value::String(_)) => {
            return Err(ApiError::invalid_request(
                format!("user must be at most {MAX_USER_CHARS} characters"),
                Some("user"),
            ));
        }
        Some(_) => return Err(wrong_type("user", "a string")),
    };
    let style = optional_one_of(body, "style", &rules.styles, &rules.name)?;
    let background = optional_one_of(body, "background", &rules.backgrounds, &rules.name)?;
    let output_format = optional_one_of(body, "output_format", &rules.output_formats, &rules.name)?;
    let moderation = optional_one_of(body, "moderation", &rules.moderations, &rules.name)?;
    let output_compression = match body.get("output_compression") {
        None | Some(Value::Null) => None,
        Some(_) if rules.output_formats.is_empty() => {
            return Err(unsupported("output_compression", &rules.name));
        }
        Some(Value::Number(n)) => match n.as_u64() {
            Some(v) if v <= 100 => Some(v as u8),
            _ => {
                return Err(ApiError::invalid_request(
                    "output_compression must be an integer between 0 and 100",
                    Some("output_compression"),
                ));
            }
        },
        Some(_) => return Err(wrong_type("output_compression", "an integer")),
    };

    Ok(ValidRequest {
        prompt: prompt.clone(),
        size,
        quality,
        n,
        response_format,
        style,
        user,
        background,
        output_format,
        output_compression,
        moderation,
        is_async,
        model,
        _sealed: Sealed,
    })
}

fn missing(field: &str) -> ApiError {
    ApiError::invalid_request(
        format!("Missing required parameter: '{field}'."),
        Some(field),
    )
}

fn wrong_type(field: &str, expected: &str) -> ApiError {
    ApiError::invalid_request(
        format!("Invalid type for '{field}': expected {expected}."),
        Some(field),
    )
}

fn unsupported(field: &str, model: &str) -> ApiError {
    ApiError::invalid_request(
        format!("'{field}' is not supported for model {model}."),
        Some(field),
    )
}

fn optional_bool(body: &Map<String, Value>, field: &str) -> Result<Option<bool>, ApiError> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(wrong_type(field, "a boolean")),
    }
}

/// A string field that must be one of `allowed`, with a default.
fn one_of(
    body: &Map<String, Value>,
    field: &str,
    allowed: &[String],
    default: &str,
    model: &str,
) -> Result<String, ApiError> {
    let value = match body.get(field) {
        None | Some(Value::Null) => {
            // The documented default, or the model's first allowed value if the operator
            // configured a model that does not allow the default.
            return Ok(if allowed.iter().any(|a| a == default) {
                default.to_owned()
            } else {
                allowed
                    .first()
                    .cloned()
                    .unwrap_or_else(|| default.to_owned())
            });
        }
        Some(Value::String(s)) => s,
        Some(_) => return Err(wrong_type(field, "a string")),
    };
    if allowed.iter().any(|a| a == value) {
        Ok(value.clone())
    } else {
        let shown: String = value.chars().take(64).collect();
        Err(ApiError::invalid_request(
            format!(
                "Invalid value for '{field}': '{shown}'. Supported values for {model} are: {}.",
                allowed.join(", ")
            ),
            Some(field),
        ))
    }
}

/// An optional OpenAI field: refused unless the model's rules list allowed values for it.
fn optional_one_of(
    body: &Map<String, Value>,
    field: &str,
    allowed: &[String],
    model: &str,
) -> Result<Option<String>, ApiError> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(_) if allowed.is_empty() => Err(unsupported(field, model)),
        Some(_) => one_of(body, field, allowed, "", model).map(Some),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{ClientKeys, key_digest_hex};
    use crate::config::ClientConfig;
    use serde_json::json;

    fn setup() -> (Models, ClientKeys) {
        let mut config = Config::default();
        let mut m = ModelConfig::new("img", &[]);
        m.max_prompt_chars = 5;
        m.styles = vec!["vivid".into()];
        config.models.push(m);
        config.models.push(ModelConfig::new("other", &[]));
        let mut c = ClientConfig::new("c", &key_digest_hex("k"));
        c.models = vec!["img".into()];
        config.clients.push(c);
        (
            Models::from_config(&config),
            ClientKeys::from_config(&config),
        )
    }

    fn check(body: Value) -> Result<ValidRequest, ApiError> {
        let (models, keys) = setup();
        let client = keys.authenticate(Some(b"Bearer k")).unwrap();
        validate(body.as_object().unwrap(), &models, &client)
    }

    #[test]
    fn defaults_are_filled_in() {
        let v = check(json!({"model": "img", "prompt": "cat", "size": null})).unwrap();
        assert_eq!(
            (v.size.as_str(), v.quality.as_str(), v.n),
            ("1024x1024", "standard", 1)
        );
        assert_eq!(v.response_format, ResponseFormat::Url);
        assert!(!v.is_async);
    }

    #[test]
    fn prompt_length_counts_unicode_scalar_values() {
        assert!(check(json!({"model": "img", "prompt": "ééééé"})).is_ok());
        let err = check(json!({"model": "img", "prompt": "éééééé"})).unwrap_err();
        assert_eq!(err.param(), Some("prompt"));
    }

    #[test]
    fn n_must_be_an_integer_in_range() {
        for (n, _) in [
            (json!(0), ()),
            (json!(-1), ()),
            (json!(5), ()),
            (json!(2.5), ()),
            (json!("2"), ()),
        ] {
            let err = check(json!({"model": "img", "prompt": "a", "n": n})).unwrap_err();
            assert_eq!(err.param(), Some("n"), "{n}");
        }
        assert_eq!(
            check(json!({"model": "img", "prompt": "a", "n": 4}))
                .unwrap()
                .n,
            4
        );
    }

    #[test]
    fn model_the_client_may_not_use_is_not_found() {
        let err = check(json!({"model": "other", "prompt": "a"})).unwrap_err();
        assert_eq!(err.code(), Some("model_not_found"));
        assert_eq!(err.status().as_u16(), 404);
    }

    #[test]
    fn unknown_field_is_refused_by_name() {
        let err =
            check(json!({"model": "img", "prompt": "a", "api_base": "http://evil"})).unwrap_err();
        assert_eq!(err.param(), Some("api_base"));
    }

    #[test]
    fn optional_openai_fields_follow_the_model_rules() {
        assert_eq!(
            check(json!({"model": "img", "prompt": "a", "style": "vivid"}))
                .unwrap()
                .style
                .as_deref(),
            Some("vivid")
        );
        assert_eq!(
            check(json!({"model": "img", "prompt": "a", "style": "natural"}))
                .unwrap_err()
                .param(),
            Some("style")
        );
        assert_eq!(
            check(json!({"model": "img", "prompt": "a", "background": "transparent"}))
                .unwrap_err()
                .param(),
            Some("background")
        );
    }

    #[test]
    fn stream_true_is_refused_but_false_is_fine() {
        assert!(
            check(json!({"model": "img", "prompt": "a", "stream": false, "partial_images": 0}))
                .is_ok()
        );
        assert_eq!(
            check(json!({"model": "img", "prompt": "a", "stream": true}))
                .unwrap_err()
                .param(),
            Some("stream")
        );
    }
}
