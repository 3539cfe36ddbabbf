-- Keys, teams, users and spend logs. Written once for SQLite and Postgres alike: TEXT, BIGINT and
-- DOUBLE PRECISION only; times are Unix milliseconds; lists and objects are JSON text.

CREATE TABLE portcullis_teams (
    team_id TEXT PRIMARY KEY,
    team_alias TEXT,
    models TEXT,
    max_budget DOUBLE PRECISION,
    budget_duration TEXT,
    budget_anchor BIGINT NOT NULL,
    rpm_limit BIGINT,
    tpm_limit BIGINT,
    max_parallel_requests BIGINT,
    metadata TEXT NOT NULL,
    blocked BIGINT NOT NULL,
    spend DOUBLE PRECISION NOT NULL,
    budget_period_start BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

CREATE TABLE portcullis_users (
    user_id TEXT PRIMARY KEY,
    user_alias TEXT,
    user_email TEXT,
    models TEXT,
    max_budget DOUBLE PRECISION,
    budget_duration TEXT,
    budget_anchor BIGINT NOT NULL,
    rpm_limit BIGINT,
    tpm_limit BIGINT,
    max_parallel_requests BIGINT,
    metadata TEXT NOT NULL,
    spend DOUBLE PRECISION NOT NULL,
    budget_period_start BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

-- `token` is the SHA-256 of the key; the plaintext is never stored. `id` stays when a key is
-- regenerated, so its spend and limits carry over. Deleted keys stay, marked, so that a client
-- using one is told it was deleted.
CREATE TABLE portcullis_keys (
    id TEXT PRIMARY KEY,
    token TEXT NOT NULL UNIQUE,
    key_name TEXT NOT NULL,
    key_alias TEXT,
    team_id TEXT,
    user_id TEXT,
    models TEXT,
    max_budget DOUBLE PRECISION,
    budget_duration TEXT,
    budget_anchor BIGINT NOT NULL,
    rpm_limit BIGINT,
    tpm_limit BIGINT,
    max_parallel_requests BIGINT,
    expires_at BIGINT,
    metadata TEXT NOT NULL,
    guardrails TEXT NOT NULL,
    blocked BIGINT NOT NULL,
    spend DOUBLE PRECISION NOT NULL,
    budget_period_start BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    deleted_at BIGINT
);
CREATE INDEX portcullis_keys_team ON portcullis_keys (team_id);
CREATE INDEX portcullis_keys_user ON portcullis_keys (user_id);

CREATE TABLE portcullis_spend_logs (
    request_id TEXT PRIMARY KEY,
    api_key TEXT NOT NULL,
    key_alias TEXT,
    spend DOUBLE PRECISION NOT NULL,
    prompt_tokens BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    total_tokens BIGINT NOT NULL,
    model TEXT NOT NULL,
    model_group TEXT NOT NULL,
    model_id TEXT NOT NULL,
    user_id TEXT,
    team_id TEXT,
    end_user TEXT,
    start_time BIGINT NOT NULL,
    end_time BIGINT NOT NULL,
    status TEXT NOT NULL
);
CREATE INDEX portcullis_spend_logs_key ON portcullis_spend_logs (api_key, start_time);
CREATE INDEX portcullis_spend_logs_team ON portcullis_spend_logs (team_id, start_time);
CREATE INDEX portcullis_spend_logs_user ON portcullis_spend_logs (user_id, start_time);
CREATE INDEX portcullis_spend_logs_time ON portcullis_spend_logs (start_time);
