//! `team-defaults`: an enricher that adds each team's tags, metadata and default model to its calls.

use portcullis_plugin_sdk::{Config, Enricher, Enrichment, Plugin, Request};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// The model alias a client sends to mean "my team's default model".
pub const DEFAULT_MODEL_ALIAS: &str = "default";

/// The plugin: its config, checked once at load.
#[derive(Debug)]
pub struct TeamDefaults {
    teams: BTreeMap<String, Defaults>,
    fallback: Option<Defaults>,
}

/// The config block.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    #[serde(default)]
    teams: BTreeMap<String, Defaults>,
    /// For calls whose key has no team, or a team not listed.
    #[serde(default)]
    default: Option<Defaults>,
}

/// What one team gets.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Defaults {
    /// Model group for the call; see [`Defaults::model_for`].
    #[serde(default)]
    model: Option<String>,
    /// Override the model even when the client named another one.
    #[serde(default)]
    force_model: bool,
    #[serde(default)]
    tags: Vec<String>,
    /// Kept in config order (serde_json's `preserve_order`).
    #[serde(default)]
    metadata: Map<String, Value>,
}

impl Defaults {
    /// The model override: only when forced, or when the client asked for the `default` alias.
    /// A client that named a real model keeps it otherwise.
    fn model_for(&self, request: &Request<'_>) -> Option<String> {
        let wanted = self.force_model || request.model() == DEFAULT_MODEL_ALIAS;
        self.model.clone().filter(|_| wanted)
    }

    fn check(&self, name: &str) -> Result<(), String> {
        match &self.model {
            Some(model) if model.trim().is_empty() => Err(format!(
                "invalid config at `{name}.model`: empty model name"
            )),
            None if self.force_model => Err(format!(
                "invalid config at `{name}`: `force_model` needs a `model`"
            )),
            _ => Ok(()),
        }
    }
}

impl Plugin for TeamDefaults {
    fn init(config: Config) -> Result<Self, String> {
        let settings: Settings = config.parse()?;
        for (team, defaults) in &settings.teams {
            defaults.check(&format!("teams.{team}"))?;
        }
        if let Some(defaults) = &settings.default {
            defaults.check("default")?;
        }
        Ok(Self {
            teams: settings.teams,
            fallback: settings.default,
        })
    }
}

impl Enricher for TeamDefaults {
    fn enrich(&self, request: &Request<'_>) -> Enrichment {
        let defaults = request
            .team()
            .and_then(|team| self.teams.get(team))
            .or(self.fallback.as_ref());
        let Some(defaults) = defaults else {
            return Enrichment::default();
        };
        Enrichment {
            metadata: defaults
                .metadata
                .iter()
                .map(|(key, value)| (key.clone(), value.to_string()))
                .collect(),
            tags: defaults.tags.clone(),
            model: defaults.model_for(request),
        }
    }
}

portcullis_plugin_sdk::export!(TeamDefaults: Enricher);

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"{
        "teams": {
            "ml": {
                "model": "gpt-4o",
                "tags": ["ml", "research"],
                "metadata": {"cost_center": "cc-42", "priority": 2, "flags": {"beta": true}}
            },
            "support": {"model": "gpt-4o-mini", "force_model": true, "tags": ["support"]}
        },
        "default": {"model": "small", "tags": ["untagged-team"]}
    }"#;

    fn plugin(config: &str) -> TeamDefaults {
        TeamDefaults::init(Config::new(config)).expect("valid config")
    }

    fn request(model: &str, team: Option<&str>) -> Request<'static> {
        let request = Request::chat(model, &[("user", "hi")]);
        match team {
            Some(team) => request.with_team(team),
            None => request,
        }
    }

    #[test]
    fn team_tags_and_metadata_as_json_text_in_config_order() {
        let enrichment = plugin(CONFIG).enrich(&request("gpt-4o", Some("ml")));
        assert_eq!(enrichment.tags, vec!["ml", "research"]);
        assert_eq!(
            enrichment.metadata,
            vec![
                ("cost_center".to_string(), r#""cc-42""#.to_string()),
                ("priority".to_string(), "2".to_string()),
                ("flags".to_string(), r#"{"beta":true}"#.to_string()),
            ]
        );
    }

    #[test]
    fn model_only_replaces_the_default_alias() {
        let plugin = plugin(CONFIG);
        assert_eq!(plugin.enrich(&request("claude", Some("ml"))).model, None);
        assert_eq!(
            plugin
                .enrich(&request("default", Some("ml")))
                .model
                .as_deref(),
            Some("gpt-4o")
        );
    }

    #[test]
    fn force_model_always_overrides() {
        let enrichment = plugin(CONFIG).enrich(&request("gpt-4o", Some("support")));
        assert_eq!(enrichment.model.as_deref(), Some("gpt-4o-mini"));
    }

    #[test]
    fn unknown_or_missing_team_uses_default() {
        let plugin = plugin(CONFIG);
        for team in [None, Some("sales")] {
            let enrichment = plugin.enrich(&request("default", team));
            assert_eq!(enrichment.tags, vec!["untagged-team"]);
            assert_eq!(enrichment.model.as_deref(), Some("small"));
            assert!(enrichment.metadata.is_empty());
        }
    }

    #[test]
    fn nothing_without_a_match_or_default() {
        let plugin = plugin(r#"{"teams": {"ml": {"tags": ["ml"]}}}"#);
        assert!(plugin.enrich(&request("default", Some("sales"))).is_empty());
        assert!(plugin.enrich(&request("default", None)).is_empty());
    }

    #[test]
    fn empty_config_adds_nothing() {
        assert!(plugin("{}").enrich(&request("m", Some("ml"))).is_empty());
    }

    #[test]
    fn config_errors_name_the_field() {
        let err = TeamDefaults::init(Config::new(r#"{"teams": {"ml": {"tag": ["x"]}}}"#))
            .expect_err("typo");
        assert!(err.contains("teams.ml") && err.contains("tag"), "{err}");
        let err = TeamDefaults::init(Config::new(r#"{"teams": {"ml": {"force_model": true}}}"#))
            .expect_err("force without model");
        assert!(
            err.contains("teams.ml") && err.contains("force_model"),
            "{err}"
        );
        let err = TeamDefaults::init(Config::new(r#"{"default": {"model": " "}}"#))
            .expect_err("empty model");
        assert!(err.contains("default.model"), "{err}");
    }
}
