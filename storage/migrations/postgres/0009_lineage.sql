-- Buildbot API parity (issue 15): a resubmitted buildset names the one it repeats; a
-- request collapsed into a newer one names it.
ALTER TABLE buildsets ADD COLUMN resubmitted_from BIGINT REFERENCES buildsets (id) ON DELETE SET NULL;
ALTER TABLE buildrequests ADD COLUMN superseded_by BIGINT;
