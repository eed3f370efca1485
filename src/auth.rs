//! Who is calling: bearer parsing and client-key lookup.
//!
//! Client keys are never stored: the config holds their SHA-256 digests, and a presented key
//! is hashed and looked up by digest. The lookup is by the digest of the presented key, so its
//! timing can only tell an attacker about digests of keys they already hold; the final
//! comparison is constant-time all the same. Handlers receive an [`AuthenticatedClient`], never
//! a raw key, and nothing here logs or returns a key or a digest.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::{ClientLimits, Config};
use crate::error::ApiError;

/// A configured client's id: stable, bounded (validated in config), safe to log and label.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientId(Arc<str>);

impl ClientId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A client as the request path needs it.
#[derive(Debug)]
pub struct Client {
    pub id: ClientId,
    /// `None` means every configured model.
    allowed_models: Option<HashSet<String>>,
    pub limits: ClientLimits,
}

impl Client {
    pub fn may_use(&self, model: &str) -> bool {
        self.allowed_models
            .as_ref()
            .is_none_or(|allowed| allowed.contains(model))
    }
}

/// Proof that the request carried a valid client key.
#[derive(Debug, Clone)]
pub struct AuthenticatedClient(Arc<Client>);

impl std::ops::Deref for AuthenticatedClient {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self.0
    }
}

type KeyDigest = [u8; 32];

/// Every configured client key digest, and the client it belongs to.
#[derive(Debug, Default)]
pub struct ClientKeys {
    by_digest: HashMap<KeyDigest, Arc<Client>>,
    /// Each client once, in config order.
    clients: Vec<Arc<Client>>,
}

impl ClientKeys {
    /// Builds the table from a validated config (digests are 64 hex chars there).
    pub fn from_config(config: &Config) -> Self {
        let mut by_digest = HashMap::new();
        let mut clients = Vec::with_capacity(config.clients.len());
        for c in &config.clients {
            let client = Arc::new(Client {
                id: ClientId(Arc::from(c.id.as_str())),
                allowed_models: (!c.models.is_empty()).then(|| c.models.iter().cloned().collect()),
                limits: c.limits(&config.client_defaults),
            });
            for hex_digest in c.key_sha256.iter() {
                let mut digest = [0u8; 32];
                if hex::decode_to_slice(hex_digest, &mut digest).is_ok() {
                    by_digest.insert(digest, Arc::clone(&client));
                }
            }
            clients.push(client);
        }
        ClientKeys { by_digest, clients }
    }

    /// Authenticates an `Authorization` header value.
    pub fn authenticate(
        &self,
        authorization: Option<&[u8]>,
    ) -> Result<AuthenticatedClient, ApiError> {
        let key = authorization
            .and_then(bearer_token)
            .ok_or_else(ApiError::invalid_api_key)?;
        let digest: KeyDigest = Sha256::digest(key).into();
        match self.by_digest.get_key_value(&digest) {
            Some((stored, client)) if bool::from(stored.ct_eq(&digest)) => {
                Ok(AuthenticatedClient(Arc::clone(client)))
            }
            _ => Err(ApiError::invalid_api_key()),
        }
    }

    pub fn len(&self) -> usize {
        self.by_digest.len()
    }

    /// Every configured client, once each, in config order.
    pub fn clients(&self) -> &[Arc<Client>] {
        &self.clients
    }

    /// The configured client `id`, for work done on its behalf after its request was
    /// authenticated (an async task running later).
    pub fn client(&self, id: &str) -> Option<&Arc<Client>> {
        self.clients.iter().find(|c| c.id.as_str() == id)
    }

    /// Each client's id with its effective limits.
    pub fn limits(&self) -> Vec<(ClientId, ClientLimits)> {
        self.clients
            .iter()
            .map(|c| (c.id.clone(), c.limits.clone()))
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.by_digest.is_empty()
    }
}

/// The key in `Bearer <key>`: scheme case-insensitive, key 1–512 visible ASCII bytes.
fn bearer_token(header: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = header.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let key = rest.trim_ascii();
    let ok = !key.is_empty() && key.len() <= 512 && key.iter().all(|b| b.is_ascii_graphic());
    ok.then_some(key)
}

/// Hex SHA-256 of a client key, as written in `key_sha256`.
pub fn key_digest_hex(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// A new random client key: `sk-ig-` and 256 random bits in hex.
pub fn generate_client_key() -> String {
    let bytes: [u8; 32] = rand::random();
    format!("sk-ig-{}", hex::encode(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ClientConfig, ModelConfig};

    fn keys() -> ClientKeys {
        let mut config = Config::default();
        config.models.push(ModelConfig::new("m1", &[]));
        let mut a = ClientConfig::new("team-a", &key_digest_hex("sk-a"));
        a.models = vec!["m1".into()];
        config.clients.push(a);
        config
            .clients
            .push(ClientConfig::new("team-b", &key_digest_hex("sk-b")));
        ClientKeys::from_config(&config)
    }

    #[test]
    fn bearer_key_finds_its_client() {
        let keys = keys();
        let client = keys.authenticate(Some(b"Bearer sk-a")).unwrap();
        assert_eq!(client.id.as_str(), "team-a");
        assert!(client.may_use("m1") && !client.may_use("m2"));
        let b = keys.authenticate(Some(b"bearer   sk-b ")).unwrap();
        assert!(b.may_use("anything"));
    }

    #[test]
    fn missing_basic_and_unknown_keys_are_refused() {
        let keys = keys();
        for header in [
            None,
            Some(&b"Basic c2stYQ=="[..]),
            Some(b"Bearer sk-zzz"),
            Some(b"Bearer "),
            Some(b"sk-a"),
        ] {
            let err = keys.authenticate(header).unwrap_err();
            assert_eq!(err.code(), Some("invalid_api_key"));
        }
    }

    #[test]
    fn generated_keys_are_unique_and_digest_is_hex() {
        let a = generate_client_key();
        assert_ne!(a, generate_client_key());
        assert_eq!(key_digest_hex(&a).len(), 64);
    }
}
