-- Most calls have no team or no user; their spend-log rows need no entry in those indexes.
-- `team_id = $1` implies `team_id IS NOT NULL`, so both SQLite and Postgres still use them.
DROP INDEX portcullis_spend_logs_team;
DROP INDEX portcullis_spend_logs_user;
CREATE INDEX portcullis_spend_logs_team ON portcullis_spend_logs (team_id, start_time)
    WHERE team_id IS NOT NULL;
CREATE INDEX portcullis_spend_logs_user ON portcullis_spend_logs (user_id, start_time)
    WHERE user_id IS NOT NULL;
