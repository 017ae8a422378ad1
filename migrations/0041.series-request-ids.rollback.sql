-- Undoes 0041.series-request-ids: series request ids back on the series rows
-- (the keys of series requests are moved back, then forgotten).

UPDATE appointment_series s SET fingerprint = k.fingerprint
FROM idempotency_keys k
WHERE k.operation = 'HoldSeries' AND k.result->>'series_id' = s.id::text;
-- A series whose key was already forgotten no longer replays (its id may
-- have been used again since).
UPDATE appointment_series SET request_id = NULL, fingerprint = coalesce(fingerprint, '')
WHERE fingerprint IS NULL;
DELETE FROM idempotency_keys WHERE operation = 'HoldSeries';
CREATE UNIQUE INDEX appointment_series_request
    ON appointment_series (created_by, request_id) WHERE request_id IS NOT NULL;

CREATE OR REPLACE FUNCTION booking_hold_series(
    p_first_slot_id uuid,
    p_user_id uuid,
    p_priority appointment_priority,
    p_actor_id uuid,
    p_hold_ttl interval,
    p_check_user_overlap boolean,
    p_request_id uuid,
    p_policy_exempt boolean,
    p_party_size integer,
    p_recurrence text,
    p_all_or_nothing boolean,
    p_starts timestamptz[]
) RETURNS appointment_series
LANGUAGE plpgsql AS $$
DECLARE
    v_operation constant text := 'HoldSeries';
    v_fingerprint text := md5(concat_ws('|', p_first_slot_id, p_user_id, p_priority,
        p_party_size, p_recurrence, p_all_or_nothing));
    v_series appointment_series;
    v_specialist_id uuid;
    v_slot_id uuid;
    v_event appointment_events;
    v_report jsonb := '[]'::jsonb;
    v_failed integer := 0;
    v_reason text;
    v_detail text;
BEGIN
    PERFORM booking_require_snapshot_isolation();
    IF p_request_id IS NOT NULL THEN
        SELECT * INTO v_series FROM appointment_series
        WHERE created_by = p_actor_id AND request_id = p_request_id;
        IF FOUND THEN
            IF v_series.fingerprint <> v_fingerprint THEN
                PERFORM booking_fail('REQUEST_ID_REUSED', jsonb_build_object(
                    'request_id', p_request_id, 'operation', v_operation));
            END IF;
            RETURN v_series;
        END IF;
    END IF;

    PERFORM booking_lock_user(p_user_id, p_check_user_overlap);
    SELECT specialist_id INTO v_specialist_id FROM time_slots
    WHERE id = p_first_slot_id AND deleted_at IS NULL;
    IF v_specialist_id IS NULL THEN
        PERFORM booking_fail('SLOT_NOT_FOUND', jsonb_build_object('id', p_first_slot_id));
    END IF;
    INSERT INTO appointment_series (
        id, user_id, specialist_id, recurrence, all_or_nothing, held, occurrences,
        created_by, request_id, fingerprint)
    VALUES (gen_random_uuid(), p_user_id, v_specialist_id, p_recurrence, p_all_or_nothing,
            true, '[]', p_actor_id, p_request_id, v_fingerprint)
    RETURNING * INTO v_series;

    BEGIN
        FOR i IN 1 .. cardinality(p_starts) LOOP
            SELECT id INTO v_slot_id FROM time_slots
            WHERE specialist_id = v_specialist_id AND start_time = p_starts[i]
              AND deleted_at IS NULL;
            IF v_slot_id IS NULL THEN
                v_failed := v_failed + 1;
                v_report := v_report || jsonb_build_object(
                    'start_time', p_starts[i], 'reason', 'NO_SLOT', 'detail', '{}'::jsonb);
                CONTINUE;
            END IF;
            BEGIN
                v_event := booking_take_seats(
                    p_slot_id => v_slot_id, p_user_id => p_user_id, p_priority => p_priority,
                    p_actor_id => p_actor_id, p_hold_ttl => p_hold_ttl,
                    p_check_user_overlap => p_check_user_overlap,
                    p_policy_exempt => p_policy_exempt, p_party_size => p_party_size,
                    p_series_id => v_series.id);
                v_report := v_report || jsonb_build_object(
                    'start_time', p_starts[i], 'slot_id', v_slot_id,
                    'appointment_id', v_event.appointment_id);
            EXCEPTION WHEN SQLSTATE 'BK001' THEN
                GET STACKED DIAGNOSTICS v_reason = MESSAGE_TEXT, v_detail = PG_EXCEPTION_DETAIL;
                v_failed := v_failed + 1;
                v_report := v_report || jsonb_build_object(
                    'start_time', p_starts[i], 'slot_id', v_slot_id,
                    'reason', v_reason, 'detail', coalesce(v_detail, '{}')::jsonb);
            END;
        END LOOP;
        IF p_all_or_nothing AND v_failed > 0 THEN
            RAISE EXCEPTION USING ERRCODE = 'BK003', MESSAGE = 'series refused';
        END IF;
    EXCEPTION WHEN SQLSTATE 'BK003' THEN
        -- Every hold of the block is undone; the report keeps the reasons.
        v_report := (SELECT coalesce(jsonb_agg(o - 'appointment_id' ORDER BY n), '[]')
                     FROM jsonb_array_elements(v_report) WITH ORDINALITY AS r (o, n));
        UPDATE appointment_series SET held = false WHERE id = v_series.id;
    END;

    UPDATE appointment_series SET occurrences = v_report WHERE id = v_series.id
    RETURNING * INTO v_series;
    RETURN v_series;
END
$$;

DROP FUNCTION booking_series_request_params(
    uuid, uuid, appointment_priority, integer, text, boolean);
ALTER TABLE appointment_series ALTER COLUMN fingerprint SET NOT NULL;
