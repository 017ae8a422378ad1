-- depends: 0045.buffer-probe-skip
-- transactional: false
--
-- The index of 0044's columns, built without blocking writes: a user's
-- appointments that end after an instant (storage/sql/tables.sql). An
-- earlier attempt that failed leaves an invalid index of the same name;
-- it is dropped first.
DROP INDEX CONCURRENTLY IF EXISTS appointments_user_slot_end;

CREATE INDEX CONCURRENTLY appointments_user_slot_end ON appointments (user_id, slot_end);
