//! The process environment as configuration sees it: a snapshot taken once in `main`, so that
//! tests pass their own values and nothing ever mutates or re-reads process env.
//!
//! Two things come from it: `IMAGEGATE__SECTION__KEY` overrides of file values, and secrets
//! (upstream keys, the admin token) named by `env = "..."` in the file.

use std::collections::BTreeMap;
use std::path::Path;

use secrecy::SecretString;

use super::ConfigError;

const OVERRIDE_PREFIX: &str = "IMAGEGATE__";

/// An immutable set of environment variables.
#[derive(Debug, Clone, Default)]
pub struct Env {
    vars: BTreeMap<String, String>,
}

impl Env {
    /// The real process environment. The only call site is the binary's `main`.
    #[expect(
        clippy::disallowed_methods,
        reason = "the one sanctioned read of process env"
    )]
    pub fn from_process() -> Self {
        Env {
            vars: std::env::vars_os()
                .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
                .collect(),
        }
    }

    pub fn from_pairs<K: Into<String>, V: Into<String>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        Env {
            vars: pairs
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        }
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.vars.get(name).map(String::as_str)
    }

    /// Applies every `IMAGEGATE__A__B__C=value` to `table` as `a.b.c = value`. A numeric
    /// segment indexes an array (`IMAGEGATE__UPSTREAMS__0__BASE_URL`). The value is read as a
    /// TOML value when it parses as one (`8080`, `true`, `["a"]`) and as a string otherwise.
    pub fn apply_overrides(&self, table: &mut toml::Table) -> Result<(), ConfigError> {
        for (name, raw) in &self.vars {
            let Some(path) = name.strip_prefix(OVERRIDE_PREFIX) else {
                continue;
            };
            let segments: Vec<String> = path.split("__").map(str::to_ascii_lowercase).collect();
            if segments.iter().any(String::is_empty) {
                return Err(ConfigError::Override {
                    var: name.clone(),
                    reason: "empty path segment".into(),
                });
            }
            set_path(table, &segments, parse_value(raw)).map_err(|reason| {
                ConfigError::Override {
                    var: name.clone(),
                    reason,
                }
            })?;
        }
        Ok(())
    }
}

fn parse_value(raw: &str) -> toml::Value {
    let doc = format!("v = {raw}");
    match doc.parse::<toml::Table>() {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(raw.to_owned())),
        Err(_) => toml::Value::String(raw.to_owned()),
    }
}

fn set_path(
    table: &mut toml::Table,
    segments: &[String],
    value: toml::Value,
) -> Result<(), String> {
    let (first, rest) = match segments.split_first() {
        Some(split) => split,
        None => return Err("empty path".into()),
    };
    if rest.is_empty() {
        table.insert(first.clone(), value);
        return Ok(());
    }
    let entry = table
        .entry(first.clone())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    set_in_value(entry, rest, value)
}

fn set_in_value(
    target: &mut toml::Value,
    segments: &[String],
    value: toml::Value,
) -> Result<(), String> {
    match target {
        toml::Value::Table(t) => set_path(t, segments, value),
        toml::Value::Array(items) => {
            let (first, rest) = segments.split_first().ok_or("empty path")?;
            let index: usize = first
                .parse()
                .map_err(|_| format!("`{first}` must be an array index"))?;
            let len = items.len();
            let item = items
                .get_mut(index)
                .ok_or_else(|| format!("index {index} is past the end of an array of {len}"))?;
            if rest.is_empty() {
                *item = value;
                Ok(())
            } else {
                set_in_value(item, rest, value)
            }
        }
        _ => Err("path goes through a value that is not a table".into()),
    }
}

/// Where a secret comes from: an env var or a file, never the config file itself.
pub(crate) fn resolve_secret(
    env: &Env,
    var: Option<&str>,
    file: Option<&Path>,
    what: &str,
) -> Result<SecretString, ConfigError> {
    if let Some(path) = file {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Secret {
            what: what.to_owned(),
            reason: format!("cannot read file {}: {}", path.display(), e.kind()),
        })?;
        let trimmed = text.trim();
        if trimmed.is_empty() {
            return Err(ConfigError::Secret {
                what: what.to_owned(),
                reason: format!("file {} is empty", path.display()),
            });
        }
        return Ok(SecretString::from(trimmed.to_owned()));
    }
    if let Some(var) = var {
        return match env.get(var) {
            Some(v) if !v.trim().is_empty() => Ok(SecretString::from(v.trim().to_owned())),
            _ => Err(ConfigError::Secret {
                what: what.to_owned(),
                reason: format!("env var {var} is not set"),
            }),
        };
    }
    Err(ConfigError::Secret {
        what: what.to_owned(),
        reason: "neither `env` nor `file` is given".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_set_nested_keys_and_array_items() {
        let mut table: toml::Table = r#"
            [server]
            listen = "127.0.0.1:1"
            [[upstreams]]
            name = "a"
            base_url = "http://x/v1"
        "#
        .parse()
        .unwrap();
        let env = Env::from_pairs([
            ("IMAGEGATE__SERVER__LISTEN", "0.0.0.0:8080"),
            ("IMAGEGATE__SERVER__MAX_BODY_BYTES", "2048"),
            ("IMAGEGATE__UPSTREAMS__0__BASE_URL", "http://y/v1"),
            ("UNRELATED", "1"),
        ]);
        env.apply_overrides(&mut table).unwrap();
        assert_eq!(table["server"]["listen"].as_str(), Some("0.0.0.0:8080"));
        assert_eq!(table["server"]["max_body_bytes"].as_integer(), Some(2048));
        assert_eq!(
            table["upstreams"][0]["base_url"].as_str(),
            Some("http://y/v1")
        );
    }

    #[test]
    fn override_past_array_end_is_an_error_naming_the_var() {
        let mut table: toml::Table = "upstreams = []".parse().unwrap();
        let env = Env::from_pairs([("IMAGEGATE__UPSTREAMS__3__NAME", "x")]);
        let err = env.apply_overrides(&mut table).unwrap_err().to_string();
        assert!(err.contains("IMAGEGATE__UPSTREAMS__3__NAME"), "{err}");
    }

    #[test]
    fn secret_from_env_and_missing_secret_names_the_var() {
        use secrecy::ExposeSecret;
        let env = Env::from_pairs([("K", "sk-1")]);
        let s = resolve_secret(&env, Some("K"), None, "key k1").unwrap();
        assert_eq!(s.expose_secret(), "sk-1");
        let err = resolve_secret(&env, Some("NOPE"), None, "key k1")
            .unwrap_err()
            .to_string();
        assert!(err.contains("NOPE") && err.contains("key k1"), "{err}");
    }
}
