-- Deleting a build or a buildset (retention, `kiln delete`) sets to NULL the buildsets'
-- columns that name it, and the database finds those rows by each column: without an
-- index on it, every deleted row walked the whole buildsets table (34 ms a build and 42
-- ms a buildset at 200,000 buildsets on SQLite). Each index holds only the rows that
-- name something, so an ordinary submit writes none of them; `buildsets_parent` is
-- narrowed the same way, one index page fewer per submit. A reporter's lease names its
-- master: that one is indexed too, so that every reference is.
DROP INDEX buildsets_parent;
CREATE INDEX buildsets_parent ON buildsets (parent_buildid) WHERE parent_buildid IS NOT NULL;
CREATE INDEX buildsets_rebuilt ON buildsets (rebuilt_buildid) WHERE rebuilt_buildid IS NOT NULL;
CREATE INDEX buildsets_resubmitted ON buildsets (resubmitted_from) WHERE resubmitted_from IS NOT NULL;
CREATE INDEX reporters_owner ON reporters (owner);
