//! The database: keys, teams, users and spend logs, in SQLite or Postgres through one query layer
//! (sqlx's `Any` driver). **Every query is written once, in SQL both engines accept**; the schema
//! is versioned migrations compiled into the binary.
//!
//! One exception to sqlx: on a SQLite file, spend rows (one per call) and the totals they add to
//! are written by [`sqlite_spend`], a connection of their own with its inserts kept prepared,
//! since sqlx's handling of each value cost over half as much as SQLite's own insert of the row.
//! The SQL is still the text Postgres runs.

mod sqlite_spend;

use std::borrow::Cow;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use serde_json::Value;
use sqlx::any::{AnyArguments, AnyPoolOptions, AnyRow};
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::query::Query;
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{Any, AnyPool, AssertSqlSafe, Row, SqlSafeStr};

use super::limits::{EntityId, Kind};
use super::period::Span;
use crate::call;
use crate::providers::JsonObject;

/// What the store could not do.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the database {url}: {error}")]
    Open { url: String, error: sqlx::Error },
    #[error("cannot migrate the database: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database error: {0}")]
    Query(#[from] sqlx::Error),
    #[error("database error writing spend: {0}")]
    SpendWrite(#[from] rusqlite::Error),
    #[error("cannot start the spend writer: {0}")]
    SpendThread(std::io::Error),
    #[error("the spend writer has stopped")]
    SpendWriterGone,
    #[error("the database holds a bad value in {column}: {error}")]
    Corrupt {
        column: &'static str,
        error: serde_json::Error,
    },
}

const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "keys, teams, users and spend logs",
        include_str!("../../migrations/0001_governance.sql"),
    ),
    (
        2,
        "spend-log indexes on team and user skip rows without one",
        include_str!("../../migrations/0002_partial_spend_indexes.sql"),
    ),
    (
        3,
        "spend logs keep no index on request ids",
        include_str!("../../migrations/0003_spend_logs_without_request_index.sql"),
    ),
];

/// The budget and limits a key, team and user each may have.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Policy {
    /// Model groups allowed; `None` means all.
    pub models: Option<Vec<String>>,
    pub max_budget: Option<f64>,
    /// As written (`30d`); checked when set.
    pub budget_duration: Option<String>,
    /// Budget periods run back to back from here (creation, or when the duration last changed).
    pub budget_anchor: i64,
    pub rpm_limit: Option<u64>,
    pub tpm_limit: Option<u64>,
    pub max_parallel_requests: Option<u64>,
}

impl Policy {
    fn span(&self) -> Option<Span> {
        self.budget_duration.as_deref().and_then(Span::parse)
    }

    /// The start of the budget period holding `now_ms`; 0 without a `budget_duration`.
    pub fn period_start(&self, now_ms: i64) -> i64 {
        self.span()
            .map_or(0, |span| span.period_start(self.budget_anchor, now_ms))
    }

    /// When the budget period holding `now_ms` ends.
    pub fn reset_at(&self, now_ms: i64) -> Option<i64> {
        self.span()
            .map(|span| span.end_of(span.period_start(self.budget_anchor, now_ms)))
    }

    pub fn has_rate_limits(&self) -> bool {
        self.rpm_limit.is_some() || self.tpm_limit.is_some() || self.max_parallel_requests.is_some()
    }

    /// Whether calls count against anything: a budget or a rate limit.
    pub fn is_limited(&self) -> bool {
        self.max_budget.is_some() || self.has_rate_limits()
    }
}

/// Spend as last written: the total of the period that started at `period_start`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StoredSpend {
    pub spend: f64,
    pub period_start: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct KeyRecord {
    pub id: String,
    /// SHA-256 of the key.
    pub token: String,
    pub key_name: String,
    pub key_alias: Option<String>,
    pub team_id: Option<String>,
    pub user_id: Option<String>,
    pub policy: Policy,
    pub expires_at: Option<i64>,
    pub metadata: JsonObject,
    pub guardrails: Vec<String>,
    pub blocked: bool,
    pub spend: StoredSpend,
    pub created_at: i64,
    pub updated_at: i64,
    pub deleted_at: Option<i64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TeamRecord {
    pub team_id: String,
    pub team_alias: Option<String>,
    pub policy: Policy,
    pub metadata: JsonObject,
    pub blocked: bool,
    pub spend: StoredSpend,
    pub created_at: i64,
    pub updated_at: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct UserRecord {
    pub user_id: String,
    pub user_alias: Option<String>,
    pub user_email: Option<String>,
    pub policy: Policy,
    pub metadata: JsonObject,
    pub spend: StoredSpend,
    pub created_at: i64,
    pub updated_at: i64,
}

/// One call, as `/spend/logs` lists it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SpendRow {
    pub request_id: String,
    pub api_key: String,
    pub key_alias: Option<String>,
    pub spend: f64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub total_tokens: i64,
    pub model: String,
    pub model_group: String,
    pub model_id: String,
    pub user_id: Option<String>,
    pub team_id: Option<String>,
    pub end_user: Option<String>,
    pub start_time: i64,
    pub end_time: i64,
    pub status: &'static str,
}

/// Spend rows and the totals they add to, written together or not at all.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SpendBatch {
    pub rows: Vec<SpendRow>,
    pub deltas: Vec<SpendDelta>,
}

/// Spend to add to an entity's stored total for one budget period.
#[derive(Debug, Clone, PartialEq)]
pub struct SpendDelta {
    pub entity: EntityId,
    pub period_start: i64,
    pub amount: f64,
}

/// Which keys `/key/list` wants.
#[derive(Debug, Clone, Default)]
pub struct KeyFilter {
    pub team_id: Option<String>,
    pub user_id: Option<String>,
    pub key_alias: Option<String>,
}

/// Which rows `/spend/logs` wants.
#[derive(Debug, Clone, Default)]
pub struct SpendFilter {
    pub api_key: Option<String>,
    pub user_id: Option<String>,
    pub team_id: Option<String>,
    pub request_id: Option<String>,
    pub start: Option<i64>,
    pub end: Option<i64>,
    pub limit: i64,
}

const POLICY_COLUMNS: &[&str] = &[
    "models",
    "max_budget",
    "budget_duration",
    "budget_anchor",
    "rpm_limit",
    "tpm_limit",
    "max_parallel_requests",
];
const KEY_COLUMNS: &[&str] = &[
    "id",
    "token",
    "key_name",
    "key_alias",
    "team_id",
    "user_id",
    "expires_at",
    "metadata",
    "guardrails",
    "blocked",
    "created_at",
    "updated_at",
    "deleted_at",
];
const TEAM_COLUMNS: &[&str] = &[
    "team_id",
    "team_alias",
    "metadata",
    "blocked",
    "created_at",
    "updated_at",
];
const USER_COLUMNS: &[&str] = &[
    "user_id",
    "user_alias",
    "user_email",
    "metadata",
    "created_at",
    "updated_at",
];
const SPEND_COLUMNS: &[&str] = &["spend", "budget_period_start"];
const SPEND_LOG_COLUMNS: &[&str] = &[
    "request_id",
    "api_key",
    "key_alias",
    "spend",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "model",
    "model_group",
    "model_id",
    "user_id",
    "team_id",
    "end_user",
    "start_time",
    "end_time",
    "status",
];

/// Rows per `INSERT` of spend logs through the pool (Postgres, or SQLite in memory): one round
/// trip for many, well under Postgres's limit on parameters.
const SPEND_ROWS_PER_INSERT: usize = 50;

/// The row counts SQLite spend inserts are prepared for, largest first; any count of rows is
/// written as a few of them, each statement parsed once per connection.
const SQLITE_INSERT_ROWS: [usize; 4] = [50, 16, 4, 1];

pub type AnyQuery<'q> = Query<'q, Any, AnyArguments>;

/// A table of entities that have a policy and spend.
#[derive(Debug)]
pub struct Table {
    name: &'static str,
    id: &'static str,
    own: &'static [&'static str],
}

const KEYS: Table = Table {
    name: "portcullis_keys",
    id: "id",
    own: KEY_COLUMNS,
};
const TEAMS: Table = Table {
    name: "portcullis_teams",
    id: "team_id",
    own: TEAM_COLUMNS,
};
const USERS: Table = Table {
    name: "portcullis_users",
    id: "user_id",
    own: USER_COLUMNS,
};

impl Table {
    fn of(kind: Kind) -> &'static Table {
        match kind {
            Kind::Key => &KEYS,
            Kind::Team => &TEAMS,
            Kind::User => &USERS,
        }
    }

    /// The columns a record writes: its own, then the policy's.
    fn written(&self) -> impl Iterator<Item = &'static str> {
        self.own.iter().chain(POLICY_COLUMNS).copied()
    }

    fn select(&self, condition: &str) -> String {
        let columns: Vec<_> = self
            .written()
            .chain(SPEND_COLUMNS.iter().copied())
            .collect();
        format!(
            "SELECT {} FROM {} WHERE {condition}",
            columns.join(", "),
            self.name
        )
    }

    fn insert(&self) -> String {
        let columns: Vec<_> = self
            .written()
            .chain(SPEND_COLUMNS.iter().copied())
            .collect();
        format!(
            "INSERT INTO {} ({}) VALUES ({})",
            self.name,
            columns.join(", "),
            placeholders(1, columns.len())
        )
    }

    /// Updates everything but spend, which only [`Store::write_spend`] changes.
    fn update(&self) -> String {
        let sets: Vec<_> = self
            .written()
            .enumerate()
            .skip(1)
            .map(|(i, c)| format!("{c} = ${}", i + 1))
            .collect();
        format!(
            "UPDATE {} SET {} WHERE {} = $1",
            self.name,
            sets.join(", "),
            self.id
        )
    }
}

/// A key, team or user: a row of its table.
pub trait Record {
    #[doc(hidden)]
    const TABLE: &'static Table;
    /// Binds the columns [`Table::written`] names, in order.
    #[doc(hidden)]
    fn bind<'q>(&self, q: AnyQuery<'q>) -> AnyQuery<'q>;
    fn spend(&self) -> StoredSpend;
}

impl Record for KeyRecord {
    const TABLE: &'static Table = &KEYS;
    fn bind<'q>(&self, q: AnyQuery<'q>) -> AnyQuery<'q> {
        bind_key(q, self)
    }
    fn spend(&self) -> StoredSpend {
        self.spend
    }
}

impl Record for TeamRecord {
    const TABLE: &'static Table = &TEAMS;
    fn bind<'q>(&self, q: AnyQuery<'q>) -> AnyQuery<'q> {
        bind_team(q, self)
    }
    fn spend(&self) -> StoredSpend {
        self.spend
    }
}

impl Record for UserRecord {
    const TABLE: &'static Table = &USERS;
    fn bind<'q>(&self, q: AnyQuery<'q>) -> AnyQuery<'q> {
        bind_user(q, self)
    }
    fn spend(&self) -> StoredSpend {
        self.spend
    }
}

/// How a statement's parameters are written.
#[derive(Debug, Clone, Copy)]
enum Placeholders {
    /// `$1, $2, ...`, which both engines read.
    Numbered,
    /// `?, ?, ...`: SQLite looks each `$N` up by name in a list, so a statement with many of them
    /// parses and binds in time that grows with their square (about 250,000 instructions a row
    /// at 50 rows); anonymous ones cost the same at any count.
    Anonymous,
}

/// An `INSERT` of `rows` spend-log rows.
fn insert_spend_sql(rows: usize, style: Placeholders) -> String {
    let width = SPEND_LOG_COLUMNS.len();
    let values: Vec<_> = (0..rows)
        .map(|i| match style {
            Placeholders::Numbered => format!("({})", placeholders(i * width + 1, width)),
            Placeholders::Anonymous => format!("({})", vec!["?"; width].join(", ")),
        })
        .collect();
    format!(
        "INSERT INTO portcullis_spend_logs ({}) VALUES {}",
        SPEND_LOG_COLUMNS.join(", "),
        values.join(", ")
    )
}

fn placeholders(first: usize, count: usize) -> String {
    (first..first + count)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Statements are not kept prepared: Postgres would fix a parameter's type from the first call's
/// values, and a `NULL` there makes a later number fail to bind.
fn query(sql: impl Into<String>) -> AnyQuery<'static> {
    sqlx::query(AssertSqlSafe(sql.into())).persistent(false)
}

/// The database handle; cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
    engine: &'static str,
    /// SQLite's spend writer (see the module's comment); `None` on Postgres and in memory.
    sqlite_spend: Option<sqlite_spend::SqliteSpendWriter>,
}

impl Store {
    /// Opens (creating it if need be) and migrates the database at `url`.
    pub async fn open(url: &str) -> Result<Store, StoreError> {
        sqlx::any::install_default_drivers();
        let sqlite = url.starts_with("sqlite:");
        let file = sqlite_file(url);
        let options = if sqlite && file.is_none() {
            // Each connection to `:memory:` is a database of its own: this one must hold the
            // store for the gateway's life.
            AnyPoolOptions::new()
                .max_connections(1)
                .min_connections(1)
                .idle_timeout(None)
                .max_lifetime(None)
        } else {
            // SQLite takes one writer at a time anyway; a few readers keep the API responsive.
            AnyPoolOptions::new().max_connections(if sqlite { 4 } else { 10 })
        };
        let pool = options
            .connect(url)
            .await
            .map_err(|error| cannot_open(url, error))?;
        if sqlite {
            // Readers do not wait for the spend writer, and a write is one append. A new file's
            // pages are 16 KiB (set before anything is written; an older file keeps its size):
            // appending a spend row splits an index page a quarter as often, 7% of its cost.
            sqlx::query("PRAGMA page_size = 16384; PRAGMA journal_mode = WAL")
                .execute(&pool)
                .await?;
        }
        migrator(MIGRATIONS).run(&pool).await?;
        let engine = if sqlite { "sqlite" } else { "postgres" };
        let sqlite_spend = match file {
            Some(file) => Some(sqlite_spend::SqliteSpendWriter::open(file).await?),
            None => None,
        };
        Ok(Store {
            pool,
            engine,
            sqlite_spend,
        })
    }

    /// Adds a key, team or user.
    pub async fn insert<R: Record>(&self, record: &R) -> Result<(), StoreError> {
        let spend = record.spend();
        record
            .bind(query(R::TABLE.insert()))
            .bind(spend.spend)
            .bind(spend.period_start)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Rewrites a key, team or user, all but its spend.
    pub async fn update<R: Record>(&self, record: &R) -> Result<(), StoreError> {
        record
            .bind(query(R::TABLE.update()))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The key with this token, deleted or not.
    pub async fn key_by_token(&self, token: &str) -> Result<Option<KeyRecord>, StoreError> {
        let row = query(KEYS.select("token = $1"))
            .bind(token.to_owned())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(key_from_row).transpose()
    }

    /// Keys not deleted, in creation order, and how many match in all.
    pub async fn list_keys(
        &self,
        filter: &KeyFilter,
        offset: i64,
        limit: i64,
    ) -> Result<(Vec<KeyRecord>, i64), StoreError> {
        let mut filters = Filters::new("deleted_at IS NULL");
        filters.text("team_id =", &filter.team_id);
        filters.text("user_id =", &filter.user_id);
        filters.text("key_alias =", &filter.key_alias);
        let count = query(format!(
            "SELECT COUNT(*) AS n FROM portcullis_keys WHERE {}",
            filters.sql()
        ));
        let total: i64 = filters
            .bind(count)
            .fetch_one(&self.pool)
            .await?
            .try_get("n")?;
        let n = filters.next_placeholder();
        let select = query(KEYS.select(&format!(
            "{} ORDER BY created_at, id LIMIT ${n} OFFSET ${}",
            filters.sql(),
            n + 1
        )));
        let rows = filters
            .bind(select)
            .bind(limit)
            .bind(offset)
            .fetch_all(&self.pool)
            .await?;
        let keys = rows.iter().map(key_from_row).collect::<Result<_, _>>()?;
        Ok((keys, total))
    }

    /// Marks keys deleted (those deleted already keep their first deletion time).
    pub async fn delete_keys(&self, ids: &[String], now: i64) -> Result<(), StoreError> {
        for id in ids {
            query(
                "UPDATE portcullis_keys SET deleted_at = $1, updated_at = $1 \
                 WHERE id = $2 AND deleted_at IS NULL",
            )
            .bind(now)
            .bind(id.clone())
            .execute(&self.pool)
            .await?;
        }
        Ok(())
    }

    pub async fn team(&self, team_id: &str) -> Result<Option<TeamRecord>, StoreError> {
        let row = query(TEAMS.select("team_id = $1"))
            .bind(team_id.to_owned())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(team_from_row).transpose()
    }

    pub async fn list_teams(&self) -> Result<Vec<TeamRecord>, StoreError> {
        let rows = query(TEAMS.select("1 = 1 ORDER BY created_at, team_id"))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(team_from_row).collect()
    }

    /// Deletes a team and marks its keys deleted.
    pub async fn delete_team(&self, team_id: &str, now: i64) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        query(
            "UPDATE portcullis_keys SET deleted_at = $1, updated_at = $1 \
             WHERE team_id = $2 AND deleted_at IS NULL",
        )
        .bind(now)
        .bind(team_id.to_owned())
        .execute(&mut *tx)
        .await?;
        query("DELETE FROM portcullis_teams WHERE team_id = $1")
            .bind(team_id.to_owned())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn user(&self, user_id: &str) -> Result<Option<UserRecord>, StoreError> {
        let row = query(USERS.select("user_id = $1"))
            .bind(user_id.to_owned())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(user_from_row).transpose()
    }

    /// Appends spend rows and adds their spend to the totals, all or nothing. The batch is shared
    /// with SQLite's writer thread; once this returns, the caller holds it alone again.
    pub async fn write_spend(&self, batch: Arc<SpendBatch>) -> Result<(), StoreError> {
        if let Some(writer) = &self.sqlite_spend {
            return writer.write(batch).await;
        }
        let mut tx = self.pool.begin().await?;
        for chunk in batch.rows.chunks(SPEND_ROWS_PER_INSERT) {
            let mut insert = query(insert_spend_sql(chunk.len(), Placeholders::Numbered));
            for row in chunk {
                insert = bind_spend_row(insert, row);
            }
            insert.execute(&mut *tx).await?;
        }
        for delta in &batch.deltas {
            let (period_start, amount, id) = delta_values(delta);
            query(delta_sql(delta))
                .bind(period_start)
                .bind(amount)
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Spend rows matching `filter`, oldest first.
    pub async fn spend_logs(&self, filter: &SpendFilter) -> Result<Vec<SpendRow>, StoreError> {
        let mut filters = Filters::new("1 = 1");
        filters.text("api_key =", &filter.api_key);
        filters.text("user_id =", &filter.user_id);
        filters.text("team_id =", &filter.team_id);
        filters.text("request_id =", &filter.request_id);
        // No index holds request ids; the time a call's id begins with finds its row by the
        // time index instead. Another id matches no row the gateway wrote, by a scan.
        let id_time = filter.request_id.as_deref().and_then(call::id_millis);
        filters.number("start_time =", id_time);
        filters.number("start_time >=", filter.start);
        filters.number("start_time <", filter.end);
        let select = filters.bind(query(format!(
            "SELECT {} FROM portcullis_spend_logs WHERE {} ORDER BY start_time, request_id LIMIT ${}",
            SPEND_LOG_COLUMNS.join(", "),
            filters.sql(),
            filters.next_placeholder()
        )));
        let rows = select.bind(filter.limit).fetch_all(&self.pool).await?;
        rows.iter().map(spend_row_from_row).collect()
    }

    /// `sqlite` or `postgres`.
    pub fn engine(&self) -> &'static str {
        self.engine
    }

    /// Tells the other replicas on this database of a change (Postgres only: replicas do not share
    /// an embedded SQLite file).
    pub async fn notify(&self, channel: &str, message: &str) -> Result<(), StoreError> {
        if self.engine == "postgres" {
            query("SELECT pg_notify($1, $2)")
                .bind(channel.to_owned())
                .bind(message.to_owned())
                .execute(&self.pool)
                .await?;
        }
        Ok(())
    }

    /// Closes the pools, waiting for connections in use.
    pub async fn close(&self) {
        if let Some(writer) = &self.sqlite_spend {
            writer.close().await;
        }
        self.pool.close().await;
    }
}

/// A `WHERE` clause built from optional filters, with their values in placeholder order.
struct Filters {
    conditions: Vec<String>,
    values: Vec<FilterValue>,
}

enum FilterValue {
    Text(String),
    Number(i64),
}

impl Filters {
    fn new(always: &str) -> Filters {
        Filters {
            conditions: vec![always.to_owned()],
            values: Vec::new(),
        }
    }

    /// `condition` (`team_id =`) and a placeholder, if there is a value.
    fn text(&mut self, condition: &str, value: &Option<String>) {
        if let Some(value) = value {
            self.push(condition, FilterValue::Text(value.clone()));
        }
    }

    fn number(&mut self, condition: &str, value: Option<i64>) {
        if let Some(value) = value {
            self.push(condition, FilterValue::Number(value));
        }
    }

    fn push(&mut self, condition: &str, value: FilterValue) {
        self.values.push(value);
        self.conditions
            .push(format!("{condition} ${}", self.values.len()));
    }

    fn sql(&self) -> String {
        self.conditions.join(" AND ")
    }

    /// The number of the first placeholder after the filters' own.
    fn next_placeholder(&self) -> usize {
        self.values.len() + 1
    }

    fn bind<'q>(&self, mut q: AnyQuery<'q>) -> AnyQuery<'q> {
        for value in &self.values {
            q = match value {
                FilterValue::Text(text) => q.bind(text.clone()),
                FilterValue::Number(number) => q.bind(*number),
            };
        }
        q
    }
}

fn migrator(migrations: &[(i64, &'static str, &'static str)]) -> Migrator {
    let migrations = migrations
        .iter()
        .map(|(version, description, sql)| {
            Migration::new(
                *version,
                Cow::Borrowed(*description),
                MigrationType::Simple,
                AssertSqlSafe(*sql).into_sql_str(),
                false,
            )
        })
        .collect();
    let mut migrator = Migrator::with_migrations(migrations);
    migrator.dangerous_set_table_name("portcullis_migrations");
    migrator
}

fn cannot_open(url: &str, error: sqlx::Error) -> StoreError {
    StoreError::Open {
        url: redact(url),
        error,
    }
}

fn redact(url: &str) -> String {
    // postgres://user:password@host/db: the password stays out of logs and errors.
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let credentials = &url[scheme + 3..at];
            match credentials.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme + 3],
                    &credentials[..colon],
                    &url[at..]
                ),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

fn to_i64(value: Option<u64>) -> Option<i64> {
    value.map(|v| i64::try_from(v).unwrap_or(i64::MAX))
}

fn json_text<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| "null".to_owned())
}

fn bind_policy<'q>(q: AnyQuery<'q>, policy: &Policy) -> AnyQuery<'q> {
    q.bind(policy.models.as_ref().map(json_text))
        .bind(policy.max_budget)
        .bind(policy.budget_duration.clone())
        .bind(policy.budget_anchor)
        .bind(to_i64(policy.rpm_limit))
        .bind(to_i64(policy.tpm_limit))
        .bind(to_i64(policy.max_parallel_requests))
}

fn bind_key<'q>(q: AnyQuery<'q>, key: &KeyRecord) -> AnyQuery<'q> {
    let q = q
        .bind(key.id.clone())
        .bind(key.token.clone())
        .bind(key.key_name.clone())
        .bind(key.key_alias.clone())
        .bind(key.team_id.clone())
        .bind(key.user_id.clone())
        .bind(key.expires_at)
        .bind(json_text(&key.metadata))
        .bind(json_text(&key.guardrails))
        .bind(i64::from(key.blocked))
        .bind(key.created_at)
        .bind(key.updated_at)
        .bind(key.deleted_at);
    bind_policy(q, &key.policy)
}

fn bind_team<'q>(q: AnyQuery<'q>, team: &TeamRecord) -> AnyQuery<'q> {
    let q = q
        .bind(team.team_id.clone())
        .bind(team.team_alias.clone())
        .bind(json_text(&team.metadata))
        .bind(i64::from(team.blocked))
        .bind(team.created_at)
        .bind(team.updated_at);
    bind_policy(q, &team.policy)
}

fn bind_user<'q>(q: AnyQuery<'q>, user: &UserRecord) -> AnyQuery<'q> {
    let q = q
        .bind(user.user_id.clone())
        .bind(user.user_alias.clone())
        .bind(user.user_email.clone())
        .bind(json_text(&user.metadata))
        .bind(user.created_at)
        .bind(user.updated_at);
    bind_policy(q, &user.policy)
}

/// The SQL of adding `delta` to its entity's spend.
fn delta_sql(delta: &SpendDelta) -> String {
    let table = Table::of(delta.entity.kind);
    // A delta for a period that has since ended elsewhere is history: it is in the logs, not in
    // the current period's total.
    format!(
        "UPDATE {} SET spend = CASE WHEN budget_period_start = $1 THEN spend + $2 \
         ELSE $2 END, budget_period_start = $1 WHERE {} = $3 AND budget_period_start <= $1",
        table.name, table.id
    )
}

/// `delta`'s values for [`delta_sql`]'s `$1`, `$2` and `$3`.
fn delta_values(delta: &SpendDelta) -> (i64, f64, &str) {
    (delta.period_start, delta.amount, delta.entity.id.as_str())
}

/// A spend-log value, as either driver binds it.
#[derive(Debug, Clone, Copy)]
enum SpendValue<'a> {
    Text(Option<&'a str>),
    Real(f64),
    Integer(i64),
}

/// `row`'s values in [`SPEND_LOG_COLUMNS`]'s order.
fn spend_row_values(row: &SpendRow) -> [SpendValue<'_>; SPEND_LOG_COLUMNS.len()] {
    use SpendValue::{Integer, Real, Text};
    [
        Text(Some(&row.request_id)),
        Text(Some(&row.api_key)),
        Text(row.key_alias.as_deref()),
        Real(row.spend),
        Integer(row.prompt_tokens),
        Integer(row.completion_tokens),
        Integer(row.total_tokens),
        Text(Some(&row.model)),
        Text(Some(&row.model_group)),
        Text(Some(&row.model_id)),
        Text(row.user_id.as_deref()),
        Text(row.team_id.as_deref()),
        Text(row.end_user.as_deref()),
        Integer(row.start_time),
        Integer(row.end_time),
        Text(Some(row.status)),
    ]
}

/// Binds `row`'s values after those `q` has.
fn bind_spend_row<'q>(mut q: AnyQuery<'q>, row: &SpendRow) -> AnyQuery<'q> {
    for value in spend_row_values(row) {
        q = match value {
            SpendValue::Text(text) => q.bind(text),
            SpendValue::Real(real) => q.bind(real),
            SpendValue::Integer(integer) => q.bind(integer),
        };
    }
    q
}

/// The file a `sqlite:` URL opens; `None` for any other URL and for an in-memory database, which
/// only the pool's own connections share (its spend goes through the pool).
fn sqlite_file(url: &str) -> Option<PathBuf> {
    let rest = url.strip_prefix("sqlite:")?;
    let (path, parameters) = rest.split_once('?').unwrap_or((rest, ""));
    let in_memory = path.trim_start_matches('/') == ":memory:"
        || parameters.split('&').any(|pair| pair == "mode=memory");
    if in_memory {
        return None;
    }
    let options = SqliteConnectOptions::from_str(url).ok()?;
    Some(options.get_filename().to_owned())
}

fn parsed<T: serde::de::DeserializeOwned>(
    row: &AnyRow,
    column: &'static str,
) -> Result<T, StoreError> {
    let text: String = row.try_get(column)?;
    serde_json::from_str(&text).map_err(|error| StoreError::Corrupt { column, error })
}

fn unsigned(row: &AnyRow, column: &str) -> Result<Option<u64>, StoreError> {
    let value: Option<i64> = row.try_get(column)?;
    Ok(value.map(|v| u64::try_from(v).unwrap_or(0)))
}

fn policy_from_row(row: &AnyRow) -> Result<Policy, StoreError> {
    let models: Option<String> = row.try_get("models")?;
    let models = models
        .map(|text| serde_json::from_str(&text))
        .transpose()
        .map_err(|error| StoreError::Corrupt {
            column: "models",
            error,
        })?;
    Ok(Policy {
        models,
        max_budget: row.try_get("max_budget")?,
        budget_duration: row.try_get("budget_duration")?,
        budget_anchor: row.try_get("budget_anchor")?,
        rpm_limit: unsigned(row, "rpm_limit")?,
        tpm_limit: unsigned(row, "tpm_limit")?,
        max_parallel_requests: unsigned(row, "max_parallel_requests")?,
    })
}

fn spend_from_row(row: &AnyRow) -> Result<StoredSpend, StoreError> {
    Ok(StoredSpend {
        spend: row.try_get("spend")?,
        period_start: row.try_get("budget_period_start")?,
    })
}

fn object(row: &AnyRow, column: &'static str) -> Result<JsonObject, StoreError> {
    Ok(match parsed::<Value>(row, column)? {
        Value::Object(map) => map,
        _ => JsonObject::new(),
    })
}

fn flag(row: &AnyRow, column: &str) -> Result<bool, StoreError> {
    Ok(row.try_get::<i64, _>(column)? != 0)
}

fn key_from_row(row: &AnyRow) -> Result<KeyRecord, StoreError> {
    Ok(KeyRecord {
        id: row.try_get("id")?,
        token: row.try_get("token")?,
        key_name: row.try_get("key_name")?,
        key_alias: row.try_get("key_alias")?,
        team_id: row.try_get("team_id")?,
        user_id: row.try_get("user_id")?,
        policy: policy_from_row(row)?,
        expires_at: row.try_get("expires_at")?,
        metadata: object(row, "metadata")?,
        guardrails: parsed(row, "guardrails")?,
        blocked: flag(row, "blocked")?,
        spend: spend_from_row(row)?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        deleted_at: row.try_get("deleted_at")?,
    })
}

fn team_from_row(row: &AnyRow) -> Result<TeamRecord, StoreError> {
    Ok(TeamRecord {
        team_id: row.try_get("team_id")?,
        team_alias: row.try_get("team_alias")?,
        policy: policy_from_row(row)?,
        metadata: object(row, "metadata")?,
        blocked: flag(row, "blocked")?,
        spend: spend_from_row(row)?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

fn user_from_row(row: &AnyRow) -> Result<UserRecord, StoreError> {
    Ok(UserRecord {
        user_id: row.try_get("user_id")?,
        user_alias: row.try_get("user_alias")?,
        user_email: row.try_get("user_email")?,
        policy: policy_from_row(row)?,
        metadata: object(row, "metadata")?,
        spend: spend_from_row(row)?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

fn spend_row_from_row(row: &AnyRow) -> Result<SpendRow, StoreError> {
    let status: String = row.try_get("status")?;
    Ok(SpendRow {
        request_id: row.try_get("request_id")?,
        api_key: row.try_get("api_key")?,
        key_alias: row.try_get("key_alias")?,
        spend: row.try_get("spend")?,
        prompt_tokens: row.try_get("prompt_tokens")?,
        completion_tokens: row.try_get("completion_tokens")?,
        total_tokens: row.try_get("total_tokens")?,
        model: row.try_get("model")?,
        model_group: row.try_get("model_group")?,
        model_id: row.try_get("model_id")?,
        user_id: row.try_get("user_id")?,
        team_id: row.try_get("team_id")?,
        end_user: row.try_get("end_user")?,
        start_time: row.try_get("start_time")?,
        end_time: row.try_get("end_time")?,
        status: if status == "success" {
            "success"
        } else {
            "failure"
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn temporary_store() -> (Store, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!(
            "portcullis-store-{}-{:x}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let url = format!("sqlite://{}?mode=rwc", dir.join("t.db").display());
        (Store::open(&url).await.expect("opens"), dir)
    }

    #[test]
    fn spend_has_a_writer_of_its_own_only_for_a_sqlite_file() {
        assert_eq!(
            sqlite_file("sqlite:///var/lib/p.db?mode=rwc"),
            Some(PathBuf::from("/var/lib/p.db"))
        );
        assert_eq!(sqlite_file("sqlite::memory:"), None);
        assert_eq!(sqlite_file("sqlite://:memory:"), None);
        assert_eq!(sqlite_file("sqlite://p.db?mode=memory"), None);
        assert_eq!(sqlite_file("postgres://u:p@h/db"), None);
    }

    #[tokio::test]
    async fn an_in_memory_store_writes_spend_through_its_pool() {
        let store = Store::open("sqlite::memory:").await.expect("opens");
        assert_rows_read_back(&store, vec![spend_row("r1"), spend_row("r2")]).await;
    }

    /// Writes `rows` alone and reads every row back.
    async fn assert_rows_read_back(store: &Store, rows: Vec<SpendRow>) {
        store
            .write_spend(Arc::new(batch(rows.clone(), vec![])))
            .await
            .expect("write");
        let logs = store
            .spend_logs(&SpendFilter {
                limit: 100,
                ..SpendFilter::default()
            })
            .await
            .expect("logs");
        assert_eq!(logs, rows);
    }

    #[tokio::test]
    async fn a_spend_row_is_found_by_its_call_id_and_by_any_other_id() {
        let (store, dir) = temporary_store().await;
        let call = crate::call::Call::new(crate::providers::Endpoint::ChatCompletions);
        let mut by_call = spend_row(&call.id);
        by_call.start_time = super::super::period::unix_ms(call.received_at);
        let rows = vec![by_call, spend_row("not-a-call-id")];
        store
            .write_spend(Arc::new(batch(rows.clone(), vec![])))
            .await
            .expect("write");
        for row in &rows {
            let found = store
                .spend_logs(&SpendFilter {
                    request_id: Some(row.request_id.clone()),
                    limit: 10,
                    ..SpendFilter::default()
                })
                .await
                .expect("logs");
            assert_eq!(found, vec![row.clone()]);
        }
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn spend_rows_written_before_the_request_index_went_are_kept() {
        let (store, dir) = temporary_store().await;
        store.close().await;
        let url = format!("sqlite://{}?mode=rwc", dir.join("before.db").display());
        let rows = vec![spend_row("r1"), spend_row("r2")];
        {
            sqlx::any::install_default_drivers();
            let pool = AnyPool::connect(&url).await.expect("connects");
            migrator(&MIGRATIONS[..2])
                .run(&pool)
                .await
                .expect("migrates");
            let insert = query(insert_spend_sql(rows.len(), Placeholders::Numbered));
            let insert = rows.iter().fold(insert, bind_spend_row);
            insert.execute(&pool).await.expect("inserts");
            pool.close().await;
        }
        let migrated = Store::open(&url).await.expect("migrates the rest");
        let logs = migrated
            .spend_logs(&SpendFilter {
                limit: 10,
                ..SpendFilter::default()
            })
            .await
            .expect("logs");
        assert_eq!(logs, rows);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn a_new_sqlite_file_has_large_pages_and_a_write_ahead_log() {
        let (store, dir) = temporary_store().await;
        let pragma = |name: &'static str| {
            let pool = store.pool.clone();
            async move {
                let row = query(format!("PRAGMA {name}"))
                    .fetch_one(&pool)
                    .await
                    .expect("pragma");
                row.try_get::<String, _>(0)
                    .or_else(|_| row.try_get::<i64, _>(0).map(|n| n.to_string()))
                    .expect("a value")
            }
        };
        assert_eq!(pragma("page_size").await, "16384");
        assert_eq!(pragma("journal_mode").await, "wal");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn a_closed_store_refuses_spend_and_the_caller_keeps_it() {
        let (store, dir) = temporary_store().await;
        store.close().await;
        let written = Arc::new(batch(vec![spend_row("r1")], vec![]));
        let refused = store.write_spend(Arc::clone(&written)).await;
        assert!(
            matches!(refused, Err(StoreError::SpendWriterGone)),
            "{refused:?}"
        );
        assert_eq!(Arc::strong_count(&written), 1);
        let _ = std::fs::remove_dir_all(dir);
    }

    fn spend_row(id: &str) -> SpendRow {
        SpendRow {
            request_id: id.into(),
            api_key: "token-a".into(),
            model: "up".into(),
            model_group: "m".into(),
            model_id: "m-0".into(),
            start_time: 5_000,
            end_time: 5_100,
            status: "success",
            ..SpendRow::default()
        }
    }

    fn batch(rows: Vec<SpendRow>, deltas: Vec<SpendDelta>) -> SpendBatch {
        SpendBatch { rows, deltas }
    }

    fn key(id: &str, team: Option<&str>) -> KeyRecord {
        KeyRecord {
            id: id.into(),
            token: format!("token-{id}"),
            key_name: "sk-...abcd".into(),
            key_alias: Some(format!("alias-{id}")),
            team_id: team.map(str::to_owned),
            user_id: None,
            policy: Policy {
                models: Some(vec!["m".into()]),
                max_budget: Some(2.5),
                budget_duration: Some("1d".into()),
                budget_anchor: 1_000,
                rpm_limit: Some(10),
                tpm_limit: None,
                max_parallel_requests: Some(2),
            },
            expires_at: None,
            metadata: JsonObject::new(),
            guardrails: vec!["pii".into()],
            blocked: false,
            spend: StoredSpend {
                spend: 0.0,
                period_start: 1_000,
            },
            created_at: 1_000,
            updated_at: 1_000,
            deleted_at: None,
        }
    }

    #[tokio::test]
    async fn many_spend_rows_are_written_each_to_its_own_values() {
        let (store, dir) = temporary_store().await;
        // 50 + 16 + 4 + 1 + 1: every prepared size, and one of them twice.
        let rows: Vec<SpendRow> = (0..72)
            .map(|i| SpendRow {
                request_id: format!("r{i:02}"),
                api_key: format!("token-{}", i % 3),
                key_alias: (i % 2 == 0).then(|| format!("alias-{i}")),
                spend: f64::from(i) / 8.0,
                prompt_tokens: i64::from(i),
                completion_tokens: i64::from(i) * 2,
                total_tokens: i64::from(i) * 3,
                model: format!("up-{i}"),
                model_group: "m".into(),
                model_id: "m-0".into(),
                user_id: None,
                team_id: Some(format!("team-{i}")),
                end_user: None,
                start_time: 5_000,
                end_time: 5_000 + i64::from(i),
                status: "success",
            })
            .collect();
        assert_rows_read_back(&store, rows).await;
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn records_spend_and_logs_round_trip_through_sqlite() {
        let (store, dir) = temporary_store().await;
        let mut a = key("a", None);
        store.insert(&a).await.expect("insert");
        store.insert(&key("b", None)).await.expect("insert");
        assert_eq!(
            store.key_by_token("token-a").await.expect("read"),
            Some(a.clone())
        );
        a.blocked = true;
        a.policy.rpm_limit = None;
        store.update(&a).await.expect("update");
        let read = store
            .key_by_token("token-a")
            .await
            .expect("read")
            .expect("found");
        assert!(read.blocked);
        assert_eq!(read.policy.rpm_limit, None);

        let entity = EntityId::new(Kind::Key, "a");
        let row = |id: &str| SpendRow {
            request_id: id.into(),
            api_key: "token-a".into(),
            key_alias: None,
            spend: 0.25,
            prompt_tokens: 3,
            completion_tokens: 4,
            total_tokens: 7,
            model: "up".into(),
            model_group: "m".into(),
            model_id: "m-0".into(),
            user_id: None,
            team_id: None,
            end_user: Some("u".into()),
            start_time: 5_000,
            end_time: 5_100,
            status: "success",
        };
        let delta = |period_start, amount| SpendDelta {
            entity: entity.clone(),
            period_start,
            amount,
        };
        store
            .write_spend(Arc::new(batch(
                vec![row("r1"), row("r2")],
                vec![delta(1_000, 0.5)],
            )))
            .await
            .expect("write");
        // A late delta for an older period leaves the current total alone; a newer period
        // replaces it.
        store
            .write_spend(Arc::new(batch(vec![], vec![delta(500, 9.0)])))
            .await
            .expect("write");
        let spend = |store: Store| async move {
            store
                .key_by_token("token-a")
                .await
                .expect("read")
                .expect("found")
                .spend
        };
        assert_eq!(spend(store.clone()).await.spend, 0.5);
        store
            .write_spend(Arc::new(batch(vec![], vec![delta(2_000, 0.125)])))
            .await
            .expect("write");
        assert_eq!(
            spend(store.clone()).await,
            StoredSpend {
                spend: 0.125,
                period_start: 2_000
            }
        );

        let logs = store
            .spend_logs(&SpendFilter {
                api_key: Some("token-a".into()),
                start: Some(5_000),
                limit: 10,
                ..SpendFilter::default()
            })
            .await
            .expect("logs");
        assert_eq!(logs, vec![row("r1"), row("r2")]);
        let none = store
            .spend_logs(&SpendFilter {
                end: Some(5_000),
                limit: 10,
                ..SpendFilter::default()
            })
            .await
            .expect("logs");
        assert!(none.is_empty());

        store
            .delete_keys(&["b".into()], 9_000)
            .await
            .expect("delete");
        let (listed, total) = store
            .list_keys(&KeyFilter::default(), 0, 10)
            .await
            .expect("list");
        assert_eq!((listed.len(), total), (1, 1));
        store.close().await;
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn passwords_stay_out_of_urls_in_errors() {
        assert_eq!(
            redact("postgres://app:s3cret@db:5432/portcullis"),
            "postgres://app:***@db:5432/portcullis"
        );
        assert_eq!(redact("sqlite:///tmp/x.db"), "sqlite:///tmp/x.db");
    }

    #[test]
    fn updates_skip_the_id_and_never_touch_spend() {
        let sql = TEAMS.update();
        assert!(sql.starts_with("UPDATE portcullis_teams SET team_alias = $2"));
        assert!(sql.ends_with("WHERE team_id = $1"));
        assert!(!sql.contains("spend"));
        let insert = KEYS.insert();
        let columns = KEY_COLUMNS.len() + POLICY_COLUMNS.len() + SPEND_COLUMNS.len();
        assert!(insert.contains(&format!("${columns})")));
    }
}
