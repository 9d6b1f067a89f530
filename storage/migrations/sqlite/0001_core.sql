-- Kiln core schema, SQLite flavour. Times are INTEGER microseconds since the Unix epoch,
-- JSON values are TEXT, result codes are Buildbot's numbers (SUCCESS 0 .. CANCELLED 6).
-- The PostgreSQL backend keeps a migration history with the same numbering.

CREATE TABLE masters (
    id          INTEGER PRIMARY KEY,
    name        TEXT    NOT NULL UNIQUE,
    active      INTEGER NOT NULL DEFAULT 1,
    last_active INTEGER NOT NULL
);

CREATE TABLE builders (
    id          INTEGER PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    description TEXT
);

-- Identical stamps are stored once: absent branch/revision are stored as ''.
CREATE TABLE sourcestamps (
    id         INTEGER PRIMARY KEY,
    codebase   TEXT NOT NULL,
    repository TEXT NOT NULL,
    branch     TEXT NOT NULL,
    revision   TEXT NOT NULL,
    project    TEXT NOT NULL,
    UNIQUE (codebase, repository, branch, revision, project)
);

CREATE TABLE buildsets (
    id                  INTEGER PRIMARY KEY,
    reason              TEXT    NOT NULL,
    external_idstring   TEXT,
    submitted_at        INTEGER NOT NULL,
    complete            INTEGER NOT NULL DEFAULT 0,
    complete_at         INTEGER,
    results             INTEGER,
    parent_buildid      INTEGER REFERENCES builds (id) ON DELETE SET NULL,
    parent_relationship TEXT,
    rebuilt_buildid     INTEGER REFERENCES builds (id) ON DELETE SET NULL
);
CREATE INDEX buildsets_complete ON buildsets (complete);
CREATE INDEX buildsets_parent ON buildsets (parent_buildid);

CREATE TABLE buildset_sourcestamps (
    buildset_id    INTEGER NOT NULL REFERENCES buildsets (id) ON DELETE CASCADE,
    sourcestamp_id INTEGER NOT NULL REFERENCES sourcestamps (id),
    PRIMARY KEY (buildset_id, sourcestamp_id)
);
CREATE INDEX buildset_sourcestamps_ss ON buildset_sourcestamps (sourcestamp_id);

CREATE TABLE buildset_properties (
    buildset_id INTEGER NOT NULL REFERENCES buildsets (id) ON DELETE CASCADE,
    name        TEXT    NOT NULL,
    value       TEXT    NOT NULL,
    source      TEXT    NOT NULL,
    PRIMARY KEY (buildset_id, name)
);

CREATE TABLE buildrequests (
    id               INTEGER PRIMARY KEY,
    buildset_id      INTEGER NOT NULL REFERENCES buildsets (id) ON DELETE CASCADE,
    builder_id       INTEGER NOT NULL REFERENCES builders (id),
    priority         INTEGER NOT NULL DEFAULT 0,
    submitted_at     INTEGER NOT NULL,
    waited_for       INTEGER NOT NULL DEFAULT 0,
    complete         INTEGER NOT NULL DEFAULT 0,
    complete_at      INTEGER,
    results          INTEGER,
    cancel_requested INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX buildrequests_buildset ON buildrequests (buildset_id);
-- The queue: incomplete requests per builder in claim order.
CREATE INDEX buildrequests_queue ON buildrequests (builder_id, priority DESC, submitted_at, id)
    WHERE complete = 0;

-- One row per claim: the primary key makes a double claim impossible.
CREATE TABLE buildrequest_claims (
    request_id INTEGER PRIMARY KEY REFERENCES buildrequests (id) ON DELETE CASCADE,
    master_id  INTEGER NOT NULL REFERENCES masters (id),
    claimed_at INTEGER NOT NULL
);
CREATE INDEX buildrequest_claims_master ON buildrequest_claims (master_id);

CREATE TABLE builds (
    id               INTEGER PRIMARY KEY,
    number           INTEGER NOT NULL,
    builder_id       INTEGER NOT NULL REFERENCES builders (id),
    buildrequest_id  INTEGER NOT NULL REFERENCES buildrequests (id),
    master_id        INTEGER NOT NULL REFERENCES masters (id),
    worker_slot      INTEGER,
    started_at       INTEGER NOT NULL,
    complete_at      INTEGER,
    state_string     TEXT    NOT NULL DEFAULT '',
    locks_duration_s REAL    NOT NULL DEFAULT 0,
    results          INTEGER,
    return_value     TEXT,
    error            TEXT,
    traceback        TEXT,
    UNIQUE (builder_id, number)
);
CREATE INDEX builds_request ON builds (buildrequest_id);
CREATE INDEX builds_master_running ON builds (master_id) WHERE complete_at IS NULL;
CREATE INDEX builds_builder_complete ON builds (builder_id, complete_at);

CREATE TABLE build_properties (
    build_id INTEGER NOT NULL REFERENCES builds (id) ON DELETE CASCADE,
    name     TEXT    NOT NULL,
    value    TEXT    NOT NULL,
    source   TEXT    NOT NULL,
    PRIMARY KEY (build_id, name)
);

-- The latest report per group; seq keeps the order groups first reported.
CREATE TABLE build_progress (
    build_id   INTEGER NOT NULL REFERENCES builds (id) ON DELETE CASCADE,
    group_path TEXT    NOT NULL,
    seq        INTEGER NOT NULL,
    current    INTEGER NOT NULL,
    total      INTEGER NOT NULL,
    status     TEXT    NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (build_id, group_path)
);

CREATE TABLE build_logs (
    id       INTEGER PRIMARY KEY,
    build_id INTEGER NOT NULL REFERENCES builds (id) ON DELETE CASCADE,
    at       INTEGER NOT NULL,
    level    INTEGER NOT NULL,
    message  TEXT    NOT NULL,
    fields   TEXT    NOT NULL DEFAULT '{}'
);
CREATE INDEX build_logs_build ON build_logs (build_id, id);
CREATE INDEX build_logs_at ON build_logs (at);
