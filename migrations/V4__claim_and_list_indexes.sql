-- Claimable work of one task type, in claim order. Takers that run only
-- some types claim through this index, one walk per type, instead of
-- stepping over every pending task of other types that comes first in the
-- shared pending index. Partial like that one: it holds only pending rows,
-- so claims and completions never write to it.
CREATE INDEX task_pending_type_idx ON task (task_type, priority DESC, scheduled_for, seq)
    WHERE status = 'pending';

-- Listings page by task id (ids are time-ordered UUIDv7, so id order is
-- creation order), through the primary key. The index on `seq` served only
-- listings, and every claim and completion (neither can be a HOT update)
-- wrote an entry into it. `seq` stays: it breaks claim-order ties inside
-- the pending indexes.
DROP INDEX task_seq_idx;
