-- Schedules (issue 15): what each one last fired, so that a restart neither skips nor
-- repeats a fire. One buildset per tick is kept by the buildset's idempotency key
-- (`schedule:<name>:<tick>`), so masters firing the same tick make one buildset.
CREATE TABLE schedules (
    name             TEXT    PRIMARY KEY,
    -- JSON: the timing, the submission it makes, its options (what `kiln list schedules`
    -- and a forced fire from any process read).
    definition       TEXT    NOT NULL,
    -- The latest tick fired or passed over, or the registration time: ticks up to it are
    -- done.
    last_fire        INTEGER NOT NULL,
    next_fire        INTEGER,
    -- No foreign key: deleting old buildsets must not touch schedules.
    last_buildset_id INTEGER,
    fires            INTEGER NOT NULL DEFAULT 0,
    updated_at       INTEGER NOT NULL
);
