-- A buildset completes when none of its requests is open: the check seeks
-- (buildset_id, complete = 0) in one index. With buildset_id alone, PostgreSQL's
-- planner, on young tables whose statistics lag, combined that index with the partial
-- queue index (complete = 0) in a BitmapAnd that read every open request of every
-- builder for each buildset completed: a finish batch cost grew with the queue.
DROP INDEX buildrequests_buildset;
CREATE INDEX buildrequests_buildset ON buildrequests (buildset_id, complete);

-- Open buildsets by id: completing a batch probes it with the batch's ids. An index on
-- `complete` alone tempted the planner, once all of a queue's buildsets were open, to
-- read every open buildset and filter by id (cheaper in its units than one probe per
-- id, 9 ms per batch of 256 in practice).
DROP INDEX buildsets_complete;
CREATE INDEX buildsets_open ON buildsets (id) WHERE complete = 0;
