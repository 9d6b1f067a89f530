-- Files a build left in its result directory (Copr's result dir), recorded when the
-- build is settled. `path` is relative to the directory, '/'-separated; `location` is
-- where the file lies on the master that ran the build.
CREATE TABLE build_artifacts (
    build_id INTEGER NOT NULL REFERENCES builds (id) ON DELETE CASCADE,
    path     TEXT    NOT NULL,
    size     INTEGER NOT NULL,
    location TEXT    NOT NULL,
    PRIMARY KEY (build_id, path)
);
