-- The dashboard's and the API's page of one builder's builds, newest first, seeks this
-- index and stops at the page's limit; with only (builder_id, complete_at) it read every
-- build of the builder and sorted them by id.
CREATE INDEX builds_builder ON builds (builder_id, id);

-- The same for one builder's requests, newest first: the only index on builder_id was
-- the queue's, which holds incomplete requests alone.
CREATE INDEX buildrequests_builder ON buildrequests (builder_id, id);
