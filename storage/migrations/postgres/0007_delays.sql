-- Delayed runs and retry backoff (issue 15): a request is not claimable before
-- not_before (microseconds since the epoch); NULL means at once.
ALTER TABLE buildrequests ADD COLUMN not_before BIGINT;
