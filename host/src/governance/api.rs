//! The management routes, in LiteLLM's paths and shapes so that existing scripts keep working:
//! `/key/*`, `/team/*`, `/user/*` and `/spend/logs`. Master key only, except that any key may read
//! its own `/key/info`. **Every change invalidates the cached keys it touches, here and on every
//! replica it can reach, before it answers.**

use bytes::Bytes;
use http::{HeaderMap, Method, Response, StatusCode};
use http_body::Body;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use super::changes::Change;
use super::limits::{EntityId, Kind};
use super::period::{self, Span};
use super::secret;
use super::store::{
    KeyFilter, KeyRecord, Policy, SpendFilter, SpendRow, StoreError, StoredSpend, TeamRecord,
    UserRecord,
};
use super::Governance;
use crate::error::GatewayError;
use crate::generation::Generation;
use crate::pipeline::authenticate::{self, Principal};
use crate::pipeline::respond::{error_response, json_response, ResponseBody};
use crate::pipeline::validate;
use crate::providers::JsonObject;

const MAX_PAGE_SIZE: i64 = 1_000;
const DEFAULT_SPEND_LOG_LIMIT: i64 = 10_000;

/// The method a management route takes; `None` if `route` is not one.
pub fn method_for(route: &str) -> Option<Method> {
    match route {
        "/key/generate" | "/key/update" | "/key/delete" | "/key/block" | "/key/unblock"
        | "/key/regenerate" | "/team/new" | "/team/update" | "/team/delete" | "/user/new" => {
            Some(Method::POST)
        }
        "/key/info" | "/key/list" | "/team/info" | "/team/list" | "/user/info" | "/spend/logs" => {
            Some(Method::GET)
        }
        _ => None,
    }
}

/// Serves one management route (its method already checked).
pub async fn handle<B>(
    generation: &Generation,
    route: &str,
    query: &str,
    headers: &HeaderMap,
    body: B,
) -> Response<ResponseBody>
where
    B: Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    match run(generation, route, query, headers, body).await {
        Ok(value) => json_response(StatusCode::OK, Bytes::from(value.to_string())),
        Err(err) => {
            if err.status().is_server_error() {
                tracing::warn!(route, error = %err, "management call failed");
            }
            error_response(&err, None)
        }
    }
}

async fn run<B>(
    generation: &Generation,
    route: &str,
    query: &str,
    headers: &HeaderMap,
    body: B,
) -> Result<Value, GatewayError>
where
    B: Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let Some(governance) = &generation.governance else {
        return Err(GatewayError::Unavailable("no store is configured".into()));
    };
    let params = Params::parse(query);
    if route == "/key/info" {
        let caller = authenticate::authenticate(generation, headers).await?;
        return key_info(governance, &caller, params.get("key")).await;
    }
    authenticate::require_master(generation, headers).await?;
    let mut fields = if method_for(route) == Some(Method::POST) {
        let limit = generation.config.server.max_request_bytes;
        Fields::parse(&validate::read_body(headers, body, limit).await?)?
    } else {
        Fields::default()
    };
    let g = governance.as_ref();
    let value = match route {
        "/key/generate" => {
            let (key, record) = generate(g, &mut fields, None).await?;
            created(g, key, &record)
        }
        "/key/update" => {
            let mut record = existing_key(g, &fields.required::<String>("key")?).await?;
            KeyPatch::read(&mut fields)?.apply(&mut record, period::now_ms());
            fields.finish()?;
            check_team(g, record.team_id.as_deref()).await?;
            save_key(g, &record).await?
        }
        "/key/block" | "/key/unblock" => {
            let mut record = existing_key(g, &fields.required::<String>("key")?).await?;
            fields.finish()?;
            record.blocked = route == "/key/block";
            record.updated_at = period::now_ms();
            save_key(g, &record).await?
        }
        "/key/regenerate" => {
            let mut record = existing_key(g, &fields.required::<String>("key")?).await?;
            fields.finish()?;
            let old_token = record.token.clone();
            let key = new_key()?;
            record.token = secret::hash_key(&key);
            record.key_name = secret::abbreviate(&key);
            record.updated_at = period::now_ms();
            g.store.update(&record).await.map_err(internal)?;
            g.announce(&[Change::Key(old_token), Change::Key(record.token.clone())])
                .await;
            created(g, key, &record)
        }
        "/key/delete" => {
            let given: Vec<String> = fields.required("keys")?;
            fields.finish()?;
            let mut records = Vec::with_capacity(given.len());
            for key in &given {
                records.push(existing_key(g, key).await?);
            }
            let ids: Vec<String> = records.iter().map(|r| r.id.clone()).collect();
            g.store
                .delete_keys(&ids, period::now_ms())
                .await
                .map_err(internal)?;
            let changes: Vec<Change> = records
                .iter()
                .flat_map(|r| {
                    [
                        Change::Key(r.token.clone()),
                        Change::Deleted(EntityId::new(Kind::Key, &r.id)),
                    ]
                })
                .collect();
            g.announce(&changes).await;
            json!({ "deleted_keys": given })
        }
        "/key/list" => list_keys(g, &params).await?,
        "/team/new" => {
            let team = new_team(&mut fields)?;
            if g.store
                .team(&team.team_id)
                .await
                .map_err(internal)?
                .is_some()
            {
                return Err(GatewayError::invalid(
                    format!("a team '{}' exists already", team.team_id),
                    Some("team_id".into()),
                ));
            }
            g.store.insert(&team).await.map_err(internal)?;
            team_json(g, &team)
        }
        "/team/update" => {
            let mut team = existing_team(g, &fields.required::<String>("team_id")?).await?;
            let now = period::now_ms();
            read_team_fields(&mut fields, &mut team, now)?;
            fields.finish()?;
            team.updated_at = now;
            g.store.update(&team).await.map_err(internal)?;
            g.announce(&[Change::Everything]).await;
            team_json(g, &team)
        }
        "/team/delete" => {
            let ids: Vec<String> = fields.required("team_ids")?;
            fields.finish()?;
            for id in &ids {
                existing_team(g, id).await?;
            }
            for id in &ids {
                g.store
                    .delete_team(id, period::now_ms())
                    .await
                    .map_err(internal)?;
            }
            let mut changes: Vec<Change> = ids
                .iter()
                .map(|id| Change::Deleted(EntityId::new(Kind::Team, id)))
                .collect();
            changes.push(Change::Everything);
            g.announce(&changes).await;
            json!({ "deleted_teams": ids })
        }
        "/team/info" => {
            let team = existing_team(g, params.required("team_id")?).await?;
            let filter = KeyFilter {
                team_id: Some(team.team_id.clone()),
                ..KeyFilter::default()
            };
            let keys = all_keys(g, &filter).await?;
            json!({ "team_id": team.team_id, "team_info": team_json(g, &team), "keys": keys })
        }
        "/team/list" => {
            let teams = g.store.list_teams().await.map_err(internal)?;
            Value::Array(teams.iter().map(|t| team_json(g, t)).collect())
        }
        "/user/new" => {
            let user = new_user(&mut fields)?;
            if g.store
                .user(&user.user_id)
                .await
                .map_err(internal)?
                .is_some()
            {
                return Err(GatewayError::invalid(
                    format!("a user '{}' exists already", user.user_id),
                    Some("user_id".into()),
                ));
            }
            g.store.insert(&user).await.map_err(internal)?;
            let (key, record) = generate(g, &mut Fields::default(), Some(&user.user_id)).await?;
            let mut body = user_json(g, &user);
            if let Value::Object(map) = &mut body {
                map.insert("key".into(), Value::String(key));
                map.insert("token".into(), Value::String(record.token));
            }
            body
        }
        "/user/info" => {
            let user_id = params.required("user_id")?;
            let user = g
                .store
                .user(user_id)
                .await
                .map_err(internal)?
                .ok_or_else(|| GatewayError::NotFound(format!("no user '{user_id}'")))?;
            let filter = KeyFilter {
                user_id: Some(user.user_id.clone()),
                ..KeyFilter::default()
            };
            let keys = all_keys(g, &filter).await?;
            json!({ "user_id": user.user_id, "user_info": user_json(g, &user), "keys": keys })
        }
        "/spend/logs" => spend_logs(g, &params).await?,
        _ => {
            return Err(GatewayError::RouteNotFound(format!(
                "unknown route {route}"
            )))
        }
    };
    Ok(value)
}

async fn key_info(
    g: &Governance,
    caller: &Principal,
    key: Option<&str>,
) -> Result<Value, GatewayError> {
    let token = match key {
        Some(key) => secret::token_of(key),
        None => caller.token.clone().ok_or_else(|| {
            GatewayError::invalid("name the key: /key/info?key=...", Some("key".into()))
        })?,
    };
    if !caller.is_master && caller.token.as_deref() != Some(token.as_str()) {
        return Err(GatewayError::Forbidden(
            "a key may read only its own /key/info; other keys need the master key".into(),
        ));
    }
    let record = existing_key(g, &token).await?;
    Ok(json!({ "key": key.unwrap_or(&token), "info": key_json(g, &record) }))
}

async fn list_keys(g: &Governance, params: &Params) -> Result<Value, GatewayError> {
    let page = params.number("page")?.unwrap_or(1).max(1);
    let size = params.number("size")?.unwrap_or(50).clamp(1, MAX_PAGE_SIZE);
    let filter = KeyFilter {
        team_id: params.get("team_id").map(str::to_owned),
        user_id: params.get("user_id").map(str::to_owned),
        key_alias: params.get("key_alias").map(str::to_owned),
    };
    let (keys, total) = g
        .store
        .list_keys(&filter, (page - 1).saturating_mul(size), size)
        .await
        .map_err(internal)?;
    let full = params.get("return_full_object") == Some("true");
    let keys: Vec<Value> = keys
        .iter()
        .map(|k| {
            if full {
                key_json(g, k)
            } else {
                Value::String(k.token.clone())
            }
        })
        .collect();
    Ok(json!({
        "keys": keys,
        "total_count": total,
        "current_page": page,
        "total_pages": (total + size - 1) / size,
    }))
}

async fn all_keys(g: &Governance, filter: &KeyFilter) -> Result<Vec<Value>, GatewayError> {
    let (keys, _) = g
        .store
        .list_keys(filter, 0, i64::MAX)
        .await
        .map_err(internal)?;
    Ok(keys.iter().map(|k| key_json(g, k)).collect())
}

async fn spend_logs(g: &Governance, params: &Params) -> Result<Value, GatewayError> {
    let date = |name: &'static str| -> Result<Option<i64>, GatewayError> {
        params
            .get(name)
            .map(|text| {
                period::parse_date(text).ok_or_else(|| {
                    GatewayError::invalid(
                        format!("{name}: expected YYYY-MM-DD or an RFC 3339 time, got '{text}'"),
                        Some(name.into()),
                    )
                })
            })
            .transpose()
    };
    // A bare end date means the whole of that day.
    let end = date("end_date")?.map(|end| {
        if params.get("end_date").is_some_and(|t| t.trim().len() == 10) {
            end + 86_400_000
        } else {
            end
        }
    });
    let filter = SpendFilter {
        api_key: params.get("api_key").map(secret::token_of),
        user_id: params.get("user_id").map(str::to_owned),
        team_id: params.get("team_id").map(str::to_owned),
        request_id: params.get("request_id").map(str::to_owned),
        start: date("start_date")?,
        end,
        limit: params
            .number("limit")?
            .unwrap_or(DEFAULT_SPEND_LOG_LIMIT)
            .max(1),
    };
    let rows = g.store.spend_logs(&filter).await.map_err(internal)?;
    Ok(Value::Array(rows.iter().map(spend_row_json).collect()))
}

fn spend_row_json(row: &SpendRow) -> Value {
    json!({
        "request_id": row.request_id,
        "api_key": row.api_key,
        "key_alias": row.key_alias,
        "spend": row.spend,
        "prompt_tokens": row.prompt_tokens,
        "completion_tokens": row.completion_tokens,
        "total_tokens": row.total_tokens,
        "model": row.model,
        "model_group": row.model_group,
        "model_id": row.model_id,
        "user": row.user_id,
        "team_id": row.team_id,
        "end_user": row.end_user,
        "startTime": period::iso(row.start_time),
        "endTime": period::iso(row.end_time),
        "status": row.status,
    })
}

// ---------------------------------------------------------------------------------- keys

fn new_key() -> Result<String, GatewayError> {
    secret::generate_key()
        .map_err(|e| GatewayError::Internal(format!("the OS random source failed: {e}")))
}

fn new_id() -> Result<String, GatewayError> {
    secret::generate_id()
        .map_err(|e| GatewayError::Internal(format!("the OS random source failed: {e}")))
}

/// Creates a key from `/key/generate`'s fields (or, for `/user/new`, a plain key of `user_id`).
async fn generate(
    g: &Governance,
    fields: &mut Fields,
    user_id: Option<&str>,
) -> Result<(String, KeyRecord), GatewayError> {
    let now = period::now_ms();
    let key = new_key()?;
    let mut record = KeyRecord {
        id: new_id()?,
        token: secret::hash_key(&key),
        key_name: secret::abbreviate(&key),
        key_alias: None,
        team_id: None,
        user_id: user_id.map(str::to_owned),
        policy: Policy {
            budget_anchor: now,
            ..Policy::default()
        },
        expires_at: None,
        metadata: JsonObject::new(),
        guardrails: Vec::new(),
        blocked: false,
        spend: StoredSpend::default(),
        created_at: now,
        updated_at: now,
        deleted_at: None,
    };
    KeyPatch::read(fields)?.apply(&mut record, now);
    fields.finish()?;
    check_team(g, record.team_id.as_deref()).await?;
    record.spend.period_start = record.policy.period_start(now);
    g.store.insert(&record).await.map_err(internal)?;
    // A lookup of this key before it existed may have been cached as unknown.
    g.announce(&[Change::Key(record.token.clone())]).await;
    Ok((key, record))
}

/// The response that shows a key's plaintext, the only one that ever does.
fn created(g: &Governance, key: String, record: &KeyRecord) -> Value {
    let mut body = key_json(g, record);
    if let Value::Object(map) = &mut body {
        map.insert("key".into(), Value::String(key));
    }
    body
}

async fn save_key(g: &Governance, record: &KeyRecord) -> Result<Value, GatewayError> {
    g.store.update(record).await.map_err(internal)?;
    g.announce(&[Change::Key(record.token.clone())]).await;
    Ok(key_json(g, record))
}

async fn existing_key(g: &Governance, key: &str) -> Result<KeyRecord, GatewayError> {
    match g.store.key_by_token(&secret::token_of(key)).await {
        Ok(Some(record)) if record.deleted_at.is_none() => Ok(record),
        Ok(_) => Err(GatewayError::NotFound(format!(
            "no key {}",
            if key.starts_with("sk-") {
                secret::abbreviate(key)
            } else {
                key.to_owned()
            }
        ))),
        Err(e) => Err(internal(e)),
    }
}

async fn check_team(g: &Governance, team_id: Option<&str>) -> Result<(), GatewayError> {
    if let Some(id) = team_id {
        if g.store.team(id).await.map_err(internal)?.is_none() {
            return Err(GatewayError::invalid(
                format!("team_id: no team '{id}'; create it with /team/new"),
                Some("team_id".into()),
            ));
        }
    }
    Ok(())
}

/// A key's fields from a request: what `/key/generate` sets and `/key/update` changes.
struct KeyPatch {
    policy: PolicyPatch,
    key_alias: Patch<String>,
    team_id: Patch<String>,
    user_id: Patch<String>,
    metadata: Patch<JsonObject>,
    guardrails: Patch<Vec<String>>,
    blocked: Patch<bool>,
    /// The key's lifetime from now.
    duration: Patch<Span>,
}

impl KeyPatch {
    fn read(fields: &mut Fields) -> Result<KeyPatch, GatewayError> {
        Ok(KeyPatch {
            policy: PolicyPatch::read(fields)?,
            key_alias: fields.patch("key_alias")?,
            team_id: fields.patch("team_id")?,
            user_id: fields.patch("user_id")?,
            metadata: fields.patch("metadata")?,
            guardrails: fields.patch("guardrails")?,
            blocked: fields.patch("blocked")?,
            duration: fields.span("duration")?,
        })
    }

    fn apply(self, key: &mut KeyRecord, now: i64) {
        self.policy.apply(&mut key.policy, now);
        self.key_alias.apply(&mut key.key_alias);
        self.team_id.apply(&mut key.team_id);
        self.user_id.apply(&mut key.user_id);
        self.metadata.apply_or_default(&mut key.metadata);
        self.guardrails.apply_or_default(&mut key.guardrails);
        self.blocked.apply_or_default(&mut key.blocked);
        match self.duration {
            Patch::Keep => {}
            Patch::Clear => key.expires_at = None,
            Patch::Set(span) => key.expires_at = Some(span.end_of(now)),
        }
        key.updated_at = now;
    }
}

fn key_json(g: &Governance, k: &KeyRecord) -> Value {
    let spend = g.spend_of(Kind::Key, &k.id, &k.policy, k.spend);
    with_policy(
        json!({
            "token": k.token,
            "key_name": k.key_name,
            "key_alias": k.key_alias,
            "team_id": k.team_id,
            "user_id": k.user_id,
            "expires": k.expires_at.map(period::iso),
            "metadata": k.metadata,
            "guardrails": k.guardrails,
            "blocked": k.blocked,
            "created_at": period::iso(k.created_at),
            "updated_at": period::iso(k.updated_at),
        }),
        &k.policy,
        spend,
    )
}

// ---------------------------------------------------------------------------------- teams, users

fn new_team(fields: &mut Fields) -> Result<TeamRecord, GatewayError> {
    let now = period::now_ms();
    let team_id = id_field(fields, "team_id")?;
    let mut team = TeamRecord {
        team_id,
        team_alias: None,
        policy: Policy {
            budget_anchor: now,
            ..Policy::default()
        },
        metadata: JsonObject::new(),
        blocked: false,
        spend: StoredSpend::default(),
        created_at: now,
        updated_at: now,
    };
    read_team_fields(fields, &mut team, now)?;
    fields.finish()?;
    team.spend.period_start = team.policy.period_start(now);
    Ok(team)
}

fn read_team_fields(
    fields: &mut Fields,
    team: &mut TeamRecord,
    now: i64,
) -> Result<(), GatewayError> {
    PolicyPatch::read(fields)?.apply(&mut team.policy, now);
    fields.patch("team_alias")?.apply(&mut team.team_alias);
    fields
        .patch("metadata")?
        .apply_or_default(&mut team.metadata);
    fields.patch("blocked")?.apply_or_default(&mut team.blocked);
    Ok(())
}

async fn existing_team(g: &Governance, team_id: &str) -> Result<TeamRecord, GatewayError> {
    g.store
        .team(team_id)
        .await
        .map_err(internal)?
        .ok_or_else(|| GatewayError::NotFound(format!("no team '{team_id}'")))
}

fn team_json(g: &Governance, t: &TeamRecord) -> Value {
    let spend = g.spend_of(Kind::Team, &t.team_id, &t.policy, t.spend);
    with_policy(
        json!({
            "team_id": t.team_id,
            "team_alias": t.team_alias,
            "metadata": t.metadata,
            "blocked": t.blocked,
            "created_at": period::iso(t.created_at),
            "updated_at": period::iso(t.updated_at),
        }),
        &t.policy,
        spend,
    )
}

fn new_user(fields: &mut Fields) -> Result<UserRecord, GatewayError> {
    let now = period::now_ms();
    let user_id = id_field(fields, "user_id")?;
    let mut user = UserRecord {
        user_id,
        user_alias: None,
        user_email: None,
        policy: Policy {
            budget_anchor: now,
            ..Policy::default()
        },
        metadata: JsonObject::new(),
        spend: StoredSpend::default(),
        created_at: now,
        updated_at: now,
    };
    PolicyPatch::read(fields)?.apply(&mut user.policy, now);
    fields.patch("user_alias")?.apply(&mut user.user_alias);
    fields.patch("user_email")?.apply(&mut user.user_email);
    fields
        .patch("metadata")?
        .apply_or_default(&mut user.metadata);
    fields.finish()?;
    user.spend.period_start = user.policy.period_start(now);
    Ok(user)
}

fn user_json(g: &Governance, u: &UserRecord) -> Value {
    let spend = g.spend_of(Kind::User, &u.user_id, &u.policy, u.spend);
    with_policy(
        json!({
            "user_id": u.user_id,
            "user_alias": u.user_alias,
            "user_email": u.user_email,
            "metadata": u.metadata,
            "created_at": period::iso(u.created_at),
            "updated_at": period::iso(u.updated_at),
        }),
        &u.policy,
        spend,
    )
}

/// A team's or user's id as given, or a new random one.
fn id_field(fields: &mut Fields, field: &str) -> Result<String, GatewayError> {
    match fields.patch::<String>(field)? {
        Patch::Set(id) if id.trim().is_empty() || id.len() > 256 => Err(GatewayError::invalid(
            format!("{field}: must be 1 to 256 characters"),
            Some(field.into()),
        )),
        Patch::Set(id) => Ok(id),
        Patch::Keep | Patch::Clear => new_id(),
    }
}

// ---------------------------------------------------------------------------------- policies

/// The budget and limit fields that keys, teams and users share.
struct PolicyPatch {
    models: Patch<Vec<String>>,
    max_budget: Patch<f64>,
    budget_duration: Patch<String>,
    rpm_limit: Patch<u64>,
    tpm_limit: Patch<u64>,
    max_parallel_requests: Patch<u64>,
}

impl PolicyPatch {
    fn read(fields: &mut Fields) -> Result<PolicyPatch, GatewayError> {
        let max_budget = fields.patch::<f64>("max_budget")?;
        if let Patch::Set(budget) = max_budget {
            if budget < 0.0 {
                return Err(GatewayError::invalid(
                    format!("max_budget: must be zero or more, got {budget}"),
                    Some("max_budget".into()),
                ));
            }
        }
        let budget_duration = fields.patch::<String>("budget_duration")?;
        if let Patch::Set(text) = &budget_duration {
            parse_span("budget_duration", text)?;
        }
        Ok(PolicyPatch {
            models: fields.patch("models")?,
            max_budget,
            budget_duration,
            rpm_limit: fields.patch("rpm_limit")?,
            tpm_limit: fields.patch("tpm_limit")?,
            max_parallel_requests: fields.patch("max_parallel_requests")?,
        })
    }

    fn apply(self, policy: &mut Policy, now: i64) {
        self.models.apply(&mut policy.models);
        self.max_budget.apply(&mut policy.max_budget);
        if !matches!(self.budget_duration, Patch::Keep) {
            // A new period length starts its first period now.
            policy.budget_anchor = now;
        }
        self.budget_duration.apply(&mut policy.budget_duration);
        self.rpm_limit.apply(&mut policy.rpm_limit);
        self.tpm_limit.apply(&mut policy.tpm_limit);
        self.max_parallel_requests
            .apply(&mut policy.max_parallel_requests);
    }
}

/// Adds a policy's fields and the current spend to an entity's JSON object.
fn with_policy(mut body: Value, policy: &Policy, spend: f64) -> Value {
    if let Value::Object(map) = &mut body {
        let now = period::now_ms();
        let fields = [
            ("models", json!(policy.models.clone().unwrap_or_default())),
            ("max_budget", json!(policy.max_budget)),
            ("budget_duration", json!(policy.budget_duration)),
            (
                "budget_reset_at",
                json!(policy.reset_at(now).map(period::iso)),
            ),
            ("rpm_limit", json!(policy.rpm_limit)),
            ("tpm_limit", json!(policy.tpm_limit)),
            ("max_parallel_requests", json!(policy.max_parallel_requests)),
            ("spend", json!(spend)),
        ];
        for (name, value) in fields {
            map.insert(name.into(), value);
        }
    }
    body
}

fn parse_span(field: &str, text: &str) -> Result<Span, GatewayError> {
    Span::parse(text).ok_or_else(|| {
        GatewayError::invalid(
            format!("{field}: '{text}' is not a duration; use e.g. 30s, 30m, 24h, 7d, 1w or 1mo"),
            Some(field.into()),
        )
    })
}

// ---------------------------------------------------------------------------------- input

/// A field of a merge patch: absent, `null`, or a value.
enum Patch<T> {
    Keep,
    Clear,
    Set(T),
}

impl<T> Patch<T> {
    fn apply(self, slot: &mut Option<T>) {
        match self {
            Patch::Keep => {}
            Patch::Clear => *slot = None,
            Patch::Set(value) => *slot = Some(value),
        }
    }

    /// For fields that cannot be absent: `null` restores the default.
    fn apply_or_default(self, slot: &mut T)
    where
        T: Default,
    {
        match self {
            Patch::Keep => {}
            Patch::Clear => *slot = T::default(),
            Patch::Set(value) => *slot = value,
        }
    }
}

/// A request body's fields, taken one by one; what is left at the end is unknown.
#[derive(Default)]
struct Fields(JsonObject);

impl Fields {
    fn parse(bytes: &[u8]) -> Result<Fields, GatewayError> {
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(Fields::default());
        }
        match serde_json::from_slice::<Value>(bytes) {
            Ok(Value::Object(map)) => Ok(Fields(map)),
            Ok(_) => Err(GatewayError::invalid(
                "the body must be a JSON object",
                None,
            )),
            Err(e) => Err(GatewayError::invalid(
                format!("the body is not valid JSON: {e}"),
                None,
            )),
        }
    }

    fn patch<T: DeserializeOwned>(&mut self, name: &str) -> Result<Patch<T>, GatewayError> {
        match self.0.remove(name) {
            None => Ok(Patch::Keep),
            Some(Value::Null) => Ok(Patch::Clear),
            Some(value) => serde_json::from_value(value)
                .map(Patch::Set)
                .map_err(|e| GatewayError::invalid(format!("{name}: {e}"), Some(name.to_owned()))),
        }
    }

    fn span(&mut self, name: &str) -> Result<Patch<Span>, GatewayError> {
        Ok(match self.patch::<String>(name)? {
            Patch::Keep => Patch::Keep,
            Patch::Clear => Patch::Clear,
            Patch::Set(text) => Patch::Set(parse_span(name, &text)?),
        })
    }

    fn required<T: DeserializeOwned>(&mut self, name: &str) -> Result<T, GatewayError> {
        match self.patch(name)? {
            Patch::Set(value) => Ok(value),
            Patch::Keep | Patch::Clear => Err(GatewayError::invalid(
                format!("{name}: required"),
                Some(name.to_owned()),
            )),
        }
    }

    fn finish(&self) -> Result<(), GatewayError> {
        match self.0.keys().next() {
            None => Ok(()),
            Some(name) => Err(GatewayError::invalid(
                format!("{name}: unknown field"),
                Some(name.clone()),
            )),
        }
    }
}

/// A query string's parameters, percent-decoded.
struct Params(Vec<(String, String)>);

impl Params {
    fn parse(query: &str) -> Params {
        Params(
            query
                .split('&')
                .filter(|pair| !pair.is_empty())
                .map(|pair| {
                    let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
                    (percent_decode(name), percent_decode(value))
                })
                .collect(),
        )
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn required(&self, name: &str) -> Result<&str, GatewayError> {
        self.get(name).filter(|v| !v.is_empty()).ok_or_else(|| {
            GatewayError::invalid(
                format!("{name}: required query parameter"),
                Some(name.into()),
            )
        })
    }

    fn number(&self, name: &str) -> Result<Option<i64>, GatewayError> {
        self.get(name)
            .map(|text| {
                text.parse::<i64>().map_err(|_| {
                    GatewayError::invalid(
                        format!("{name}: expected an integer, got '{text}'"),
                        Some(name.into()),
                    )
                })
            })
            .transpose()
    }
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                match (
                    bytes.get(i + 1).copied().and_then(hex),
                    bytes.get(i + 2).copied().and_then(hex),
                ) {
                    (Some(high), Some(low)) => {
                        out.push((high * 16 + low) as u8);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn internal(e: StoreError) -> GatewayError {
    GatewayError::Unavailable(format!("the store failed: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_strings_decode() {
        let p = Params::parse("key=sk-a%2Bb&team_id=t+1&empty=&flag");
        assert_eq!(p.get("key"), Some("sk-a+b"));
        assert_eq!(p.get("team_id"), Some("t 1"));
        assert_eq!(p.get("empty"), Some(""));
        assert_eq!(p.get("flag"), Some(""));
        assert!(p.required("empty").is_err());
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
    }

    #[test]
    fn bad_fields_are_named() {
        let mut f = Fields::parse(br#"{"max_budget": -1}"#).expect("json");
        let err = PolicyPatch::read(&mut f).err().expect("negative");
        assert_eq!(err.to_json()["error"]["param"], "max_budget");
        let mut f = Fields::parse(br#"{"budget_duration": "banana"}"#).expect("json");
        let err = PolicyPatch::read(&mut f).err().expect("banana");
        assert_eq!(err.to_json()["error"]["param"], "budget_duration");
        let mut f = Fields::parse(br#"{"rpm_limit": "ten"}"#).expect("json");
        assert!(PolicyPatch::read(&mut f).is_err());
        let f = Fields::parse(br#"{"colour": 1}"#).expect("json");
        let err = f.finish().expect_err("unknown");
        assert_eq!(err.to_json()["error"]["param"], "colour");
        assert!(Fields::parse(b"[1]").is_err());
        assert!(Fields::parse(b"{").is_err());
    }
}
