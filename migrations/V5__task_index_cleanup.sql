-- Autovacuum cleans the task table's indexes on every run. By default
-- Postgres skips index vacuuming when under 2 % of a table's pages hold
-- dead rows, which on a table that keeps a large history is nearly always
-- the case; the dead entries then stay in the pending indexes that every
-- claim walks. (The node's own vacuum asks for INDEX_CLEANUP ON itself.)
ALTER TABLE task SET (vacuum_index_cleanup = on);
