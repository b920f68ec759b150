-- The task table: one row per task, the single source of truth for leases.
--
-- status is text with a CHECK so that operators reading it with psql see
-- words. lease_token changes on every hand-out; it stays on the row after a
-- completion or a failure so that a retried call with the same token can be
-- recognised as already applied, and is cleared when the lease is voided by
-- release, expiry or an operator retry.
CREATE TABLE task (
    id            uuid        PRIMARY KEY,
    seq           bigint      GENERATED ALWAYS AS IDENTITY,
    task_type     text        NOT NULL,
    status        text        NOT NULL DEFAULT 'pending'
                  CHECK (status IN ('pending', 'processing', 'completed', 'failed', 'cancelled')),
    priority      integer     NOT NULL DEFAULT 0,
    attempts      integer     NOT NULL DEFAULT 0,
    max_attempts  integer     NOT NULL DEFAULT 3,
    scheduled_for timestamptz NOT NULL DEFAULT now(),
    created_at    timestamptz NOT NULL DEFAULT now(),
    started_at    timestamptz,
    completed_at  timestamptz,
    locked_by     text,
    locked_until  timestamptz,
    lease_token   uuid,
    last_error    text,
    params        jsonb       NOT NULL DEFAULT '{}',
    result        jsonb,
    library_id    uuid,
    series_id     uuid,
    book_id       uuid,
    dedup_key     text
);

-- Creation order: claim tie-break and keyset pagination (newest first).
CREATE UNIQUE INDEX task_seq_idx ON task (seq);

-- Claimable work, in claim order. Partial, so it holds only pending rows and
-- stays small however many finished rows the table keeps.
CREATE INDEX task_pending_idx ON task (priority DESC, scheduled_for, seq)
    WHERE status = 'pending';

-- When the next pending task becomes due (wakes long polls on time).
CREATE INDEX task_pending_due_idx ON task (scheduled_for)
    WHERE status = 'pending';

-- Lease expiry, for the reclaimer.
CREATE INDEX task_processing_idx ON task (locked_until)
    WHERE status = 'processing';

-- At most one live task per dedup key; concurrent creates race on this index
-- instead of a read-then-write.
CREATE UNIQUE INDEX task_dedup_idx ON task (dedup_key)
    WHERE dedup_key IS NOT NULL AND status IN ('pending', 'processing');

-- Finished tasks by age, for purging.
CREATE INDEX task_finished_idx ON task (completed_at)
    WHERE status IN ('completed', 'failed', 'cancelled');

-- Wake-ups: one notification per statement that leaves a task pending
-- (created, retried, released, failed with attempts left, reclaimed), and
-- Postgres folds identical notifications of one transaction into one. No
-- payload: listeners re-run their claim, so a batch of 10,000 creates costs
-- one notification, not 10,000. Statement-level triggers with transition
-- tables keep this in one place whichever statement made the task pending.
CREATE FUNCTION task_wake() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM changed WHERE status = 'pending') THEN
        PERFORM pg_notify('leasehold_task', '');
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER task_wake_insert AFTER INSERT ON task
    REFERENCING NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION task_wake();

CREATE TRIGGER task_wake_update AFTER UPDATE ON task
    REFERENCING NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION task_wake();
