//! Stage 1: who is calling. Resolves the `Authorization: Bearer` key to a [`Principal`] (a static
//! key from the config, or a stored one through [`Governance`]), and later checks that the
//! principal may call the model it asked for, within its budgets and rate limits.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use http::HeaderMap;

use crate::config::AuthConfig;
use crate::error::GatewayError;
use crate::generation::Generation;
use crate::governance::{secret, Governance, Governed};

/// A caller: a key and what it may do.
#[derive(Debug)]
pub struct Principal {
    pub alias: Option<String>,
    pub team: Option<String>,
    pub user: Option<String>,
    /// The key's SHA-256, as spend logs name it; `None` for an open gateway.
    pub token: Option<String>,
    /// Model groups this caller may use; `None` means all.
    pub models: Option<HashSet<String>>,
    /// Guardrails that run for this caller besides the default ones.
    pub guardrails: Vec<String>,
    pub is_master: bool,
    /// A stored key's budgets, limits and counters.
    pub governed: Option<Governed>,
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
                    user: None,
                    token: Some(secret::hash_key(&k.key)),
                    models: k.models.as_ref().map(|m| m.iter().cloned().collect()),
                    guardrails: k.guardrails.clone(),
                    is_master: false,
                    governed: None,
                };
                (k.key.clone(), Arc::new(principal))
            })
            .collect();
        if let Some(master) = &auth.master_key {
            let principal = Principal {
                alias: Some("master".into()),
                team: None,
                user: None,
                token: Some(secret::hash_key(master)),
                models: None,
                guardrails: Vec::new(),
                is_master: true,
                governed: None,
            };
            keys.insert(master.clone(), Arc::new(principal));
        }
        let open = keys.is_empty().then(|| {
            Arc::new(Principal {
                alias: None,
                team: None,
                user: None,
                token: None,
                models: None,
                guardrails: Vec::new(),
                is_master: false,
                governed: None,
            })
        });
        KeyTable { keys, open }
    }

    pub fn is_open(&self) -> bool {
        self.open.is_some()
    }
}

/// Finds the caller's key in the request headers and resolves it: static keys first, then the
/// store's.
pub async fn authenticate(
    generation: &Generation,
    headers: &HeaderMap,
) -> Result<Arc<Principal>, GatewayError> {
    match static_key(&generation.keys, headers)? {
        Lookup::Found(principal) => Ok(principal),
        Lookup::NotStatic(key) => match &generation.governance {
            Some(governance) => governance.resolve(key).await,
            // The key itself is never echoed: a near-miss of a real key is still a secret.
            None => Err(GatewayError::Unauthorized("invalid API key".into())),
        },
    }
}

/// The operator routes' check: the master key (or anyone, on a gateway with no keys at all).
pub async fn require_master(
    generation: &Generation,
    headers: &HeaderMap,
) -> Result<Arc<Principal>, GatewayError> {
    let principal = authenticate(generation, headers).await?;
    if principal.is_master || generation.keys.is_open() {
        Ok(principal)
    } else {
        Err(GatewayError::Forbidden(
            "this route needs the master key".into(),
        ))
    }
}

enum Lookup<'h> {
    Found(Arc<Principal>),
    NotStatic(&'h str),
}

fn static_key<'h>(keys: &KeyTable, headers: &'h HeaderMap) -> Result<Lookup<'h>, GatewayError> {
    if let Some(open) = &keys.open {
        return Ok(Lookup::Found(Arc::clone(open)));
    }
    let key = presented_key(headers).ok_or_else(|| {
        GatewayError::Unauthorized(
            "missing API key: send it in the header 'Authorization: Bearer <key>'".into(),
        )
    })?;
    Ok(match keys.keys.get(key) {
        Some(principal) => Lookup::Found(Arc::clone(principal)),
        None => Lookup::NotStatic(key),
    })
}

/// Budgets and rate limits of a stored key, its team and its user; `prompt_tokens` is the call's
/// estimated size, reserved against token limits. Static keys have none.
pub async fn admit(
    governance: Option<&Governance>,
    call: &mut crate::call::Call,
    prompt_tokens: impl FnOnce() -> Result<u64, GatewayError>,
) -> Result<(), GatewayError> {
    let (Some(governance), Some(principal)) = (governance, call.principal.clone()) else {
        return Ok(());
    };
    let Some(governed) = &principal.governed else {
        return Ok(());
    };
    let tokens = if governed.limits_tokens() {
        prompt_tokens()?
    } else {
        0
    };
    let admission = governance.admit(call, governed, tokens).await?;
    call.admission = Some(Arc::new(admission));
    Ok(())
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
        let a = found(&keys, &headers("authorization", "Bearer sk-a")).expect("known");
        assert_eq!(a.alias.as_deref(), Some("team-a"));
        assert!(
            found(&keys, &headers("api-key", "sk-master"))
                .expect("known")
                .is_master
        );
        assert!(found(&keys, &headers("authorization", "Bearer nope")).is_none());
        assert!(static_key(&keys, &HeaderMap::new()).is_err());
    }

    fn found(keys: &KeyTable, headers: &HeaderMap) -> Option<Arc<Principal>> {
        match static_key(keys, headers).expect("a key is sent") {
            Lookup::Found(p) => Some(p),
            Lookup::NotStatic(_) => None,
        }
    }

    #[test]
    fn model_permissions() {
        let keys = table();
        let a = found(&keys, &headers("authorization", "Bearer sk-a")).expect("known");
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
        assert!(found(&keys, &HeaderMap::new()).is_some());
    }
}
