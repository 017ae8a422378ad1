-- depends: 0021.buffers
--
-- Recurring series (storage/sql/series.sql, docs/seats.md): the series
-- table, appointments.series_id, the hold of one occurrence split out of
-- booking_hold_slot_v3 (booking_take_seats, so a series checks each
-- occurrence exactly as a single hold), and the series functions.
--
-- Expand only: a new table, a nullable column, new functions, and a body
-- of the same signature.

-- The previous release's transactions take these tables' locks in more
-- than one order (a hold: slot, then appointment; a cancel: appointment,
-- then slot), so ALTERs taking them one by one could close a cycle with
-- one of them. Instead every lock this migration needs is taken first, all
-- at once or none: an attempt that has not got them all within 50 ms gives
-- back what it got and tries again, so nothing waits on it for long and no
-- cycle lasts.
DO $$
BEGIN
    FOR i IN 1 .. 1200 LOOP
        BEGIN
            PERFORM set_config('lock_timeout', '50ms', true);
            LOCK TABLE users, specialists, appointments IN ACCESS EXCLUSIVE MODE;
            PERFORM set_config('lock_timeout', '0', true);
            RETURN;
        EXCEPTION WHEN lock_not_available THEN
            PERFORM pg_sleep(0.01 * random());
        END;
    END LOOP;
    RAISE EXCEPTION 'could not lock users, specialists, appointments for the migration';
END
$$;

ALTER TABLE appointments ADD COLUMN series_id uuid;

CREATE TABLE appointment_series (
    id              uuid PRIMARY KEY,
    user_id         uuid NOT NULL REFERENCES users (id),
    specialist_id   uuid NOT NULL REFERENCES specialists (id),
    recurrence      text NOT NULL,
    all_or_nothing  boolean NOT NULL,
    -- Whether the occurrences were held (all or nothing refused: false).
    held            boolean NOT NULL,
    -- One object per occurrence, in time order: start_time, slot_id (when
    -- there is a slot), appointment_id (when held), reason and detail (when
    -- refused).
    occurrences     jsonb NOT NULL,
    created_by      uuid NOT NULL,
    request_id      uuid,
    fingerprint     text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX appointment_series_request
    ON appointment_series (created_by, request_id) WHERE request_id IS NOT NULL;
CREATE INDEX appointment_series_user ON appointment_series (user_id, created_at);

ALTER TABLE appointments ADD CONSTRAINT appointments_series_fkey
    FOREIGN KEY (series_id) REFERENCES appointment_series (id);
CREATE INDEX appointments_series ON appointments (series_id) WHERE series_id IS NOT NULL;


CREATE FUNCTION booking_take_seats(
    p_slot_id uuid,
    p_user_id uuid,
    p_priority appointment_priority,
    p_actor_id uuid,
    p_hold_ttl interval,
    p_check_user_overlap boolean,
    p_policy_exempt boolean,
    p_party_size integer,
    p_series_id uuid
) RETURNS appointment_events
LANGUAGE plpgsql AS $$
DECLARE
    v_slot time_slots;
    v_appt appointments;
BEGIN
    -- Waits for a concurrent request changing the slot. If it commits a
    -- change, this statement fails with 40001 and the retry sees the seats
    -- it took (a true refusal when none is left); if it rolls back, this
    -- request goes on and may win the seat.
    SELECT * INTO v_slot FROM time_slots
    WHERE id = p_slot_id AND deleted_at IS NULL
    FOR UPDATE;
    IF v_slot.id IS NULL THEN
        PERFORM booking_fail('SLOT_NOT_FOUND', jsonb_build_object('id', p_slot_id));
    END IF;
    IF NOT p_policy_exempt THEN
        PERFORM booking_check_hold_window(v_slot);
    END IF;
    PERFORM booking_claim_seats(v_slot, p_party_size);
    IF p_check_user_overlap THEN
        PERFORM booking_check_user_overlap(p_user_id, v_slot, NULL);
    END IF;
    PERFORM booking_check_buffers(v_slot, NULL);

    -- The seats are counted, and the slot's status set, by the trigger on
    -- appointments (seats.sql).
    INSERT INTO appointments (
        id, user_id, specialist_id, time_slot_id, status, priority, expires_at, party_size,
        series_id)
    VALUES (gen_random_uuid(), p_user_id, v_slot.specialist_id, p_slot_id, 'HOLD',
            p_priority, now() + p_hold_ttl, p_party_size, p_series_id)
    RETURNING * INTO v_appt;

    RETURN booking_emit_event(v_appt, 'HELD', NULL, p_actor_id, NULL, NULL);
END
$$;

CREATE FUNCTION booking_hold_series(
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

CREATE FUNCTION booking_series_appointments(
    p_series_id uuid, p_owner_id uuid, p_statuses appointment_status[]
) RETURNS SETOF uuid
LANGUAGE plpgsql AS $$
DECLARE
    v_series appointment_series;
BEGIN
    PERFORM booking_require_snapshot_isolation();
    SELECT * INTO v_series FROM appointment_series WHERE id = p_series_id;
    IF v_series.id IS NULL OR (p_owner_id IS NOT NULL AND v_series.user_id <> p_owner_id) THEN
        PERFORM booking_fail('SERIES_NOT_FOUND', jsonb_build_object('id', p_series_id));
    END IF;
    RETURN QUERY
        SELECT a.id FROM appointments a JOIN time_slots s ON s.id = a.time_slot_id
        WHERE a.series_id = p_series_id AND a.status = ANY (p_statuses)
        ORDER BY s.start_time, a.id;
END
$$;

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

CREATE OR REPLACE FUNCTION booking_hold_slot_v3(
    p_slot_id uuid,
    p_user_id uuid,
    p_priority appointment_priority,
    p_actor_id uuid,
    p_hold_ttl interval,
    p_check_user_overlap boolean,
    p_request_id uuid,
    p_policy_exempt boolean,
    p_party_size integer
) RETURNS appointment_events
LANGUAGE plpgsql AS $$
DECLARE
    v_event appointment_events;
BEGIN
    v_event := booking_begin_request('HoldSlot', p_actor_id, p_request_id,
        p_slot_id::text, p_user_id::text, p_priority::text, p_actor_id::text,
        CASE WHEN p_party_size <> 1 THEN 'party=' || p_party_size END);
    IF v_event.id IS NOT NULL THEN
        RETURN v_event;
    END IF;

    PERFORM booking_lock_user(p_user_id, p_check_user_overlap);
    v_event := booking_take_seats(
        p_slot_id => p_slot_id, p_user_id => p_user_id, p_priority => p_priority,
        p_actor_id => p_actor_id, p_hold_ttl => p_hold_ttl,
        p_check_user_overlap => p_check_user_overlap, p_policy_exempt => p_policy_exempt,
        p_party_size => p_party_size, p_series_id => NULL);
    RETURN booking_finish_request(v_event);
END
$$;

