-- transactional: false
DROP INDEX CONCURRENTLY IF EXISTS appointments_user_slot_end;
