-- Appointment transitions as server-side functions, so each one is a single
-- round trip: one statement, one implicit transaction, run by storage/ under
-- REPEATABLE READ. Every transition writes exactly one event row for the
-- appointment it changes, in the same transaction, and is idempotent by
-- request id (requests.sql). storage/functions.py is the one place that
-- calls them, with named arguments.
--
-- A previous release may call these during a rolling upgrade: a change of
-- signature gets a new, versioned name and leaves the old function working
-- (docs/upgrades.md; the old names are in contract.sql).

-- p_policy_exempt: the caller is not bound by the booking policies
-- (policies.sql); service/policy.py decides who is. p_party_size seats of
-- the slot are taken, all or none (seats.sql); a party of 1 has the
-- request fingerprint of booking_hold_slot_v2, its previous form.
CREATE FUNCTION booking_hold_slot_v3(
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

-- The hold itself, once the request is known to be new and the user is
-- locked: every check of a single HoldSlot, then the appointment (of the
-- series p_series_id, if any, series.sql) and its HELD event.
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

CREATE FUNCTION booking_confirm(
    p_id uuid, p_owner_id uuid, p_actor_id uuid, p_request_id uuid
) RETURNS appointment_events
LANGUAGE plpgsql AS $$
DECLARE
    v_event appointment_events;
    v_appt appointments;
BEGIN
    v_event := booking_begin_request('ConfirmAppointment', p_actor_id, p_request_id,
        p_id::text, p_owner_id::text, p_actor_id::text);
    IF v_event.id IS NOT NULL THEN
        RETURN v_event;
    END IF;

    v_appt := booking_lock_appointment(p_id, p_owner_id);
    IF v_appt.status <> 'HOLD' THEN
        PERFORM booking_wrong_state(v_appt, 'confirm');
    END IF;
    IF v_appt.expires_at <= now() THEN
        PERFORM booking_fail('HOLD_EXPIRED', jsonb_build_object(
            'appointment_id', p_id, 'expire_time', v_appt.expires_at));
    END IF;

    UPDATE appointments SET status = 'CONFIRMED', expires_at = NULL, updated_at = now()
    WHERE id = p_id RETURNING * INTO v_appt;

    v_event := booking_emit_event(v_appt, 'CONFIRMED', 'HOLD', p_actor_id, NULL, NULL);
    RETURN booking_finish_request(v_event);
END
$$;

CREATE FUNCTION booking_cancel_v2(
    p_id uuid, p_owner_id uuid, p_actor_id uuid, p_reason text, p_request_id uuid,
    p_policy_exempt boolean
) RETURNS appointment_events
LANGUAGE plpgsql AS $$
DECLARE
    v_event appointment_events;
    v_appt appointments;
    v_old appointment_status;
BEGIN
    v_event := booking_begin_request('CancelAppointment', p_actor_id, p_request_id,
        p_id::text, p_owner_id::text, p_actor_id::text, p_reason);
    IF v_event.id IS NOT NULL THEN
        RETURN v_event;
    END IF;

    v_appt := booking_lock_appointment(p_id, p_owner_id);
    v_old := v_appt.status;
    IF v_old NOT IN ('HOLD', 'CONFIRMED') THEN
        PERFORM booking_wrong_state(v_appt, 'cancel');
    END IF;
    IF NOT p_policy_exempt THEN
        PERFORM booking_check_cancel_window(v_appt, 'cancel');
    END IF;

    UPDATE appointments SET status = 'CANCELLED', expires_at = NULL, updated_at = now()
    WHERE id = p_id RETURNING * INTO v_appt;
    v_event := booking_emit_event(v_appt, 'CANCELLED', v_old, p_actor_id, p_reason, NULL);
    PERFORM booking_release_slot(v_appt.time_slot_id);
    RETURN booking_finish_request(v_event);
END
$$;

CREATE FUNCTION booking_mark_no_show(
    p_id uuid, p_actor_id uuid, p_request_id uuid
) RETURNS appointment_events
LANGUAGE plpgsql AS $$
DECLARE
    v_event appointment_events;
    v_appt appointments;
    v_start timestamptz;
BEGIN
    v_event := booking_begin_request('MarkNoShow', p_actor_id, p_request_id,
        p_id::text, p_actor_id::text);
    IF v_event.id IS NOT NULL THEN
        RETURN v_event;
    END IF;

    v_appt := booking_lock_appointment(p_id, NULL);
    IF v_appt.status <> 'CONFIRMED' THEN
        PERFORM booking_wrong_state(v_appt, 'mark_no_show');
    END IF;
    SELECT start_time INTO v_start FROM time_slots WHERE id = v_appt.time_slot_id;
    IF v_start > now() THEN
        PERFORM booking_fail('SLOT_NOT_STARTED', jsonb_build_object(
            'appointment_id', p_id, 'start_time', v_start));
    END IF;

    -- The slot stays BOOKED: the time was used up either way.
    UPDATE appointments SET status = 'NO_SHOW', updated_at = now()
    WHERE id = p_id RETURNING * INTO v_appt;

    v_event := booking_emit_event(v_appt, 'NO_SHOW', 'CONFIRMED', p_actor_id, NULL, NULL);
    RETURN booking_finish_request(v_event);
END
$$;

CREATE FUNCTION booking_reschedule_v2(
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
    PERFORM booking_check_buffers(v_new, p_id);

    -- The trigger on appointments moves the party's seats (seats.sql).
    UPDATE appointments SET time_slot_id = p_new_slot_id, updated_at = now()
    WHERE id = p_id RETURNING * INTO v_appt;

    v_event := booking_emit_event(
        v_appt, 'RESCHEDULED', v_appt.status, p_actor_id, NULL, v_old_slot_id);
    PERFORM booking_release_slot(v_old_slot_id);
    RETURN booking_finish_request(v_event);
END
$$;
