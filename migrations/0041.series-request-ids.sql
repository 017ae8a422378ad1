-- depends: 0040.sync-barrier
--
-- Series on the one request-id mechanism (storage/sql/requests.sql): a
-- HoldSeries request id is a key in idempotency_keys, like every other
-- operation's, with the same replay (success and failure, behind the sync
-- barrier), the same per-caller scope and the same retention. The key's
-- result is the series' id. Existing series request ids become keys (their
-- fingerprints were already what booking_request_outcome computes from the
-- request's parameters), so they keep replaying; the unique index that held
-- them goes (no previous release used series). The columns stay: the
-- request id as a record, the fingerprint no longer written (nullable).
-- Same signature of booking_hold_series.

ALTER TABLE appointment_series ALTER COLUMN fingerprint DROP NOT NULL;

-- The parameters that identify a HoldSeries request (its fingerprint,
-- requests.sql), as text the way concat_ws writes them (a boolean is t or
-- f), which the series' own fingerprints were before the keys held them.
CREATE FUNCTION booking_series_request_params(
    p_first_slot_id uuid,
    p_user_id uuid,
    p_priority appointment_priority,
    p_party_size integer,
    p_recurrence text,
    p_all_or_nothing boolean
) RETURNS text[]
LANGUAGE sql STABLE PARALLEL SAFE
RETURN ARRAY[p_first_slot_id::text, p_user_id::text, p_priority::text, p_party_size::text,
             p_recurrence, concat(p_all_or_nothing)];

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
    v_key idempotency_keys;
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
        v_key := booking_request_outcome('HoldSeries', p_actor_id, p_request_id,
            VARIADIC booking_series_request_params(p_first_slot_id, p_user_id, p_priority,
                p_party_size, p_recurrence, p_all_or_nothing));
        IF v_key.result IS NOT NULL THEN
            SELECT * INTO v_series FROM appointment_series
            WHERE id = (v_key.result->>'series_id')::uuid;
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
        created_by, request_id)
    VALUES (gen_random_uuid(), p_user_id, v_specialist_id, p_recurrence, p_all_or_nothing,
            true, '[]', p_actor_id, p_request_id)
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
    -- A copy that stored first makes this fail on the key, and the retry
    -- replays its series.
    PERFORM booking_finish_request_result(jsonb_build_object('series_id', v_series.id));
    RETURN v_series;
END
$$;

INSERT INTO idempotency_keys (actor_id, request_id, operation, fingerprint, result, created_at)
SELECT booking_request_actor(created_by), request_id, 'HoldSeries', fingerprint,
       jsonb_build_object('series_id', id), created_at
FROM appointment_series WHERE request_id IS NOT NULL
ON CONFLICT (actor_id, request_id) DO NOTHING;

DROP INDEX appointment_series_request;
