//! [`Config`]: a plugin's YAML `config` block, as the gateway hands it over.

use serde::de::DeserializeOwned;

/// The plugin's YAML `config` block as JSON text (`{}` when the block is absent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    json: String,
}

impl Config {
    /// Wraps JSON text, as the gateway passes it to `init`. Handy in tests:
    /// `MyPlugin::init(Config::new(r#"{"action": "block"}"#))`.
    pub fn new(json: impl Into<String>) -> Self {
        Self { json: json.into() }
    }

    /// The raw JSON text.
    pub fn json(&self) -> &str {
        &self.json
    }

    /// Deserializes the config into `T`.
    ///
    /// Blank text counts as `{}`, so a `T` whose fields all have defaults accepts a missing block.
    /// The error names the offending field by its path, e.g.
    /// ``invalid config at `teams.ml.tags`: invalid type: string "x", expected a sequence``.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, String> {
        let text = if self.json.trim().is_empty() {
            "{}"
        } else {
            self.json.as_str()
        };
        let mut de = serde_json::Deserializer::from_str(text);
        let value: T = serde_path_to_error::deserialize(&mut de).map_err(|err| {
            let path = err.path().to_string();
            let inner = err.into_inner();
            if path == "." {
                format!("invalid config: {inner}")
            } else {
                format!("invalid config at `{path}`: {inner}")
            }
        })?;
        // Trailing garbage after the JSON value is a mistake worth reporting too.
        de.end().map_err(|err| format!("invalid config: {err}"))?;
        Ok(value)
    }
}

impl Default for Config {
    /// An empty config block: `{}`.
    fn default() -> Self {
        Self::new("{}")
    }
}

#[cfg(test)]
mod tests {
    use super::Config;
    use serde::Deserialize;
    use std::collections::BTreeMap;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Settings {
        #[serde(default)]
        action: Option<String>,
        #[serde(default)]
        teams: BTreeMap<String, Team>,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    struct Team {
        tags: Vec<String>,
    }

    #[test]
    fn blank_text_is_an_empty_object() {
        let parsed: Settings = Config::new("  ").parse().expect("blank is {}");
        assert_eq!(parsed.action, None);
        assert_eq!(Config::default().json(), "{}");
    }

    #[test]
    fn parses_nested_values() {
        let config = Config::new(r#"{"action": "mask", "teams": {"ml": {"tags": ["a"]}}}"#);
        let parsed: Settings = config.parse().expect("valid");
        assert_eq!(parsed.action.as_deref(), Some("mask"));
        assert_eq!(parsed.teams["ml"].tags, vec!["a".to_string()]);
    }

    #[test]
    fn errors_name_the_path() {
        let err = Config::new(r#"{"teams": {"ml": {"tags": "x"}}}"#)
            .parse::<Settings>()
            .expect_err("tags must be a list");
        assert!(err.contains("teams.ml.tags"), "{err}");
    }

    #[test]
    fn errors_name_unknown_fields() {
        let err = Config::new(r#"{"acton": "mask"}"#)
            .parse::<Settings>()
            .expect_err("typo");
        assert!(err.contains("acton"), "{err}");
    }

    #[test]
    fn rejects_trailing_text() {
        let err = Config::new(r#"{} x"#)
            .parse::<Settings>()
            .expect_err("trailing");
        assert!(err.starts_with("invalid config"), "{err}");
    }
}
