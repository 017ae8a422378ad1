-- Back to 0020: no buffers.

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

CREATE OR REPLACE FUNCTION booking_reschedule_v2(
    p_id uuid,
    p_new_slot_id uuid,
    p_owner_id uuid,
    p_actor_id uuid,
    p_check_user_overlap boolean,
    p_request_id uuid,
    p_policy_exempt boolean
) RETURNS appointment_events
LANGUAGE plpgsql AS $$
DECLARE
    v_event appointment_events;
    v_appt appointments;
    v_old_slot_id uuid;
    v_new time_slots;
BEGIN
    v_event := booking_begin_request('RescheduleAppointment', p_actor_id, p_request_id,
        p_id::text, p_new_slot_id::text, p_owner_id::text, p_actor_id::text);
    IF v_event.id IS NOT NULL THEN
        RETURN v_event;
    END IF;

    SELECT * INTO v_appt FROM appointments WHERE id = p_id;
    IF v_appt.id IS NULL OR (p_owner_id IS NOT NULL AND v_appt.user_id <> p_owner_id) THEN
        PERFORM booking_fail('APPOINTMENT_NOT_FOUND', jsonb_build_object('id', p_id));
    END IF;
    v_old_slot_id := v_appt.time_slot_id;
    IF p_new_slot_id = v_old_slot_id THEN
        PERFORM booking_fail('SAME_SLOT', jsonb_build_object(
            'appointment_id', p_id, 'slot_id', p_new_slot_id));
    END IF;

    PERFORM booking_lock_user(v_appt.user_id, p_check_user_overlap);
    PERFORM 1 FROM time_slots WHERE id IN (v_old_slot_id, p_new_slot_id) ORDER BY id FOR UPDATE;
    SELECT * INTO v_appt FROM appointments WHERE id = p_id FOR UPDATE;

    IF v_appt.status NOT IN ('HOLD', 'CONFIRMED') THEN
        PERFORM booking_wrong_state(v_appt, 'reschedule');
    END IF;
    IF v_appt.status = 'HOLD' AND v_appt.expires_at <= now() THEN
        PERFORM booking_fail('HOLD_EXPIRED', jsonb_build_object(
            'appointment_id', p_id, 'expire_time', v_appt.expires_at));
    END IF;

    SELECT * INTO v_new FROM time_slots WHERE id = p_new_slot_id AND deleted_at IS NULL;
    IF v_new.id IS NULL THEN
        PERFORM booking_fail('SLOT_NOT_FOUND', jsonb_build_object('id', p_new_slot_id));
    END IF;
    IF v_new.specialist_id <> v_appt.specialist_id THEN
        PERFORM booking_fail('SPECIALIST_MISMATCH', jsonb_build_object(
            'slot_id', p_new_slot_id, 'specialist_id', v_appt.specialist_id));
    END IF;
    IF NOT p_policy_exempt THEN
        PERFORM booking_check_cancel_window(v_appt, 'reschedule');
        PERFORM booking_check_hold_window(v_new);
    END IF;
    PERFORM booking_claim_seats(v_new, v_appt.party_size);
    IF p_check_user_overlap THEN
        PERFORM booking_check_user_overlap(v_appt.user_id, v_new, p_id);
    END IF;

    -- The trigger on appointments moves the party's seats (seats.sql).
    UPDATE appointments SET time_slot_id = p_new_slot_id, updated_at = now()
    WHERE id = p_id RETURNING * INTO v_appt;

    v_event := booking_emit_event(
        v_appt, 'RESCHEDULED', v_appt.status, p_actor_id, NULL, v_old_slot_id);
    PERFORM booking_release_slot(v_old_slot_id);
    RETURN booking_finish_request(v_event);
END
$$;

CREATE OR REPLACE FUNCTION booking_offer_slot(p_slot_id uuid) RETURNS appointment_events
LANGUAGE plpgsql AS $$
DECLARE
    v_slot time_slots;
    v_entry waitlist_entries;
    v_appt appointments;
    v_event appointment_events;
    v_first appointment_events;
BEGIN
    LOOP
        SELECT * INTO v_slot FROM time_slots WHERE id = p_slot_id AND status = 'AVAILABLE';
        EXIT WHEN v_slot.id IS NULL;
        v_entry := booking_waitlist_claimant(v_slot, true);
        EXIT WHEN v_entry.id IS NULL;

        -- The seat is counted, and the slot's status set, by the trigger on
        -- appointments (seats.sql).
        INSERT INTO appointments (
            id, user_id, specialist_id, time_slot_id, status, priority, expires_at)
        VALUES (gen_random_uuid(), v_entry.user_id, v_slot.specialist_id, p_slot_id, 'HOLD',
                v_entry.priority, now() + v_entry.offer_ttl)
        RETURNING * INTO v_appt;
        UPDATE waitlist_entries
        SET status = 'OFFERED', appointment_id = v_appt.id, updated_at = now()
        WHERE id = v_entry.id;

        -- The server makes the offer (no actor). Readers find the entry of a
        -- HELD event through waitlist_entries.appointment_id (storage/events.py).
        v_event := booking_emit_event(v_appt, 'HELD', NULL, NULL, NULL, NULL);
        IF v_first.id IS NULL THEN
            v_first := v_event;
        END IF;
    END LOOP;
    RETURN v_first;
END
$$;

DROP TRIGGER appointments_range ON appointments;
DROP FUNCTION booking_user_overlaps(uuid, time_slots);
DROP FUNCTION booking_check_buffers(time_slots, uuid);
DROP FUNCTION booking_slot_buffer_blocked(time_slots);
DROP FUNCTION booking_buffer_conflict(time_slots, uuid, boolean);
DROP FUNCTION booking_appointment_range();
DROP FUNCTION booking_buffer_range(time_slots);
ALTER TABLE appointments DROP CONSTRAINT appointments_buffers_apart;
ALTER TABLE appointments DROP COLUMN buffered_range;
ALTER TABLE specialists DROP CONSTRAINT specialists_buffers_range,
    DROP COLUMN buffer_after_minutes, DROP COLUMN buffer_before_minutes;
