-- Recurring series (docs/seats.md, "Recurring series"): one request holds
-- a slot for each occurrence of a recurrence, every one checked exactly as
-- a single HoldSlot is (booking_take_seats, transitions.sql). storage/
-- expands the recurrence in the specialist's zone (storage/recurrence.py)
-- and passes the instants; this finds the specialist's slot starting at
-- each and holds it, in one transaction:
--
--   all or nothing: any occurrence refused and none is held (the holds
--     already made are rolled back to a savepoint), the report says which
--     failed and why;
--   as many as possible: the refused ones are left out, same report.
--
-- Each occurrence is an ordinary appointment with its ordinary HELD event,
-- carrying series_id. A request id gives one series for every copy, by the
-- one request-id mechanism (requests.sql): the key's result is the series'
-- id, a copy answers with that series (its report included), and a failure
-- of the request is replayed as well (storage/series.py remembers it).

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
    -- The request id that created it, if any; its replay is the request's
    -- key (requests.sql), forgotten after the request-id retention.
    request_id      uuid,
    -- No longer written: the key holds the request's fingerprint. Left for
    -- a contract step (the previous release never had series).
    fingerprint     text,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX appointment_series_user ON appointment_series (user_id, created_at);

ALTER TABLE appointments ADD CONSTRAINT appointments_series_fkey
    FOREIGN KEY (series_id) REFERENCES appointment_series (id);
CREATE INDEX appointments_series ON appointments (series_id) WHERE series_id IS NOT NULL;

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

-- The series' appointments that a confirm or cancel of the whole series
-- acts on, locked in time order like the holds (the series must be the
-- caller's when p_owner_id is set; a foreign one looks missing).
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

-- A series transition runs single-appointment transitions, each of which
-- would store its own event under the request's key (booking_finish_request
-- reads it from the transaction): the series' key is set aside while they
-- run, and given back for a refusal (booking_fail names it) and for the
-- series' own result.

-- Confirms every occurrence still in HOLD, each as ConfirmAppointment does;
-- one that cannot be (a lapsed hold) refuses the whole call. Returns the
-- number confirmed. With a request id, every copy gets the first copy's
-- answer (requests.sql): that number, or its refusal.
CREATE FUNCTION booking_confirm_series_v2(
    p_series_id uuid, p_owner_id uuid, p_actor_id uuid, p_request_id uuid
) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_key idempotency_keys;
    v_request text;
    v_id uuid;
    v_count integer := 0;
    v_reason text;
    v_detail text;
BEGIN
    PERFORM booking_require_snapshot_isolation();
    IF p_request_id IS NOT NULL THEN
        v_key := booking_request_outcome('ConfirmSeries', p_actor_id, p_request_id,
            p_series_id::text, coalesce(p_owner_id::text, ''), coalesce(p_actor_id::text, ''));
        IF v_key.result IS NOT NULL THEN
            RETURN (v_key.result->>'count')::integer;
        END IF;
        v_request := current_setting('booking.request_key', true);
        PERFORM set_config('booking.request_key', '', true);
    END IF;
    BEGIN
        FOR v_id IN
            SELECT * FROM booking_series_appointments(p_series_id, p_owner_id, '{HOLD}')
        LOOP
            PERFORM booking_confirm(v_id, p_owner_id, p_actor_id, NULL);
            v_count := v_count + 1;
        END LOOP;
    EXCEPTION WHEN SQLSTATE 'BK001' THEN
        GET STACKED DIAGNOSTICS v_reason = MESSAGE_TEXT, v_detail = PG_EXCEPTION_DETAIL;
        PERFORM set_config('booking.request_key', coalesce(v_request, ''), true);
        PERFORM booking_fail(v_reason, coalesce(v_detail, '{}')::jsonb);
    END;
    IF p_request_id IS NOT NULL THEN
        PERFORM set_config('booking.request_key', coalesce(v_request, ''), true);
        PERFORM booking_finish_request_result(jsonb_build_object(
            'series_id', p_series_id, 'count', v_count));
    END IF;
    RETURN v_count;
END
$$;

-- Cancels every live occurrence, each as CancelAppointment does (policies
-- included); one that cannot be refuses the whole call. Returns the number
-- cancelled; a request id as for booking_confirm_series_v2.
CREATE FUNCTION booking_cancel_series_v2(
    p_series_id uuid, p_owner_id uuid, p_actor_id uuid, p_reason text, p_policy_exempt boolean,
    p_request_id uuid
) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_key idempotency_keys;
    v_request text;
    v_id uuid;
    v_count integer := 0;
    v_reason text;
    v_detail text;
BEGIN
    PERFORM booking_require_snapshot_isolation();
    IF p_request_id IS NOT NULL THEN
        v_key := booking_request_outcome('CancelSeries', p_actor_id, p_request_id,
            p_series_id::text, coalesce(p_owner_id::text, ''), coalesce(p_actor_id::text, ''),
            coalesce(p_reason, ''));
        IF v_key.result IS NOT NULL THEN
            RETURN (v_key.result->>'count')::integer;
        END IF;
        v_request := current_setting('booking.request_key', true);
        PERFORM set_config('booking.request_key', '', true);
    END IF;
    BEGIN
        FOR v_id IN
            SELECT * FROM booking_series_appointments(p_series_id, p_owner_id, '{HOLD,CONFIRMED}')
        LOOP
            PERFORM booking_cancel_v2(v_id, p_owner_id, p_actor_id, p_reason, NULL,
                                      p_policy_exempt);
            v_count := v_count + 1;
        END LOOP;
    EXCEPTION WHEN SQLSTATE 'BK001' THEN
        GET STACKED DIAGNOSTICS v_reason = MESSAGE_TEXT, v_detail = PG_EXCEPTION_DETAIL;
        PERFORM set_config('booking.request_key', coalesce(v_request, ''), true);
        PERFORM booking_fail(v_reason, coalesce(v_detail, '{}')::jsonb);
    END;
    IF p_request_id IS NOT NULL THEN
        PERFORM set_config('booking.request_key', coalesce(v_request, ''), true);
        PERFORM booking_finish_request_result(jsonb_build_object(
            'series_id', p_series_id, 'count', v_count));
    END IF;
    RETURN v_count;
END
$$;
