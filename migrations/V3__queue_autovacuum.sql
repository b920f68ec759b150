-- Autovacuum tuned for a queue table. Every task is inserted, then updated
-- at least twice (lease, outcome), and none of these updates can be HOT
-- (each changes `status`, which the partial indexes depend on). With the
-- default thresholds (20 % of the table) a table holding a large history
-- waits for millions of dead row versions before it is vacuumed, and until
-- then every claim that finds no due task walks the dead entries of the
-- pending index. A fixed threshold vacuums after every few thousand
-- finished tasks whatever the history, and the table's indexes stay small.
-- The insert thresholds keep the visibility map current for tables that
-- mostly grow (tasks created far ahead). Vacuum runs unthrottled on this
-- table: its work per run is small and it should finish before the next.
ALTER TABLE task SET (
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 10000,
    autovacuum_vacuum_insert_scale_factor = 0,
    autovacuum_vacuum_insert_threshold = 50000,
    autovacuum_analyze_scale_factor = 0,
    autovacuum_analyze_threshold = 50000,
    autovacuum_vacuum_cost_delay = 0
);

-- The session directory is rewritten by every node every few seconds.
ALTER TABLE worker_session SET (
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_vacuum_cost_delay = 0
);
