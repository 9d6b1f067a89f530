-- Parent/child buildsets, builder dependencies, and the reporters' outbox.

-- A child buildset remembers the parent *request* as well as the parent build, and which
-- trigger of that request made it: when the parent's master dies and its request runs
-- again, the new build finds the children the old one started instead of starting them
-- twice.
ALTER TABLE buildsets ADD COLUMN parent_request_id INTEGER REFERENCES buildrequests (id) ON DELETE SET NULL;
ALTER TABLE buildsets ADD COLUMN trigger_key TEXT;
CREATE INDEX buildsets_parent_request ON buildsets (parent_request_id) WHERE parent_request_id IS NOT NULL;

-- The builders a builder depends on (jobcontrol): a JSON array of builder names.
ALTER TABLE builders ADD COLUMN depends_on TEXT NOT NULL DEFAULT '[]';

-- The outbox: one row per lifecycle event, written in the transaction that made the
-- change, while at least one reporter is registered. `payload` is the event as a JSON
-- object, exactly what reporters receive.
CREATE TABLE events (
    seq         INTEGER PRIMARY KEY,
    kind        TEXT    NOT NULL,
    buildset_id INTEGER NOT NULL,
    build_id    INTEGER,
    builder     TEXT,
    results     INTEGER,
    at          INTEGER NOT NULL,
    payload     TEXT    NOT NULL
);

-- One row per reporter: how far it has got through the outbox, and which master holds
-- the lease to deliver its events (one deliverer at a time keeps them in order).
CREATE TABLE reporters (
    name        TEXT    PRIMARY KEY,
    cursor      INTEGER NOT NULL,
    owner       INTEGER REFERENCES masters (id) ON DELETE SET NULL,
    lease_until INTEGER,
    attempts    INTEGER NOT NULL DEFAULT 0,
    last_error  TEXT,
    delivered   INTEGER NOT NULL DEFAULT 0,
    dropped     INTEGER NOT NULL DEFAULT 0
);

-- Events a reporter gave up on after its last attempt, with the last error.
CREATE TABLE reporter_dropped (
    reporter TEXT    NOT NULL,
    seq      INTEGER NOT NULL,
    attempts INTEGER NOT NULL,
    error    TEXT    NOT NULL,
    at       INTEGER NOT NULL,
    PRIMARY KEY (reporter, seq)
);
