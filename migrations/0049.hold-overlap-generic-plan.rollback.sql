-- The user-overlap check as before 0049 (PL/pgSQL's own plan choice).

ALTER FUNCTION booking_check_user_overlap(uuid, time_slots, uuid)
    RESET plan_cache_mode;
