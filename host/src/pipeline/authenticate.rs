//! Stage 1: who is calling. Resolves the `Authorization: Bearer` key to a [`Principal`], and later
//! checks that the principal may call the model it asked for.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use http::HeaderMap;

use crate::config::AuthConfig;
use crate::error::GatewayError;

/// A caller: a key and what it may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub alias: Option<String>,
    pub team: Option<String>,
    /// Model groups this caller may use; `None` means all.
    pub models: Option<HashSet<String>>,
    /// Guardrails that run for this caller besides the default ones.
    pub guardrails: Vec<String>,
    pub is_master: bool,
}

impl Principal {
    pub fn may_use(&self, model: &str) -> bool {
        self.models.as_ref().is_none_or(|m| m.contains(model))
    }
}

/// The keys of one generation.
#[derive(Debug)]
pub struct KeyTable {
    keys: HashMap<String, Arc<Principal>>,
    /// With no key configured at all the gateway is open, as a local development proxy is.
    open: Option<Arc<Principal>>,
}

impl KeyTable {
    pub fn from_config(auth: &AuthConfig) -> KeyTable {
        let mut keys: HashMap<String, Arc<Principal>> = auth
            .keys
            .iter()
            .map(|k| {
                let principal = Principal {
                    alias: k.alias.clone(),
                    team: k.team.clone(),
                    models: k.models.as_ref().map(|m| m.iter().cloned().collect()),
                    guardrails: k.guardrails.clone(),
                    is_master: false,
                };
                (k.key.clone(), Arc::new(principal))
            })
            .collect();
        if let Some(master) = &auth.master_key {
            let principal = Principal {
                alias: Some("master".into()),
                team: None,
                models: None,
                guardrails: Vec::new(),
                is_master: true,
            };
            keys.insert(master.clone(), Arc::new(principal));
        }
        let open = keys.is_empty().then(|| {
            Arc::new(Principal {
                alias: None,
                team: None,
                models: None,
                guardrails: Vec::new(),
                is_master: false,
            })
        });
        KeyTable { keys, open }
    }

    pub fn is_open(&self) -> bool {
        self.open.is_some()
    }
}

/// Finds the caller's key in the request headers and resolves it.
pub fn authenticate(keys: &KeyTable, headers: &HeaderMap) -> Result<Arc<Principal>, GatewayError> {
    if let Some(open) = &keys.open {
        return Ok(Arc::clone(open));
    }
    let key = presented_key(headers).ok_or_else(|| {
        GatewayError::Unauthorized(
            "missing API key: send it in the header 'Authorization: Bearer <key>'".into(),
        )
    })?;
    // The key itself is never echoed: a near-miss of a real key is still a secret.
    keys.keys
        .get(key)
        .cloned()
        .ok_or_else(|| GatewayError::Unauthorized("invalid API key".into()))
}

/// `Authorization: Bearer <key>`, or Azure's `api-key` header that some SDKs send instead.
fn presented_key(headers: &HeaderMap) -> Option<&str> {
    if let Some(value) = headers.get(http::header::AUTHORIZATION) {
        let value = value.to_str().ok()?.trim();
        let key = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .unwrap_or(value)
            .trim();
        return (!key.is_empty()).then_some(key);
    }
    headers
        .get("api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|k| !k.is_empty())
}

/// 404 for a model no deployment serves, 403 for one the caller may not use.
pub fn authorize_model(
    principal: &Principal,
    model: &str,
    exists: bool,
) -> Result<(), GatewayError> {
    if !exists {
        return Err(GatewayError::ModelNotFound(format!(
            "the model '{model}' does not exist; GET /v1/models lists the models you can use"
        )));
    }
    if !principal.may_use(model) {
        return Err(GatewayError::Forbidden(format!(
            "this key is not allowed to use the model '{model}'"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::KeyConfig;
    use http::HeaderValue;

    fn table() -> KeyTable {
        KeyTable::from_config(&AuthConfig {
            master_key: Some("sk-master".into()),
            keys: vec![KeyConfig {
                key: "sk-a".into(),
                alias: Some("team-a".into()),
                team: None,
                models: Some(vec!["m1".into()]),
                guardrails: Vec::new(),
            }],
        })
    }

    fn headers(name: &'static str, value: &'static str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(name, HeaderValue::from_static(value));
        h
    }

    #[test]
    fn bearer_keys_resolve_and_unknown_ones_fail() {
        let keys = table();
        let a = authenticate(&keys, &headers("authorization", "Bearer sk-a")).expect("known");
        assert_eq!(a.alias.as_deref(), Some("team-a"));
        assert!(
            authenticate(&keys, &headers("api-key", "sk-master"))
                .expect("known")
                .is_master
        );
        assert!(authenticate(&keys, &headers("authorization", "Bearer nope")).is_err());
        assert!(authenticate(&keys, &HeaderMap::new()).is_err());
    }

    #[test]
    fn model_permissions() {
        let keys = table();
        let a = authenticate(&keys, &headers("authorization", "Bearer sk-a")).expect("known");
        assert!(authorize_model(&a, "m1", true).is_ok());
        assert!(matches!(
            authorize_model(&a, "m2", true),
            Err(GatewayError::Forbidden(_))
        ));
        assert!(matches!(
            authorize_model(&a, "m3", false),
            Err(GatewayError::ModelNotFound(_))
        ));
    }

    #[test]
    fn no_keys_means_open() {
        let keys = KeyTable::from_config(&AuthConfig::default());
        assert!(keys.is_open());
        assert!(authenticate(&keys, &HeaderMap::new()).is_ok());
    }
}
