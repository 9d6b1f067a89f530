-- Completing a buildset reads, for its requests, whether any is open and the worst of
-- their results: with `results` in the index that is one index range, without a visit
-- to each request's row.
DROP INDEX buildrequests_buildset;
CREATE INDEX buildrequests_buildset ON buildrequests (buildset_id, complete, results);
