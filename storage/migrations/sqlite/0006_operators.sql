-- Operators' controls (issue 15).

-- A paused builder keeps its queue: no master claims its requests until it is resumed.
-- Stored, so that the pause survives restarts and every master sharing the database
-- sees it.
ALTER TABLE builders ADD COLUMN paused INTEGER NOT NULL DEFAULT 0;

-- Idempotent submission: a second submit with the key of an existing buildset gets that
-- buildset back. The unique index is what makes it atomic; it frees the key when the
-- buildset is deleted.
ALTER TABLE buildsets ADD COLUMN idempotency_key TEXT;
CREATE UNIQUE INDEX buildsets_idempotency_key ON buildsets (idempotency_key)
    WHERE idempotency_key IS NOT NULL;
