//! Model groups, their deployments, and the choice of a deployment for each attempt of a call.
//!
//! The retry and fallback loop lives in the pipeline's route stage; the router answers one question
//! there: "which deployment of this group should the next attempt use?".

mod deployment;
pub mod strategy;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

pub use deployment::{Deployment, InFlight};

use crate::config::Config;
use crate::cost::Prices;
use crate::extension::{RouteRequest, RoutingStrategy};
use crate::providers::{Secret, Upstream};

/// Why no deployment could be picked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoDeployment {
    #[error("no model named '{0}'")]
    UnknownGroup(String),
    #[error("every deployment of '{0}' is cooling down after failures or at its rate limit")]
    NoneAvailable(String),
}

/// Retry, fallback and health settings.
#[derive(Debug, Clone)]
pub struct RouterSettings {
    pub num_retries: u32,
    pub fallbacks: HashMap<String, Vec<String>>,
    pub allowed_fails: u32,
    pub cooldown: Duration,
}

/// All model groups of one generation.
#[derive(Debug)]
pub struct Router {
    groups: HashMap<String, Vec<Arc<Deployment>>>,
    /// Group names in the order the config first mentions them, for `/v1/models`.
    names: Vec<String>,
    strategy: Arc<dyn RoutingStrategy>,
    pub settings: RouterSettings,
}

impl Router {
    /// Builds the model groups of `config`, routed by `strategy`. Deployments that `previous` (the
    /// generation being replaced) also had keep their live statistics.
    pub fn new(
        config: &Config,
        strategy: Arc<dyn RoutingStrategy>,
        previous: Option<&Router>,
    ) -> Router {
        let router = &config.router;
        let mut groups: HashMap<String, Vec<Arc<Deployment>>> = HashMap::new();
        let mut names = Vec::new();
        for (index, model) in config.models.iter().enumerate() {
            let upstream_model = model.model.clone().unwrap_or_else(|| model.name.clone());
            let api_base = model
                .api_base
                .clone()
                .or_else(|| model.provider.default_api_base().map(str::to_owned))
                .unwrap_or_default();
            let upstream = Upstream {
                kind: model.provider,
                model: upstream_model.clone(),
                api_base: api_base.trim_end_matches('/').to_owned(),
                api_key: model.api_key.clone().map(Secret::new),
                api_version: model.api_version.clone(),
                timeout: secs(model.timeout_s.unwrap_or(router.timeout_s)),
                stream_idle_timeout: secs(
                    model
                        .stream_idle_timeout_s
                        .unwrap_or(router.stream_idle_timeout_s),
                ),
                prepared: Default::default(),
            };
            let prices = Prices::for_deployment(
                &upstream_model,
                model.input_cost_per_token,
                model.output_cost_per_token,
            );
            let deployment = Deployment::new(
                model.deployment_id(index),
                model.name.clone(),
                upstream,
                model.weight,
                model.rpm,
                model.tpm,
                prices,
            );
            let deployment = match previous.and_then(|p| p.deployment(&model.name, &deployment.id))
            {
                Some(old) => deployment.continuing(old),
                None => deployment,
            };
            if !groups.contains_key(&model.name) {
                names.push(model.name.clone());
            }
            groups
                .entry(model.name.clone())
                .or_default()
                .push(Arc::new(deployment));
        }
        Router {
            groups,
            names,
            strategy,
            settings: RouterSettings {
                num_retries: router.num_retries,
                fallbacks: router.fallbacks.clone().into_iter().collect(),
                allowed_fails: router.allowed_fails,
                cooldown: secs(router.cooldown_s),
            },
        }
    }

    pub fn has_group(&self, name: &str) -> bool {
        self.groups.contains_key(name)
    }

    /// The deployment `id` of `group`, if this router has it.
    pub fn deployment(&self, group: &str, id: &str) -> Option<&Deployment> {
        self.groups
            .get(group)?
            .iter()
            .find(|d| d.id == id)
            .map(|d| &**d)
    }

    /// The strategy that picks among a group's deployments.
    pub fn strategy(&self) -> &Arc<dyn RoutingStrategy> {
        &self.strategy
    }

    /// Group names in config order.
    pub fn group_names(&self) -> &[String] {
        &self.names
    }

    pub fn fallbacks(&self, group: &str) -> &[String] {
        self.settings
            .fallbacks
            .get(group)
            .map_or(&[], Vec::as_slice)
    }

    /// Picks a deployment of `group` for the next attempt, preferring ones not yet `tried`, and
    /// counts the attempt against its caps.
    pub async fn reserve(
        &self,
        request: &RouteRequest<'_>,
        tried: &[Arc<Deployment>],
    ) -> Result<(Arc<Deployment>, InFlight), NoDeployment> {
        // A deployment can reach its cap between being picked and being reserved; pick again.
        let mut full = Vec::new();
        loop {
            let deployment = self.pick(request, tried, &full).await?;
            match deployment.try_start_call() {
                Some(in_flight) => return Ok((deployment, in_flight)),
                None => full.push(deployment),
            }
        }
    }

    async fn pick(
        &self,
        request: &RouteRequest<'_>,
        tried: &[Arc<Deployment>],
        full: &[Arc<Deployment>],
    ) -> Result<Arc<Deployment>, NoDeployment> {
        let deployments = self
            .groups
            .get(request.group)
            .ok_or_else(|| NoDeployment::UnknownGroup(request.group.to_owned()))?;
        let available: Vec<&Arc<Deployment>> = deployments
            .iter()
            .filter(|d| !d.is_cooling_down() && d.has_capacity())
            .filter(|d| !full.iter().any(|f| Arc::ptr_eq(f, d)))
            .collect();
        let untried: Vec<&Arc<Deployment>> = available
            .iter()
            .copied()
            .filter(|d| !tried.iter().any(|t| Arc::ptr_eq(t, d)))
            .collect();
        // Retry a deployment already tried only when the group has no other left.
        let pool = if untried.is_empty() {
            available
        } else {
            untried
        };
        if pool.is_empty() {
            return Err(NoDeployment::NoneAvailable(request.group.to_owned()));
        }
        if pool.len() == 1 {
            return Ok(Arc::clone(pool[0]));
        }
        let candidates: Vec<_> = pool.iter().map(|d| d.candidate()).collect();
        let index = self
            .strategy
            .choose(request, &candidates)
            .await
            .filter(|&i| i < pool.len())
            .or_else(|| strategy::weighted_shuffle(&candidates))
            .unwrap_or(0);
        Ok(Arc::clone(pool[index]))
    }
}

fn secs(s: f64) -> Duration {
    Duration::try_from_secs_f64(s).unwrap_or(Duration::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router(yaml: &str) -> Router {
        let config = Config::parse(yaml, &|_| None).expect("valid config");
        Router::new(
            &config,
            strategy::builtin(strategy::StrategyName::SimpleShuffle),
            None,
        )
    }

    const TWO: &str = "models:\n  - { name: g, provider: mock, id: a }\n  - { name: g, provider: mock, id: b }\n  - { name: h, provider: mock }\nrouter: { allowed_fails: 1, cooldown_s: 60 }\n";

    fn request(group: &str) -> RouteRequest<'_> {
        RouteRequest {
            call_id: "c",
            group,
            estimated_tokens: 1,
            stream: false,
            origin: None,
        }
    }

    #[tokio::test]
    async fn groups_keep_config_order_and_unknown_groups_are_errors() {
        let r = router(TWO);
        assert_eq!(r.group_names(), ["g", "h"]);
        assert_eq!(
            r.reserve(&request("x"), &[])
                .await
                .map(|(d, _)| d.id.clone()),
            Err(NoDeployment::UnknownGroup("x".into()))
        );
    }

    #[tokio::test]
    async fn retries_prefer_untried_and_skip_cooling_deployments() {
        let r = router(TWO);
        let (first, _) = r.reserve(&request("g"), &[]).await.expect("some");
        let (second, _) = r
            .reserve(&request("g"), &[Arc::clone(&first)])
            .await
            .expect("other");
        assert_ne!(first.id, second.id);
        first.record_failure(1, Duration::from_secs(60));
        for _ in 0..20 {
            assert_eq!(
                r.reserve(&request("g"), &[]).await.expect("healthy").0.id,
                second.id
            );
        }
        second.record_failure(1, Duration::from_secs(60));
        assert_eq!(
            r.reserve(&request("g"), &[])
                .await
                .map(|(d, _)| d.id.clone()),
            Err(NoDeployment::NoneAvailable("g".into()))
        );
    }
}
