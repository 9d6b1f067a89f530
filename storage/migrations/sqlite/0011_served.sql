-- Which builders each master runs (issue 16): a builder is served while an active
-- master registered it. Work for a builder nobody serves waits; the API and the CLI say
-- so. A master's rows go when it registers again, shuts down or is expired.
CREATE TABLE master_builders (
    master_id  INTEGER NOT NULL REFERENCES masters (id) ON DELETE CASCADE,
    builder_id INTEGER NOT NULL REFERENCES builders (id) ON DELETE CASCADE,
    PRIMARY KEY (master_id, builder_id)
);
CREATE INDEX master_builders_builder ON master_builders (builder_id);
