-- depends: 0045.buffer-probe-skip
-- transactional: false
--
-- 0044's index and the validation of its CHECK, each without blocking
-- writes: the index of a user's appointments that end after an instant
-- (storage/sql/tables.sql), built CONCURRENTLY (an earlier attempt that
-- failed leaves an invalid index of the same name; it is dropped first),
-- and VALIDATE, which scans time_slots under a lock that lets reads and
-- writes go on. A slot longer than 48 hours stops it here: shorten or
-- delete it, then apply again.
DROP INDEX CONCURRENTLY IF EXISTS appointments_user_slot_end;

CREATE INDEX CONCURRENTLY appointments_user_slot_end ON appointments (user_id, slot_end);

ALTER TABLE time_slots VALIDATE CONSTRAINT time_slots_length_bounded;
