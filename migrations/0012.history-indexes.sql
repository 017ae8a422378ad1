-- depends: 0011.hold-cost
--
-- One user's events in stream order (storage/sql/tables.sql). A CLIENT's
-- event reads always filter by its own user; without this index a read
-- from the start or from an old cursor scanned every event after the
-- cursor, a cost that grew with the whole history (docs/performance.md,
-- "history").
--
-- On a large event table the build blocks writes to it while it runs. To
-- avoid that, create the index first by hand with
--   CREATE INDEX CONCURRENTLY appointment_events_user
--       ON appointment_events (user_id, xid, seq);
-- and this migration then finds it and does nothing.

CREATE INDEX IF NOT EXISTS appointment_events_user ON appointment_events (user_id, xid, seq);
