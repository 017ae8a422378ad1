-- depends: 0041.series-request-ids
--
-- ConfirmSeries and CancelSeries take a request id, with the semantics of
-- every other transition (storage/sql/requests.sql): copies get one answer,
-- the first copy's count or its refusal. New signatures, so versioned
-- names; the old functions go (no previous release had series).

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

DROP FUNCTION booking_confirm_series(uuid, uuid, uuid);
DROP FUNCTION booking_cancel_series(uuid, uuid, uuid, text, boolean);
