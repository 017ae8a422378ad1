-- transactional: false
--
-- Back to 0045: the index dropped; the CHECK stays validated (0044's
-- rollback drops it).
DROP INDEX CONCURRENTLY IF EXISTS appointments_user_slot_end;
