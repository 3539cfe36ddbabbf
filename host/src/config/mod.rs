//! The YAML schema, loading and checking. **Unknown keys are errors**, and every error names the
//! field it is about (`models[2].api_bsae: unknown field`), because a typo that is silently ignored
//! is the most expensive kind of config bug.

mod env;

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::Digest;

use crate::providers::ProviderKind;

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub auth: AuthConfig,
    pub models: Vec<ModelConfig>,
    #[serde(default)]
    pub router: RouterConfig,
    #[serde(default)]
    pub plugins: PluginsConfig,
    #[serde(default)]
    pub store: StoreConfig,
    /// The directory of the config file: relative paths in the config start here.
    #[serde(skip)]
    pub base_dir: PathBuf,
    /// SHA-256 of the text this config was parsed from, so a reload can tell what it was built
    /// from without reading the file again.
    #[serde(skip)]
    pub text_hash: [u8; 32],
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub listen: String,
    pub max_request_bytes: usize,
    pub tls: Option<TlsConfig>,
    /// How long in-flight requests and streams may take to finish after SIGTERM.
    pub shutdown_drain_s: f64,
    /// Post-call events waiting for hooks; beyond this they are dropped and counted.
    pub post_call_queue: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:4000".into(),
            max_request_bytes: 4 * 1024 * 1024,
            tls: None,
            shutdown_drain_s: 30.0,
            post_call_queue: 10_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// May call every model; the management routes will require it.
    pub master_key: Option<String>,
    pub keys: Vec<KeyConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    pub key: String,
    pub alias: Option<String>,
    pub team: Option<String>,
    /// Model groups this key may call; absent means all.
    pub models: Option<Vec<String>>,
    /// Guardrails that run for this key's calls besides the `default_on` ones.
    #[serde(default)]
    pub guardrails: Vec<String>,
}

/// Where stored keys, teams, users and spend live. Read at start only: a reload that changes it
/// is refused.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// `sqlite://PATH` or `postgres://...`; absent means `portcullis.db` beside the config.
    pub database_url: Option<String>,
    /// 429 (the default, which the OpenAI SDKs raise as a rate-limit error without retrying) or
    /// 422, as LiteLLM's newer releases answer an exhausted budget.
    pub budget_exceeded_status: u16,
    /// `redis://HOST:PORT`: replicas share rate-limit and spend counters and hear of changes.
    pub redis_url: Option<String>,
    /// While Redis is unreachable, refuse calls with budgets or limits (503) instead of counting
    /// them on each replica alone.
    pub fail_closed: bool,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            database_url: None,
            budget_exceeded_status: 429,
            redis_url: None,
            fail_closed: false,
        }
    }
}

/// One deployment. Entries sharing `name` form a model group.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub name: String,
    pub provider: ProviderKind,
    /// The upstream's model id; defaults to `name`.
    pub model: Option<String>,
    pub api_base: Option<String>,
    pub api_key: Option<String>,
    /// A stable id for headers and logs; defaults to `name` plus the entry's position.
    pub id: Option<String>,
    #[serde(default = "default_weight")]
    pub weight: u32,
    pub rpm: Option<u64>,
    pub tpm: Option<u64>,
    pub timeout_s: Option<f64>,
    pub stream_idle_timeout_s: Option<f64>,
    pub input_cost_per_token: Option<f64>,
    pub output_cost_per_token: Option<f64>,
    pub api_version: Option<String>,
}

fn default_weight() -> u32 {
    1
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StrategyName {
    #[default]
    SimpleShuffle,
    LeastBusy,
    LatencyBased,
    UsageBased,
}

impl StrategyName {
    const ALL: [(&'static str, StrategyName); 4] = [
        ("simple-shuffle", StrategyName::SimpleShuffle),
        ("least-busy", StrategyName::LeastBusy),
        ("latency-based", StrategyName::LatencyBased),
        ("usage-based", StrategyName::UsageBased),
    ];

    /// The built-in strategy with this name, if it is one.
    pub fn builtin(name: &str) -> Option<StrategyName> {
        Self::ALL.iter().find(|(n, _)| *n == name).map(|(_, s)| *s)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RouterConfig {
    /// A built-in strategy's name or an enabled router plugin's name.
    pub strategy: String,
    /// What a router plugin falls back to when its answer is unusable.
    pub fallback_strategy: StrategyName,
    pub num_retries: u32,
    pub timeout_s: f64,
    pub stream_idle_timeout_s: f64,
    pub fallbacks: BTreeMap<String, Vec<String>>,
    pub allowed_fails: u32,
    pub cooldown_s: f64,
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            strategy: "simple-shuffle".into(),
            fallback_strategy: StrategyName::SimpleShuffle,
            num_retries: 2,
            timeout_s: 600.0,
            stream_idle_timeout_s: 120.0,
            fallbacks: BTreeMap::new(),
            allowed_fails: 3,
            cooldown_s: 30.0,
        }
    }
}

/// WebAssembly plugins.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PluginsConfig {
    /// Where plugin files live, relative to the config file.
    pub dir: PathBuf,
    pub enabled: Vec<PluginConfig>,
}

impl Default for PluginsConfig {
    fn default() -> Self {
        PluginsConfig {
            dir: PathBuf::from("plugins"),
            enabled: Vec::new(),
        }
    }
}

/// One enabled plugin. What it does (guardrail, enricher, router, hook) is read from the component.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginConfig {
    /// Unique; what keys, requests and `router.strategy` refer to.
    pub name: String,
    /// The `.wasm` file, relative to `plugins.dir`.
    pub path: PathBuf,
    /// For guardrails: when they run.
    #[serde(default)]
    pub mode: GuardrailMode,
    /// For guardrails: run on every call, not only when a key or the request names it.
    #[serde(default)]
    pub default_on: bool,
    /// For guardrails: evaluate and log the verdict without acting on it.
    #[serde(default)]
    pub monitor: bool,
    /// What a failure of the plugin (trap, timeout, memory cap) means for the call.
    #[serde(default)]
    pub on_error: OnError,
    #[serde(default)]
    pub limits: PluginLimits,
    /// `fresh`: a new instance for every call, so no call sees another's data. `pooled`: warm
    /// instances reused, one call at a time.
    #[serde(default)]
    pub instance: InstanceMode,
    /// With `instance: pooled`: how many calls one instance serves before it is replaced (a
    /// whole stream counts as one, or each delta with `stream_instance: per_delta`). Any failure
    /// replaces it at once.
    #[serde(default = "default_recycle_after")]
    pub recycle_after: u32,
    /// For `post_call` guardrails on streams: one instance for the whole stream, or a call of its
    /// own for each delta.
    #[serde(default)]
    pub stream_instance: StreamInstance,
    #[serde(default)]
    pub capabilities: Capabilities,
    /// Handed to the plugin's `init` as JSON.
    #[serde(default)]
    pub config: Option<serde_yaml::Value>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GuardrailMode {
    /// Before the upstream call, in configured order; a rewrite feeds the next guardrail.
    #[default]
    PreCall,
    /// While the upstream call runs; a block cancels it. Nothing reaches the client before the
    /// verdict. Rewrites come too late to matter and are ignored.
    DuringCall,
    /// On the response: a whole one, or each streamed delta.
    PostCall,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceMode {
    #[default]
    Fresh,
    Pooled,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamInstance {
    /// One instance sees the stream from its first delta to its last, in order, as the contract
    /// promises a guardrail that keeps what it saw.
    #[default]
    PerStream,
    /// Each delta is a call of its own, on whatever instance `instance` gives a call. For a
    /// guardrail that keeps nothing between deltas (the gateway hands back held and released
    /// text): open streams then hold no instance at all.
    PerDelta,
}

fn default_recycle_after() -> u32 {
    1000
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    /// The call fails with an error naming the plugin.
    #[default]
    Block,
    /// The call goes on as if the plugin had allowed it; the failure is logged and counted.
    Allow,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PluginLimits {
    /// Linear memory cap per instance.
    pub memory_mb: u64,
    /// Time one hook call may spend running guest code, instantiation included. Waiting for a
    /// core does not count; on the wall clock a call may last ten times this.
    pub timeout_ms: u64,
}

impl Default for PluginLimits {
    fn default() -> Self {
        PluginLimits {
            memory_mb: 32,
            timeout_ms: 100,
        }
    }
}

/// What a plugin may reach beyond its own memory. Nothing by default.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Capabilities {
    pub dirs: Vec<DirGrant>,
    /// Real wall and monotonic clocks; without this grant both read zero.
    pub clocks: bool,
}

/// A host directory the plugin sees at `guest`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirGrant {
    /// Relative to the config file.
    pub host: PathBuf,
    pub guest: String,
    #[serde(default)]
    pub write: bool,
}

/// The largest memory cap a plugin may ask for; the instance pool reserves this much per slot.
pub const MAX_PLUGIN_MEMORY_MB: u64 = 1024;

/// A config that could not be loaded, with the field it is about.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{0}")]
    Syntax(String),
    /// `field` is a path like `models[2].api_base`.
    #[error("{field}: {message}")]
    Field { field: String, message: String },
}

impl ConfigError {
    fn field(field: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Field {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl Config {
    /// Reads, expands `${VAR}`s from the process environment, parses and checks a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_owned(),
            error,
        })?;
        Config::from_file_text(path, &text)
    }

    /// [`Config::load`] for text already read from `path`.
    pub fn from_file_text(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let mut config = Config::parse(text, &|name| std::env::var(name).ok())?;
        config.base_dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_owned();
        Ok(config)
    }

    /// A path from the config, resolved against the config file's directory.
    pub fn resolve(&self, path: &Path) -> PathBuf {
        self.base_dir.join(path)
    }

    /// Where an enabled plugin's file is.
    /// The database to open: the configured URL, or the SQLite file beside the config.
    pub fn database_url(&self) -> String {
        let url = self
            .store
            .database_url
            .clone()
            .unwrap_or_else(|| "sqlite://portcullis.db".to_owned());
        let Some(file) = url.strip_prefix("sqlite://") else {
            return url;
        };
        // A relative file is beside the config, like every other path in it; the file is
        // created on first start unless the URL says otherwise.
        let path = if file.starts_with('/') || file.starts_with(':') {
            file.to_owned()
        } else {
            self.base_dir.join(file).display().to_string()
        };
        let mode = if path.contains('?') { "" } else { "?mode=rwc" };
        format!("sqlite://{path}{mode}")
    }

    pub fn plugin_path(&self, plugin: &PluginConfig) -> PathBuf {
        self.resolve(&self.plugins.dir).join(&plugin.path)
    }

    /// Parses and checks config text; `lookup` resolves `${VAR}`.
    pub fn parse(
        text: &str,
        lookup: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let text_hash = sha2::Sha256::digest(text.as_bytes()).into();
        let mut value: serde_yaml::Value = serde_yaml::from_str(text)
            .map_err(|e| ConfigError::Syntax(format!("the file is not valid YAML: {e}")))?;
        env::expand(&mut value, lookup)?;
        let mut config: Config = serde_path_to_error::deserialize(value).map_err(describe_error)?;
        config.text_hash = text_hash;
        config.check()?;
        Ok(config)
    }

    /// Checks what the schema alone cannot: references between sections, addresses, numbers.
    fn check(&self) -> Result<(), ConfigError> {
        self.server.listen.parse::<SocketAddr>().map_err(|e| {
            ConfigError::field("server.listen", format!("not a socket address: {e}"))
        })?;
        if self.server.max_request_bytes == 0 {
            return Err(ConfigError::field(
                "server.max_request_bytes",
                "must be positive",
            ));
        }
        non_negative("server.shutdown_drain_s", self.server.shutdown_drain_s)?;
        if self.models.is_empty() {
            return Err(ConfigError::field(
                "models",
                "at least one model is required",
            ));
        }
        let groups: HashSet<&str> = self.models.iter().map(|m| m.name.as_str()).collect();
        let mut ids = HashSet::new();
        for (i, model) in self.models.iter().enumerate() {
            model.check(&format!("models[{i}]"))?;
            if !ids.insert(model.deployment_id(i)) {
                return Err(ConfigError::field(
                    format!("models[{i}].id"),
                    format!("duplicate deployment id '{}'", model.deployment_id(i)),
                ));
            }
        }
        let mut keys = HashSet::new();
        for (i, key) in self.auth.keys.iter().enumerate() {
            let at = format!("auth.keys[{i}]");
            if key.key.is_empty() {
                return Err(ConfigError::field(format!("{at}.key"), "must not be empty"));
            }
            if !keys.insert(key.key.as_str()) || self.auth.master_key.as_deref() == Some(&key.key) {
                return Err(ConfigError::field(format!("{at}.key"), "duplicate key"));
            }
            for (j, model) in key.models.iter().flatten().enumerate() {
                if !groups.contains(model.as_str()) {
                    return Err(ConfigError::field(
                        format!("{at}.models[{j}]"),
                        format!("no model named '{model}' in models"),
                    ));
                }
            }
        }
        if self.auth.master_key.as_deref() == Some("") {
            return Err(ConfigError::field("auth.master_key", "must not be empty"));
        }
        if let Some(url) = &self.store.database_url {
            let known = ["sqlite:", "postgres://", "postgresql://"];
            if !known.iter().any(|scheme| url.starts_with(scheme)) {
                return Err(ConfigError::field(
                    "store.database_url",
                    "must start with sqlite:, postgres:// or postgresql://",
                ));
            }
        }
        if let Some(url) = &self.store.redis_url {
            if !url.starts_with("redis://") || redis::Client::open(url.as_str()).is_err() {
                return Err(ConfigError::field(
                    "store.redis_url",
                    "must be a redis://HOST[:PORT][/DB] URL",
                ));
            }
        }
        if self.store.fail_closed && self.store.redis_url.is_none() {
            return Err(ConfigError::field(
                "store.fail_closed",
                "applies to Redis only: set store.redis_url too",
            ));
        }
        if ![422, 429].contains(&self.store.budget_exceeded_status) {
            return Err(ConfigError::field(
                "store.budget_exceeded_status",
                "must be 429 or 422",
            ));
        }
        let mut plugin_names = HashSet::new();
        for (i, plugin) in self.plugins.enabled.iter().enumerate() {
            let at = format!("plugins.enabled[{i}]");
            if plugin.name.is_empty() {
                return Err(ConfigError::field(
                    format!("{at}.name"),
                    "must not be empty",
                ));
            }
            if !plugin_names.insert(plugin.name.as_str()) {
                return Err(ConfigError::field(
                    format!("{at}.name"),
                    format!("duplicate plugin name '{}'", plugin.name),
                ));
            }
            if plugin.limits.memory_mb == 0 || plugin.limits.memory_mb > MAX_PLUGIN_MEMORY_MB {
                return Err(ConfigError::field(
                    format!("{at}.limits.memory_mb"),
                    format!("must be between 1 and {MAX_PLUGIN_MEMORY_MB}"),
                ));
            }
            if plugin.recycle_after == 0 {
                return Err(ConfigError::field(
                    format!("{at}.recycle_after"),
                    "must be at least 1",
                ));
            }
            if plugin.limits.timeout_ms == 0 {
                return Err(ConfigError::field(
                    format!("{at}.limits.timeout_ms"),
                    "must be positive",
                ));
            }
            for (j, dir) in plugin.capabilities.dirs.iter().enumerate() {
                if !dir.guest.starts_with('/') {
                    return Err(ConfigError::field(
                        format!("{at}.capabilities.dirs[{j}].guest"),
                        "must be an absolute path such as /logs",
                    ));
                }
            }
        }
        for (i, key) in self.auth.keys.iter().enumerate() {
            for (j, name) in key.guardrails.iter().enumerate() {
                if !plugin_names.contains(name.as_str()) {
                    return Err(ConfigError::field(
                        format!("auth.keys[{i}].guardrails[{j}]"),
                        format!("no enabled plugin named '{name}'"),
                    ));
                }
            }
        }
        let router = &self.router;
        if StrategyName::builtin(&router.strategy).is_none()
            && !plugin_names.contains(router.strategy.as_str())
        {
            let builtins: Vec<&str> = StrategyName::ALL.iter().map(|(n, _)| *n).collect();
            return Err(ConfigError::field(
                "router.strategy",
                format!(
                    "'{}' is neither a built-in strategy ({}) nor an enabled plugin",
                    router.strategy,
                    builtins.join(", ")
                ),
            ));
        }
        positive("router.timeout_s", router.timeout_s)?;
        positive("router.stream_idle_timeout_s", router.stream_idle_timeout_s)?;
        non_negative("router.cooldown_s", router.cooldown_s)?;
        for (group, fallbacks) in &router.fallbacks {
            if !groups.contains(group.as_str()) {
                return Err(ConfigError::field(
                    format!("router.fallbacks.{group}"),
                    format!("no model named '{group}' in models"),
                ));
            }
            for (j, fallback) in fallbacks.iter().enumerate() {
                if !groups.contains(fallback.as_str()) {
                    return Err(ConfigError::field(
                        format!("router.fallbacks.{group}[{j}]"),
                        format!("no model named '{fallback}' in models"),
                    ));
                }
            }
        }
        Ok(())
    }
}

impl ModelConfig {
    /// The deployment's id as headers and logs show it.
    pub fn deployment_id(&self, index: usize) -> String {
        self.id
            .clone()
            .unwrap_or_else(|| format!("{}-{index}", self.name))
    }

    fn check(&self, at: &str) -> Result<(), ConfigError> {
        if self.name.is_empty() {
            return Err(ConfigError::field(
                format!("{at}.name"),
                "must not be empty",
            ));
        }
        let needs_base = matches!(
            self.provider,
            ProviderKind::OpenaiCompatible | ProviderKind::Azure
        );
        if needs_base && self.api_base.is_none() {
            return Err(ConfigError::field(
                format!("{at}.api_base"),
                "required for this provider",
            ));
        }
        if let Some(base) = &self.api_base {
            if !(base.starts_with("http://") || base.starts_with("https://")) {
                return Err(ConfigError::field(
                    format!("{at}.api_base"),
                    "must start with http:// or https://",
                ));
            }
            base.parse::<http::Uri>().map_err(|e| {
                ConfigError::field(format!("{at}.api_base"), format!("not a URL: {e}"))
            })?;
        }
        if self.provider == ProviderKind::Azure && self.api_version.is_none() {
            return Err(ConfigError::field(
                format!("{at}.api_version"),
                "required for azure deployments",
            ));
        }
        if self.weight == 0 {
            return Err(ConfigError::field(
                format!("{at}.weight"),
                "must be at least 1",
            ));
        }
        for (field, value) in [
            ("timeout_s", self.timeout_s),
            ("stream_idle_timeout_s", self.stream_idle_timeout_s),
        ] {
            if let Some(v) = value {
                positive(&format!("{at}.{field}"), v)?;
            }
        }
        for (field, value) in [
            ("input_cost_per_token", self.input_cost_per_token),
            ("output_cost_per_token", self.output_cost_per_token),
        ] {
            if let Some(v) = value {
                non_negative(&format!("{at}.{field}"), v)?;
            }
        }
        Ok(())
    }
}

fn positive(field: &str, value: f64) -> Result<(), ConfigError> {
    if value.is_finite() && value > 0.0 {
        Ok(())
    } else {
        Err(ConfigError::field(field, "must be a positive number"))
    }
}

fn non_negative(field: &str, value: f64) -> Result<(), ConfigError> {
    if value.is_finite() && value >= 0.0 {
        Ok(())
    } else {
        Err(ConfigError::field(field, "must be zero or more"))
    }
}

/// Turns serde's error into `path: message`, moving an unknown field's name into the path.
fn describe_error(err: serde_path_to_error::Error<serde_yaml::Error>) -> ConfigError {
    let path = err.path().to_string();
    let message = err.inner().to_string();
    // serde reports the struct's path and "unknown field `x`, expected ...".
    if let Some(rest) = message.strip_prefix("unknown field `") {
        if let Some((name, expected)) = rest.split_once('`') {
            // serde_path_to_error already ends the path with the unknown key.
            let field = if path.ends_with(name) {
                path
            } else if path == "." {
                name.to_owned()
            } else {
                format!("{path}.{name}")
            };
            let expected = expected.trim_start_matches(", ");
            return ConfigError::field(field, format!("unknown field ({expected})"));
        }
    }
    if path == "." {
        // serde names a missing top-level field in its message.
        return ConfigError::Syntax(message);
    }
    ConfigError::field(path, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, &|name| (name == "SET").then(|| "value".to_owned()))
    }

    const MINIMAL: &str = "models:\n  - { name: m, provider: mock }\n";

    #[test]
    fn minimal_config_gets_defaults() {
        let config = parse(MINIMAL).expect("valid");
        assert_eq!(config.server.listen, "127.0.0.1:4000");
        assert_eq!(config.server.max_request_bytes, 4_194_304);
        assert_eq!(config.router.num_retries, 2);
        assert_eq!(config.models[0].weight, 1);
    }

    #[test]
    fn unknown_field_is_named_with_its_path() {
        let text = "models:\n  - { name: a, provider: mock }\n  - { name: b, provider: mock }\n  - { name: c, provider: openai, api_bsae: x }\n";
        let err = parse(text).expect_err("typo").to_string();
        assert!(
            err.starts_with("models[2].api_bsae: unknown field"),
            "{err}"
        );
    }

    #[test]
    fn unknown_top_level_section_is_an_error() {
        let err = parse(&format!("{MINIMAL}routr: {{}}\n"))
            .expect_err("typo")
            .to_string();
        assert!(err.starts_with("routr: unknown field"), "{err}");
    }

    #[test]
    fn wrong_type_names_the_field() {
        let err = parse(&format!("{MINIMAL}router: {{ num_retries: lots }}\n"))
            .expect_err("bad type")
            .to_string();
        assert!(err.starts_with("router.num_retries:"), "{err}");
    }

    #[test]
    fn references_are_checked() {
        let err = parse(&format!(
            "{MINIMAL}router: {{ fallbacks: {{ m: [nope] }} }}\n"
        ))
        .expect_err("bad fallback")
        .to_string();
        assert!(err.starts_with("router.fallbacks.m[0]:"), "{err}");
        let err = parse(&format!(
            "{MINIMAL}auth: {{ keys: [ {{ key: k, models: [x] }} ] }}\n"
        ))
        .expect_err("bad key model")
        .to_string();
        assert!(err.starts_with("auth.keys[0].models[0]:"), "{err}");
    }

    #[test]
    fn redis_settings_are_checked() {
        let store = |yaml: &str| parse(&format!("{MINIMAL}store: {yaml}\n"));
        let ok = store("{ redis_url: 'redis://127.0.0.1:6379/2', fail_closed: true }")
            .expect("a redis store");
        assert!(ok.store.fail_closed);
        for (yaml, field) in [
            ("{ redis_url: 'http://cache:6379' }", "store.redis_url:"),
            ("{ redis_url: 'redis://' }", "store.redis_url:"),
            ("{ fail_closed: true }", "store.fail_closed:"),
        ] {
            let err = store(yaml).expect_err(yaml).to_string();
            assert!(err.starts_with(field), "{yaml}: {err}");
        }
    }

    #[test]
    fn azure_needs_api_version_and_base() {
        let err = parse("models:\n  - { name: a, provider: azure, api_base: 'https://x' }\n")
            .expect_err("no version")
            .to_string();
        assert!(err.starts_with("models[0].api_version:"), "{err}");
    }

    #[test]
    fn env_vars_expand_and_missing_ones_are_errors() {
        let config = parse("models:\n  - { name: m, provider: mock, api_key: 'k-${SET}' }\n")
            .expect("valid");
        assert_eq!(config.models[0].api_key.as_deref(), Some("k-value"));
        let err = parse("models:\n  - { name: m, provider: mock, api_key: '${UNSET}' }\n")
            .expect_err("unset")
            .to_string();
        assert_eq!(
            err,
            "models[0].api_key: environment variable UNSET is not set"
        );
    }

    #[test]
    fn a_stream_guardrail_checks_with_one_instance_a_stream_unless_told_per_delta() {
        let plugin = |line: &str| {
            parse(&format!(
                "{MINIMAL}plugins:\n  enabled:\n    - {{ name: p, path: p.wasm{line} }}\n"
            ))
        };
        let default = plugin("").expect("valid");
        assert_eq!(
            default.plugins.enabled[0].stream_instance,
            StreamInstance::PerStream
        );
        let per_delta = plugin(", stream_instance: per_delta").expect("valid");
        assert_eq!(
            per_delta.plugins.enabled[0].stream_instance,
            StreamInstance::PerDelta
        );
        let err = plugin(", stream_instance: shared")
            .expect_err("no such value")
            .to_string();
        assert!(
            err.starts_with("plugins.enabled[0].stream_instance: unknown variant `shared`"),
            "{err}"
        );
    }

    #[test]
    fn shipped_example_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/portcullis.yaml");
        let text = std::fs::read_to_string(path).expect("example config exists");
        Config::parse(&text, &|_| None).expect("example config serves with no secrets");
    }

    #[test]
    fn shipped_example_plugins_block_is_valid_once_uncommented() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/portcullis.yaml");
        let text = std::fs::read_to_string(path).expect("example config exists");
        let (head, commented) = text.split_once("# plugins:").expect("a plugins example");
        let block: String = commented
            .lines()
            .map(|line| line.strip_prefix("# ").unwrap_or(line))
            .collect::<Vec<_>>()
            .join("\n");
        let config = Config::parse(&format!("{head}plugins:{block}\n"), &|_| None)
            .expect("the plugins example parses");
        assert_eq!(config.plugins.enabled.len(), 3);
    }
}
