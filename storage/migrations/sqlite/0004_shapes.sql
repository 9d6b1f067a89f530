-- Production shapes: the claim order Buildbot uses, an outbox whose seqs are never
-- reused, and the depth of every buildset in its trigger tree.

-- Within a builder, requests are claimed by priority, then id; across builders the
-- scheduler looks at each builder's highest priority and its oldest queued request.
-- Both are index seeks per builder, however long the queue.
DROP INDEX buildrequests_queue;
CREATE INDEX buildrequests_queue ON buildrequests (builder_id, priority DESC, id) WHERE complete = 0;
CREATE INDEX buildrequests_oldest ON buildrequests (builder_id, submitted_at) WHERE complete = 0;

-- `INTEGER PRIMARY KEY` hands out MAX(seq) + 1, so once the prune emptied the table the
-- next event took a seq at or below a reporter's cursor and was never delivered.
-- AUTOINCREMENT never hands out a seq twice. The sequence starts past every seq a
-- reporter has already dealt with, even when the table is empty now.
CREATE TABLE events_autoincrement (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    kind        TEXT    NOT NULL,
    buildset_id INTEGER NOT NULL,
    build_id    INTEGER,
    builder     TEXT,
    results     INTEGER,
    at          INTEGER NOT NULL,
    payload     TEXT    NOT NULL
);
INSERT INTO events_autoincrement (seq, kind, buildset_id, build_id, builder, results, at, payload)
    SELECT seq, kind, buildset_id, build_id, builder, results, at, payload FROM events;
DROP TABLE events;
ALTER TABLE events_autoincrement RENAME TO events;
DELETE FROM sqlite_sequence WHERE name IN ('events', 'events_autoincrement');
INSERT INTO sqlite_sequence (name, seq)
    SELECT 'events', MAX(n) FROM (SELECT MAX(seq) AS n FROM events
                                  UNION ALL SELECT MAX(cursor) FROM reporters
                                  UNION ALL SELECT 0);

-- How deep a buildset hangs in its trigger tree: 0 for a submission, its parent's
-- buildset's depth + 1 for a child. Bounds self-triggering jobs.
ALTER TABLE buildsets ADD COLUMN depth INTEGER NOT NULL DEFAULT 0;
