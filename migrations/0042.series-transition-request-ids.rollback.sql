-- Undoes 0042.series-transition-request-ids: series transitions without
-- request ids (their keys are forgotten).

CREATE FUNCTION booking_confirm_series(p_series_id uuid, p_owner_id uuid, p_actor_id uuid)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_id uuid;
    v_count integer := 0;
BEGIN
    FOR v_id IN SELECT * FROM booking_series_appointments(p_series_id, p_owner_id, '{HOLD}') LOOP
        PERFORM booking_confirm(v_id, p_owner_id, p_actor_id, NULL);
        v_count := v_count + 1;
    END LOOP;
    RETURN v_count;
END
$$;

CREATE FUNCTION booking_cancel_series(
    p_series_id uuid, p_owner_id uuid, p_actor_id uuid, p_reason text, p_policy_exempt boolean
) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_id uuid;
    v_count integer := 0;
BEGIN
    FOR v_id IN
        SELECT * FROM booking_series_appointments(p_series_id, p_owner_id, '{HOLD,CONFIRMED}')
    LOOP
        PERFORM booking_cancel_v2(v_id, p_owner_id, p_actor_id, p_reason, NULL, p_policy_exempt);
        v_count := v_count + 1;
    END LOOP;
    RETURN v_count;
END
$$;

DROP FUNCTION booking_confirm_series_v2(uuid, uuid, uuid, uuid);
DROP FUNCTION booking_cancel_series_v2(uuid, uuid, uuid, text, boolean, uuid);
DELETE FROM idempotency_keys WHERE operation IN ('ConfirmSeries', 'CancelSeries');
