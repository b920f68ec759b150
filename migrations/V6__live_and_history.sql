-- Live tasks and their history apart.
--
-- `task` keeps only the tasks that claims, heartbeats and the reclaimer
-- touch (pending and processing), so it and its indexes stay small however
-- long the history. A task that ends (completed, failed, cancelled) leaves
-- it in the statement that ends it and lands in `task_history`, partitioned
-- by status and then by completion day (UTC). Old days are dropped whole by
-- the nodes' retention job, never deleted row by row; the same job creates
-- the days ahead. A retried task moves back.
--
-- Every node of the cluster must run this version: an earlier node would
-- try to keep finished tasks in `task`, which no longer allows them.

CREATE TABLE task_history (
    id                  uuid        NOT NULL,
    seq                 bigint      NOT NULL,
    task_type           text        NOT NULL,
    status              text        NOT NULL
                        CHECK (status IN ('completed', 'failed', 'cancelled')),
    priority            integer     NOT NULL,
    attempts            integer     NOT NULL,
    max_attempts        integer     NOT NULL,
    scheduled_for       timestamptz NOT NULL,
    created_at          timestamptz NOT NULL,
    started_at          timestamptz,
    completed_at        timestamptz NOT NULL,
    locked_by           text,
    -- Kept so that a repeated complete or fail with the same token is
    -- recognised as already applied.
    lease_token         uuid,
    last_error          text,
    params              jsonb       NOT NULL,
    result              jsonb,
    library_id          uuid,
    series_id           uuid,
    book_id             uuid,
    dedup_key           text,
    progress_current    bigint,
    progress_total      bigint,
    progress_message    text,
    progress_updated_at timestamptz
) PARTITION BY LIST (status);

CREATE TABLE task_history_completed PARTITION OF task_history
    FOR VALUES IN ('completed') PARTITION BY RANGE (completed_at);
CREATE TABLE task_history_failed PARTITION OF task_history
    FOR VALUES IN ('failed') PARTITION BY RANGE (completed_at);
CREATE TABLE task_history_cancelled PARTITION OF task_history
    FOR VALUES IN ('cancelled') PARTITION BY RANGE (completed_at);

-- GetTask, the fencing checks of late outcomes, and listings (newest
-- first, by the time-ordered id) find finished tasks by id; every day's
-- partition gets its own copy of this index.
CREATE INDEX task_history_id_idx ON task_history (id);

-- One partition per status and UTC day, named task_history_<status>_<yyyymmdd>
-- (the nodes' retention job uses the same names).
CREATE FUNCTION pg_temp.history_day(status text, day date) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format(
        'CREATE TABLE IF NOT EXISTS %I PARTITION OF %I FOR VALUES FROM (%L) TO (%L)',
        'task_history_' || status || '_' || to_char(day, 'YYYYMMDD'),
        'task_history_' || status,
        day::timestamp AT TIME ZONE 'UTC',
        (day + 1)::timestamp AT TIME ZONE 'UTC');
END
$$;

-- The days of the finished tasks already here, and the days around today.
SELECT pg_temp.history_day(s.status, s.day)
FROM (
    SELECT DISTINCT status,
           (COALESCE(completed_at, created_at) AT TIME ZONE 'UTC')::date AS day
    FROM task WHERE status IN ('completed', 'failed', 'cancelled')
    UNION
    SELECT st, d::date
    FROM unnest(ARRAY['completed', 'failed', 'cancelled']) AS st,
         generate_series((now() AT TIME ZONE 'UTC')::date - 1,
                         (now() AT TIME ZONE 'UTC')::date + 7, interval '1 day') AS d
) s;

-- Every finished task moves, as it is.
INSERT INTO task_history (id, seq, task_type, status, priority, attempts, max_attempts,
    scheduled_for, created_at, started_at, completed_at, locked_by, lease_token,
    last_error, params, result, library_id, series_id, book_id, dedup_key,
    progress_current, progress_total, progress_message, progress_updated_at)
SELECT id, seq, task_type, status, priority, attempts, max_attempts,
    scheduled_for, created_at, started_at, COALESCE(completed_at, created_at), locked_by,
    lease_token, last_error, params, result, library_id, series_id, book_id, dedup_key,
    progress_current, progress_total, progress_message, progress_updated_at
FROM task WHERE status IN ('completed', 'failed', 'cancelled');

DELETE FROM task WHERE status IN ('completed', 'failed', 'cancelled');

-- What only finished tasks had.
DROP INDEX task_finished_idx;
ALTER TABLE task DROP COLUMN completed_at, DROP COLUMN result;
ALTER TABLE task DROP CONSTRAINT task_status_check;
ALTER TABLE task ADD CONSTRAINT task_status_check CHECK (status IN ('pending', 'processing'));

-- Every live task is pending or processing, so the dedup key is unique
-- among all of them; the predicate no longer needs the status.
DROP INDEX task_dedup_idx;
CREATE UNIQUE INDEX task_dedup_idx ON task (dedup_key) WHERE dedup_key IS NOT NULL;

-- Heartbeats as updates in place. A lease's expiry (`locked_until`) is no
-- longer indexed: the reclaimer finds leases by `reclaim_at`, when it should
-- look at them next, which a claim sets to the expiry and a heartbeat leaves
-- alone unless it shortens the lease. A heartbeat then changes no indexed
-- column, and Postgres writes it as a heap-only (HOT) update: no index
-- entry, no new page. The reclaimer, finding a lease renewed since, moves
-- its `reclaim_at` to the new expiry: one indexed write per lease length
-- instead of one per heartbeat. A progress report is HOT too.
ALTER TABLE task ADD COLUMN reclaim_at timestamptz;
UPDATE task SET reclaim_at = locked_until WHERE status = 'processing';
DROP INDEX task_processing_idx;
CREATE INDEX task_processing_idx ON task (reclaim_at) WHERE status = 'processing';

-- Room on each page for the new version of a row updated in place.
ALTER TABLE task SET (fillfactor = 80);

-- Wake-ups: one payload-free notification per statement that leaves a task
-- pending. Every insert into the live table does (a create, a retry); of the
-- updates only those that turn a task pending again (a release, a failure
-- with attempts left, an expired lease) do, so a claim, a heartbeat or a
-- progress report costs no trigger work at all. Postgres folds the
-- notifications of one transaction into one.
DROP TRIGGER task_wake_insert ON task;
DROP TRIGGER task_wake_update ON task;
DROP FUNCTION task_wake();
CREATE FUNCTION task_wake() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('leasehold_task', '');
    RETURN NULL;
END
$$;
CREATE TRIGGER task_wake_insert AFTER INSERT ON task
    FOR EACH STATEMENT EXECUTE FUNCTION task_wake();
CREATE TRIGGER task_wake_update AFTER UPDATE OF status ON task
    FOR EACH ROW WHEN (NEW.status = 'pending' AND OLD.status <> 'pending')
    EXECUTE FUNCTION task_wake();

-- Every task, live or finished, as one relation, for operators reading the
-- database directly (the nodes read each table on its own).
CREATE VIEW task_all AS
    SELECT id, seq, task_type, status, priority, attempts, max_attempts, scheduled_for,
           created_at, started_at, NULL::timestamptz AS completed_at, locked_by, locked_until,
           lease_token, last_error, params, NULL::jsonb AS result, library_id, series_id,
           book_id, dedup_key, progress_current, progress_total, progress_message,
           progress_updated_at
    FROM task
    UNION ALL
    SELECT id, seq, task_type, status, priority, attempts, max_attempts, scheduled_for,
           created_at, started_at, completed_at, locked_by, NULL::timestamptz AS locked_until,
           lease_token, last_error, params, result, library_id, series_id, book_id, dedup_key,
           progress_current, progress_total, progress_message, progress_updated_at
    FROM task_history;
