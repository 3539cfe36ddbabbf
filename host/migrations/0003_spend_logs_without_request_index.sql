-- A spend row is found by its request id through the time the id begins with (Store::spend_logs),
-- so the table keeps no index of its own on request ids: one B-tree fewer to write per call.
-- Neither engine drops a primary key in place in a form both accept; the table is rebuilt.
CREATE TABLE portcullis_spend_logs_next (
    request_id TEXT NOT NULL,
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
INSERT INTO portcullis_spend_logs_next (
    request_id, api_key, key_alias, spend, prompt_tokens, completion_tokens, total_tokens, model,
    model_group, model_id, user_id, team_id, end_user, start_time, end_time, status
)
SELECT
    request_id, api_key, key_alias, spend, prompt_tokens, completion_tokens, total_tokens, model,
    model_group, model_id, user_id, team_id, end_user, start_time, end_time, status
FROM portcullis_spend_logs
ORDER BY start_time, request_id;
DROP TABLE portcullis_spend_logs;
ALTER TABLE portcullis_spend_logs_next RENAME TO portcullis_spend_logs;
CREATE INDEX portcullis_spend_logs_key ON portcullis_spend_logs (api_key, start_time);
CREATE INDEX portcullis_spend_logs_time ON portcullis_spend_logs (start_time);
CREATE INDEX portcullis_spend_logs_team ON portcullis_spend_logs (team_id, start_time)
    WHERE team_id IS NOT NULL;
CREATE INDEX portcullis_spend_logs_user ON portcullis_spend_logs (user_id, start_time)
    WHERE user_id IS NOT NULL;
