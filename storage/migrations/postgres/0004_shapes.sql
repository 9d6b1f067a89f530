-- Production shapes: the claim order Buildbot uses and the depth of every buildset in
-- its trigger tree. (The outbox's identity column never hands out a seq twice, so
-- unlike SQLite's it needs no change.)

-- Within a builder, requests are claimed by priority, then id; across builders the
-- scheduler looks at each builder's highest priority and its oldest queued request.
-- Both are index seeks per builder, however long the queue.
DROP INDEX buildrequests_queue;
CREATE INDEX buildrequests_queue ON buildrequests (builder_id, priority DESC, id) WHERE complete = 0;
CREATE INDEX buildrequests_oldest ON buildrequests (builder_id, submitted_at) WHERE complete = 0;

-- How deep a buildset hangs in its trigger tree: 0 for a submission, its parent's
-- buildset's depth + 1 for a child. Bounds self-triggering jobs.
ALTER TABLE buildsets ADD COLUMN depth BIGINT NOT NULL DEFAULT 0;
