-- depends: 0048.commit-by
--
-- The user-overlap check of every hold and reschedule runs its two probes
-- with their generic plans: left to choose, PL/pgSQL planned them afresh
-- on a database with a million past appointments (0.15-0.6 ms per hold).
-- Same signature and body: only the function's plan_cache_mode changes,
-- so the body stays in storage/sql/support.sql alone.

ALTER FUNCTION booking_check_user_overlap(uuid, time_slots, uuid)
    SET plan_cache_mode = force_generic_plan;
