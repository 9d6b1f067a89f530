-- Locks (issue 15, Buildbot's master locks): a lock has a capacity in units; a builder
-- takes some units of each lock it lists, and a request of it is claimed only when all
-- of them are free. A hold lives while its build runs: finishing the build, or expiring
-- its master, deletes it, so this table holds only what is held now.
CREATE TABLE locks (
    name     TEXT    PRIMARY KEY,
    capacity BIGINT NOT NULL CHECK (capacity > 0)
);
-- What each builder takes, as its master registered it (the latest registration wins).
CREATE TABLE builder_locks (
    builder_id BIGINT NOT NULL REFERENCES builders (id) ON DELETE CASCADE,
    lock_name  TEXT    NOT NULL REFERENCES locks (name),
    units      BIGINT NOT NULL CHECK (units > 0),
    PRIMARY KEY (builder_id, lock_name)
);
CREATE INDEX builder_locks_lock ON builder_locks (lock_name);
CREATE TABLE lock_holds (
    lock_name   TEXT    NOT NULL REFERENCES locks (name),
    build_id    BIGINT NOT NULL REFERENCES builds (id) ON DELETE CASCADE,
    master_id   BIGINT NOT NULL REFERENCES masters (id),
    units       BIGINT NOT NULL,
    acquired_at BIGINT NOT NULL,
    PRIMARY KEY (lock_name, build_id)
);
CREATE INDEX lock_holds_build ON lock_holds (build_id);
CREATE INDEX lock_holds_master ON lock_holds (master_id);
-- When the request was first next in line and found a lock busy; the build's
-- locks_duration_s is the time from then to its start.
ALTER TABLE buildrequests ADD COLUMN lock_wait_since BIGINT;
-- Schedules with `only_if_changed` on a property read the newest value a property was
-- submitted with: one seek, however many buildsets there are.
CREATE INDEX buildset_properties_name ON buildset_properties (name, buildset_id);
