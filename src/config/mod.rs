//! Typed configuration: the TOML file, `IMAGEGATE__SECTION__KEY` env overrides, and the
//! secrets the file names. This module is the only reader of process env and config files
//! (see [`Env`]); everything else receives a validated [`Config`].
//!
//! Every key has a default except the few that cannot (an upstream's `name` and `base_url`, a
//! model's `name`, a client's `id` and `key_sha256`). Unknown keys are errors that name their
//! path, so a typo never silently falls back to a default.

mod cache;
mod clients;
mod env;
mod log;
mod models;
mod server;
mod storage;
mod tasks;
mod upstreams;

use std::collections::HashSet;
use std::path::Path;

use secrecy::SecretString;
use serde::{Deserialize, Serialize};

pub use cache::{CacheConfig, CacheScope};
pub use clients::{ClientConfig, ClientLimits, KeyDigests};
pub use env::Env;
pub use log::{LogConfig, LogFormat, PromptLogging};
pub use models::ModelConfig;
pub use server::{AdminConfig, ServerConfig};
pub use storage::{StorageBackend, StorageConfig};
pub use tasks::TasksConfig;
pub use upstreams::{TaskMode, UpstreamConfig, UpstreamKeyConfig};

/// The whole configuration file.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub admin: AdminConfig,
    pub storage: StorageConfig,
    pub log: LogConfig,
    pub cache: CacheConfig,
    pub tasks: TasksConfig,
    pub upstreams: Vec<UpstreamConfig>,
    pub models: Vec<ModelConfig>,
    pub client_defaults: ClientLimits,
    pub clients: Vec<ClientConfig>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("config is not valid TOML: {0}")]
    Syntax(String),
    #[error("invalid config at `{path}`: {reason}")]
    Invalid { path: String, reason: String },
    #[error("invalid env override {var}: {reason}")]
    Override { var: String, reason: String },
    #[error("secret for {what}: {reason}")]
    Secret { what: String, reason: String },
}

fn invalid(path: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        path: path.into(),
        reason: reason.into(),
    }
}

/// Whether one secret the config names can be resolved.
#[derive(Debug)]
pub struct SecretStatus {
    pub what: String,
    pub set: bool,
    /// A missing required secret stops the gateway from starting.
    pub required: bool,
}

/// The secrets a config names, resolved.
pub struct Secrets {
    /// `upstream_keys[u][k]` is the key of `config.upstreams[u].keys[k]`.
    pub upstream_keys: Vec<Vec<SecretString>>,
    /// `None` when no admin token is configured: the `/admin` routes then refuse everyone.
    pub admin_token: Option<SecretString>,
}

impl Config {
    /// Reads `path`, applies env overrides from `env`, and validates.
    pub fn load(path: &Path, env: &Env) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Config::from_toml(&text, env)
    }

    /// Parses TOML text, applies env overrides from `env`, and validates.
    pub fn from_toml(text: &str, env: &Env) -> Result<Config, ConfigError> {
        let mut table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| ConfigError::Syntax(e.to_string()))?;
        env.apply_overrides(&mut table)?;
        let config: Config =
            serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
                let path = e.path().to_string();
                invalid(
                    if path == "." { String::new() } else { path },
                    e.into_inner().to_string(),
                )
            })?;
        config.validate()?;
        Ok(config)
    }

    /// Cross-field rules serde cannot express. Every error names the key it is about.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let s = &self.server;
        for (key, v) in [
            ("server.request_timeout_secs", s.request_timeout_secs),
            (
                "server.header_read_timeout_secs",
                s.header_read_timeout_secs,
            ),
            ("server.body_read_timeout_secs", s.body_read_timeout_secs),
        ] {
            if v == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        if s.max_body_bytes < 1024 {
            return Err(invalid("server.max_body_bytes", "must be at least 1024"));
        }
        for (key, v) in [
            ("tasks.workers", self.tasks.workers as u64),
            ("tasks.max_queued", self.tasks.max_queued as u64),
            ("tasks.ttl_secs", self.tasks.ttl_secs),
            ("tasks.native_timeout_secs", self.tasks.native_timeout_secs),
        ] {
            if v == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        if self.cache.enabled && self.cache.ttl_secs == 0 {
            return Err(invalid(
                "cache.ttl_secs",
                "must be at least 1 when the cache is enabled",
            ));
        }
        if self.upstreams.is_empty() {
            return Err(invalid(
                "upstreams",
                "at least one [[upstreams]] entry is required",
            ));
        }
        let mut names = HashSet::new();
        for (i, u) in self.upstreams.iter().enumerate() {
            let at = format!("upstreams[{i}]");
            if u.name.is_empty() || !names.insert(u.name.as_str()) {
                return Err(invalid(
                    format!("{at}.name"),
                    format!("`{}` is empty or not unique", u.name),
                ));
            }
            let url = reqwest::Url::parse(&u.base_url)
                .map_err(|e| invalid(format!("{at}.base_url"), e.to_string()))?;
            if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
                return Err(invalid(
                    format!("{at}.base_url"),
                    "must be an http(s) URL with a host",
                ));
            }
            if !url.username().is_empty() || url.password().is_some() || url.query().is_some() {
                return Err(invalid(
                    format!("{at}.base_url"),
                    "must not carry credentials or a query; keys belong in [[upstreams.keys]]",
                ));
            }
            if u.url_lifetime_secs == 0 {
                return Err(invalid(
                    format!("{at}.url_lifetime_secs"),
                    "must be at least 1",
                ));
            }
            if u.timeout_secs == 0 || u.connect_timeout_secs == 0 {
                return Err(invalid(
                    format!("{at}.timeout_secs"),
                    "timeouts must be at least 1",
                ));
            }
            if u.timeout_secs >= s.request_timeout_secs {
                return Err(invalid(
                    "server.request_timeout_secs",
                    format!(
                        "({}) must exceed {at}.timeout_secs ({}), or upstream timeouts could never be reported",
                        s.request_timeout_secs, u.timeout_secs
                    ),
                ));
            }
            if u.keys.is_empty() {
                return Err(invalid(
                    format!("{at}.keys"),
                    "at least one [[upstreams.keys]] entry is required",
                ));
            }
            let mut ids = HashSet::new();
            for (k, key) in u.keys.iter().enumerate() {
                let kat = format!("{at}.keys[{k}]");
                if key.id.is_empty() || !ids.insert(key.id.as_str()) {
                    return Err(invalid(
                        format!("{kat}.id"),
                        format!("`{}` is empty or not unique", key.id),
                    ));
                }
                if key.env.is_none() && key.file.is_none() {
                    return Err(invalid(
                        kat,
                        "needs `env` or `file` naming where the key is",
                    ));
                }
                if key.requests_per_minute == 0 || key.max_concurrent == 0 {
                    return Err(invalid(
                        kat,
                        "requests_per_minute and max_concurrent must be at least 1",
                    ));
                }
            }
        }
        if self.cache.enabled {
            self.check_cache_ttl(self.cache.ttl_secs)?;
        }
        if self.models.is_empty() {
            return Err(invalid(
                "models",
                "at least one [[models]] entry is required",
            ));
        }
        let mut model_names = HashSet::new();
        for (i, m) in self.models.iter().enumerate() {
            let at = format!("models[{i}]");
            if m.name.is_empty() || !model_names.insert(m.name.as_str()) {
                return Err(invalid(
                    format!("{at}.name"),
                    format!("`{}` is empty or not unique", m.name),
                ));
            }
            for up in &m.upstreams {
                if !names.contains(up.as_str()) {
                    return Err(invalid(
                        format!("{at}.upstreams"),
                        format!("unknown upstream `{up}`"),
                    ));
                }
            }
            for size in &m.sizes {
                if size != "auto" && parse_size(size).is_none() {
                    return Err(invalid(
                        format!("{at}.sizes"),
                        format!("`{size}` is not WIDTHxHEIGHT or auto"),
                    ));
                }
            }
            for (key, list) in [
                ("sizes", &m.sizes),
                ("qualities", &m.qualities),
                ("response_formats", &m.response_formats),
            ] {
                if list.is_empty() {
                    return Err(invalid(
                        format!("{at}.{key}"),
                        "must list at least one value",
                    ));
                }
            }
            for f in &m.response_formats {
                if f != "url" && f != "b64_json" {
                    return Err(invalid(
                        format!("{at}.response_formats"),
                        format!("`{f}` is not url or b64_json"),
                    ));
                }
            }
            if m.max_n == 0 || m.max_n > 128 {
                return Err(invalid(format!("{at}.max_n"), "must be between 1 and 128"));
            }
            if m.max_prompt_chars == 0 {
                return Err(invalid(
                    format!("{at}.max_prompt_chars"),
                    "must be at least 1",
                ));
            }
            for (q, price) in &m.price_per_image {
                if !price.is_finite() || *price < 0.0 {
                    return Err(invalid(
                        format!("{at}.price_per_image.{q}"),
                        "must be a non-negative number",
                    ));
                }
            }
        }
        check_limits("client_defaults", &self.client_defaults)?;
        let mut client_ids = HashSet::new();
        let mut digests = HashSet::new();
        for (i, c) in self.clients.iter().enumerate() {
            let at = format!("clients[{i}]");
            let id_ok = !c.id.is_empty()
                && c.id.len() <= 64
                && c.id
                    .chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch));
            if !id_ok {
                return Err(invalid(
                    format!("{at}.id"),
                    "must be 1-64 of [A-Za-z0-9._-]",
                ));
            }
            if !client_ids.insert(c.id.as_str()) {
                return Err(invalid(
                    format!("{at}.id"),
                    format!("`{}` is not unique", c.id),
                ));
            }
            let mut any = false;
            for d in c.key_sha256.iter() {
                any = true;
                if d.len() != 64 || !d.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(invalid(
                        format!("{at}.key_sha256"),
                        "must be 64 hex characters (run `imagegate keygen --client ID`)",
                    ));
                }
                if !digests.insert(d.to_ascii_lowercase()) {
                    return Err(invalid(
                        format!("{at}.key_sha256"),
                        "the same key is configured for two clients",
                    ));
                }
            }
            if !any {
                return Err(invalid(
                    format!("{at}.key_sha256"),
                    "at least one key digest is required",
                ));
            }
            check_limits(&at, &c.limits(&self.client_defaults))?;
            for m in &c.models {
                if !model_names.contains(m.as_str()) {
                    return Err(invalid(
                        format!("{at}.models"),
                        format!("unknown model `{m}`"),
                    ));
                }
            }
            if let Some(b) = c.budget_per_month
                && (!b.is_finite() || b < 0.0)
            {
                return Err(invalid(
                    format!("{at}.budget_per_month"),
                    "must be a non-negative number",
                ));
            }
        }
        Ok(())
    }

    /// A cache entry lifetime of `ttl_secs` must be below the image-URL lifetime of every
    /// upstream: a cached `url` answer points at images the upstream hosts, and serving it
    /// after they expired would hand out broken links. The gap between the two is how long a
    /// client has to fetch the image from the oldest cached answer. Refused rather than
    /// clamped, like every other inconsistent setting: a silently shortened TTL would surprise
    /// whoever sized the cache.
    pub fn check_cache_ttl(&self, ttl_secs: u64) -> Result<(), ConfigError> {
        match self.upstreams.iter().min_by_key(|u| u.url_lifetime_secs) {
            Some(u) if ttl_secs >= u.url_lifetime_secs => Err(invalid(
                "cache.ttl_secs",
                format!(
                    "({ttl_secs}) must be below the image-URL lifetime of upstream `{}` \
                     (url_lifetime_secs = {}): a cached url answer must not outlive the \
                     upstream's URLs",
                    u.name, u.url_lifetime_secs
                ),
            )),
            _ => Ok(()),
        }
    }

    /// Resolves every secret the config names, failing on the first missing one.
    pub fn resolve_secrets(&self, env: &Env) -> Result<Secrets, ConfigError> {
        let mut upstream_keys = Vec::with_capacity(self.upstreams.len());
        for u in &self.upstreams {
            let mut keys = Vec::with_capacity(u.keys.len());
            for k in &u.keys {
                keys.push(env::resolve_secret(
                    env,
                    k.env.as_deref(),
                    k.file.as_deref(),
                    &format!("upstream `{}` key `{}`", u.name, k.id),
                )?);
            }
            upstream_keys.push(keys);
        }
        let admin_token = match (&self.admin.token_file, &self.admin.token_env) {
            (None, None) => None,
            (file, var) => {
                match env::resolve_secret(env, var.as_deref(), file.as_deref(), "admin token") {
                    Ok(token) => Some(token),
                    // The admin listener still serves health and metrics without a token; only
                    // /admin refuses everyone. A configured token file that cannot be read is an
                    // error, though: someone meant to set it.
                    Err(e) if file.is_some() => return Err(e),
                    Err(_) => None,
                }
            }
        };
        Ok(Secrets {
            upstream_keys,
            admin_token,
        })
    }

    /// Every secret the config names and whether it resolves, for `check-config`.
    pub fn describe_secrets(&self, env: &Env) -> Vec<SecretStatus> {
        let mut out = Vec::new();
        for u in &self.upstreams {
            for k in &u.keys {
                let source = match (&k.file, &k.env) {
                    (Some(f), _) => format!("file {}", f.display()),
                    (None, Some(v)) => format!("env {v}"),
                    (None, None) => "nowhere".to_owned(),
                };
                let ok = env::resolve_secret(env, k.env.as_deref(), k.file.as_deref(), "").is_ok();
                out.push(SecretStatus {
                    what: format!("upstream `{}` key `{}` ({source})", u.name, k.id),
                    set: ok,
                    required: true,
                });
            }
        }
        if self.admin.token_env.is_some() || self.admin.token_file.is_some() {
            let ok = env::resolve_secret(
                env,
                self.admin.token_env.as_deref(),
                self.admin.token_file.as_deref(),
                "",
            )
            .is_ok();
            out.push(SecretStatus {
                what: "admin token (without it /admin refuses everyone)".to_owned(),
                set: ok,
                required: self.admin.token_file.is_some(),
            });
        }
        out
    }

    /// Every client's id with its effective limits, in config order (for usage reports).
    pub fn client_limits(&self) -> Vec<(String, ClientLimits)> {
        self.clients
            .iter()
            .map(|c| (c.id.clone(), c.limits(&self.client_defaults)))
            .collect()
    }

    /// The effective config as TOML (secrets are never in it: only where they come from).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }
}

/// Rate limits of zero would refuse every request forever: almost certainly a typo.
fn check_limits(at: &str, limits: &ClientLimits) -> Result<(), ConfigError> {
    for (key, v) in [
        ("requests_per_minute", limits.requests_per_minute),
        ("images_per_minute", limits.images_per_minute),
        ("max_concurrent", limits.max_concurrent),
    ] {
        if v == 0 {
            return Err(invalid(format!("{at}.{key}"), "must be at least 1"));
        }
    }
    Ok(())
}

/// Parses `WIDTHxHEIGHT`.
pub fn parse_size(size: &str) -> Option<(u32, u32)> {
    let (w, h) = size.split_once('x')?;
    let w: u32 = w.parse().ok()?;
    let h: u32 = h.parse().ok()?;
    (w > 0 && h > 0).then_some((w, h))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [[upstreams]]
        name = "primary"
        base_url = "http://127.0.0.1:9/v1"
          [[upstreams.keys]]
          id = "k1"
          env = "K1"
        [[models]]
        name = "m"
    "#;

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::from_toml(MINIMAL, &Env::default()).unwrap();
        assert_eq!(c.server.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.models[0].max_n, 4);
        assert_eq!(c.upstreams[0].timeout_secs, 180);
    }

    #[test]
    fn unknown_key_is_rejected_naming_its_path() {
        let text = format!("{MINIMAL}\n[server]\nlisten_typo = 1\n");
        let err = Config::from_toml(&text, &Env::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("server") && err.contains("listen_typo"),
            "{err}"
        );
    }

    #[test]
    fn unknown_key_in_array_entry_names_the_entry() {
        let text = MINIMAL.replace("id = \"k1\"", "id = \"k1\"\nsecret = \"sk-inline\"");
        let err = Config::from_toml(&text, &Env::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("upstreams[0].keys[0]") && err.contains("secret"),
            "{err}"
        );
    }

    #[test]
    fn env_override_with_unknown_key_is_rejected() {
        let env = Env::from_pairs([("IMAGEGATE__SERVER__LISEN", "x")]);
        let err = Config::from_toml(MINIMAL, &env).unwrap_err().to_string();
        assert!(err.contains("lisen"), "{err}");
    }

    #[test]
    fn missing_secret_names_the_key_and_var() {
        let c = Config::from_toml(MINIMAL, &Env::default()).unwrap();
        let err = c
            .resolve_secrets(&Env::default())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("k1") && err.contains("K1"), "{err}");
        let described = c.describe_secrets(&Env::from_pairs([("K1", "x")]));
        assert!(described[0].set && described[0].required);
    }

    #[test]
    fn model_naming_unknown_upstream_is_rejected() {
        let text = MINIMAL.replace("name = \"m\"", "name = \"m\"\nupstreams = [\"nope\"]");
        let err = Config::from_toml(&text, &Env::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("models[0].upstreams") && err.contains("nope"),
            "{err}"
        );
    }

    #[test]
    fn bad_client_digest_is_rejected() {
        let text = format!("{MINIMAL}\n[[clients]]\nid = \"a\"\nkey_sha256 = \"abc\"\n");
        let err = Config::from_toml(&text, &Env::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("clients[0].key_sha256"), "{err}");
    }

    #[test]
    fn a_cache_ttl_not_below_every_upstreams_url_lifetime_is_refused_naming_both() {
        let c = Config::from_toml(MINIMAL, &Env::default()).unwrap();
        assert_eq!(c.upstreams[0].url_lifetime_secs, 3600);
        assert_eq!(c.cache.ttl_secs, 600, "the defaults are consistent");

        let second = r#"
            [[upstreams]]
            name = "short-lived"
            base_url = "http://127.0.0.1:9/v1"
            url_lifetime_secs = 900
              [[upstreams.keys]]
              id = "s1"
              env = "S1"
        "#;
        let ok = format!("{MINIMAL}{second}\n[cache]\nttl_secs = 899\n");
        assert!(Config::from_toml(&ok, &Env::default()).is_ok());
        let err = Config::from_toml(&ok.replace("899", "900"), &Env::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cache.ttl_secs") && err.contains("short-lived") && err.contains("900"),
            "{err}"
        );
        // A disabled cache serves nothing, so its TTL does not matter.
        let off = ok
            .replace("899", "900")
            .replace("[cache]", "[cache]\nenabled = false");
        assert!(Config::from_toml(&off, &Env::default()).is_ok());
        // The env override path is checked the same way.
        let env = Env::from_pairs([("IMAGEGATE__CACHE__TTL_SECS", "3600")]);
        let err = Config::from_toml(MINIMAL, &env).unwrap_err().to_string();
        assert!(err.contains("cache.ttl_secs"), "{err}");
        let zero = MINIMAL.replace(
            "name = \"primary\"",
            "name = \"primary\"\nurl_lifetime_secs = 0",
        );
        let err = Config::from_toml(&zero, &Env::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("upstreams[0].url_lifetime_secs"), "{err}");
    }

    #[test]
    fn example_config_parses() {
        let text = include_str!("../../config/imagegate.example.toml");
        let config = Config::from_toml(text, &Env::default()).unwrap();
        assert!(!config.clients.is_empty());
        assert!(!config.upstreams.is_empty());
    }
}
