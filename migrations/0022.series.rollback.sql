-- Back to 0021: no series.

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
    v_slot time_slots;
    v_appt appointments;
BEGIN
    v_event := booking_begin_request('HoldSlot', p_actor_id, p_request_id,
        p_slot_id::text, p_user_id::text, p_priority::text, p_actor_id::text,
        CASE WHEN p_party_size <> 1 THEN 'party=' || p_party_size END);
    IF v_event.id IS NOT NULL THEN
        RETURN v_event;
    END IF;

    PERFORM booking_lock_user(p_user_id, p_check_user_overlap);

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
        id, user_id, specialist_id, time_slot_id, status, priority, expires_at, party_size)
    VALUES (gen_random_uuid(), p_user_id, v_slot.specialist_id, p_slot_id, 'HOLD',
            p_priority, now() + p_hold_ttl, p_party_size)
    RETURNING * INTO v_appt;

    v_event := booking_emit_event(v_appt, 'HELD', NULL, p_actor_id, NULL, NULL);
    RETURN booking_finish_request(v_event);
END
$$;

DROP FUNCTION booking_cancel_series(uuid, uuid, uuid, text, boolean);
DROP FUNCTION booking_confirm_series(uuid, uuid, uuid);
DROP FUNCTION booking_series_appointments(uuid, uuid, appointment_status[]);
DROP FUNCTION booking_hold_series(uuid, uuid, appointment_priority, uuid, interval, boolean, uuid, boolean, integer, text, boolean, timestamptz[]);
DROP FUNCTION booking_take_seats(uuid, uuid, appointment_priority, uuid, interval, boolean, boolean, integer, uuid);
DROP INDEX appointments_series;
ALTER TABLE appointments DROP CONSTRAINT appointments_series_fkey;
ALTER TABLE appointments DROP COLUMN series_id;
DROP TABLE appointment_series;
