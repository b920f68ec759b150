-- Progress of the running attempt, reported by its worker.
ALTER TABLE task
    ADD COLUMN progress_current    bigint,
    ADD COLUMN progress_total      bigint,
    ADD COLUMN progress_message    text,
    ADD COLUMN progress_updated_at timestamptz;

-- Live nodes. Each node refreshes its row every few seconds; a row that
-- stops being refreshed belongs to a dead node, and any node deletes it
-- (with its sessions).
CREATE TABLE node (
    id           uuid        PRIMARY KEY,
    address      text        NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT now(),
    last_seen_at timestamptz NOT NULL DEFAULT now(),
    draining     boolean     NOT NULL DEFAULT false
);

-- Connected worker sessions, for ListWorkers. The stream itself lives in
-- its node's memory; leases never depend on these rows.
CREATE TABLE worker_session (
    id           uuid        PRIMARY KEY,
    node_id      uuid        NOT NULL REFERENCES node (id) ON DELETE CASCADE,
    worker_id    text        NOT NULL,
    task_types   text[]      NOT NULL,
    slots        integer     NOT NULL,
    labels       jsonb       NOT NULL DEFAULT '{}',
    in_flight    integer     NOT NULL DEFAULT 0,
    draining     boolean     NOT NULL DEFAULT false,
    connected_at timestamptz NOT NULL DEFAULT now(),
    last_seen_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX worker_session_node_idx ON worker_session (node_id);
