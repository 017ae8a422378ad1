-- depends: 0048.commit-by
--
-- The user-overlap check of every hold and reschedule runs its two probes
-- with their generic plans: left to choose, PL/pgSQL planned them afresh
-- on a database with a million past appointments (0.15-0.6 ms per hold).
-- Same signature and body; only the function's plan_cache_mode.

CREATE OR REPLACE FUNCTION booking_check_user_overlap(
    p_user_id uuid, p_slot time_slots, p_exclude_appointment_id uuid
) RETURNS void
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    v_conflict uuid;
BEGIN
    SELECT a.id INTO v_conflict
    FROM appointments a
    WHERE a.user_id = p_user_id
      AND a.slot_end > p_slot.start_time
      AND a.slot_start < p_slot.end_time
      AND (a.status = 'CONFIRMED' OR (a.status = 'HOLD' AND a.expires_at > now()))
      AND a.id IS DISTINCT FROM p_exclude_appointment_id
    LIMIT 1;
    IF v_conflict IS NULL THEN
        SELECT a.id INTO v_conflict
        FROM appointments a
        JOIN time_slots s ON s.id = a.time_slot_id
        WHERE a.user_id = p_user_id
          AND a.slot_end IS NULL
          AND (a.status = 'CONFIRMED' OR (a.status = 'HOLD' AND a.expires_at > now()))
          AND s.start_time < p_slot.end_time
          AND s.end_time > p_slot.start_time
          AND a.id IS DISTINCT FROM p_exclude_appointment_id
        LIMIT 1;
    END IF;
    IF v_conflict IS NOT NULL THEN
        PERFORM booking_fail('USER_OVERLAP', jsonb_build_object(
            'user_id', p_user_id, 'conflicting_appointment_id', v_conflict));
    END IF;
END
$$;
