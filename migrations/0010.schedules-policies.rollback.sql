-- Back to 0009: no time zones, schedules or booking policies; the
-- transitions' old names get their own bodies back.

CREATE OR REPLACE FUNCTION booking_hold_slot(
    p_slot_id uuid,
    p_user_id uuid,
    p_priority appointment_priority,
    p_actor_id uuid,
    p_hold_ttl interval,
    p_check_user_overlap boolean,
    p_request_id uuid
) RETURNS appointment_events
LANGUAGE plpgsql AS $$
DECLARE
    v_event appointment_events;
    v_slot time_slots;
    v_appt appointments;
BEGIN
    v_event := booking_begin_request('HoldSlot', p_actor_id, p_request_id,
        p_slot_id::text, p_user_id::text, p_priority::text, p_actor_id::text);
    IF v_event.id IS NOT NULL THEN
        RETURN v_event;
    END IF;

    PERFORM booking_lock_user(p_user_id, p_check_user_overlap);

    -- Waits for a concurrent request changing the slot. If it commits a
    -- change, this statement fails with 40001 and the retry sees the slot
    -- taken (a true refusal); if it rolls back, this request goes on and
    -- may win the slot.
    SELECT * INTO v_slot FROM time_slots
    WHERE id = p_slot_id AND deleted_at IS NULL
    FOR UPDATE;
    IF v_slot.id IS NULL THEN
        PERFORM booking_fail('SLOT_NOT_FOUND', jsonb_build_object('id', p_slot_id));
    END IF;
    PERFORM booking_claim_slot(v_slot);
    IF p_check_user_overlap THEN
        PERFORM booking_check_user_overlap(p_user_id, v_slot, NULL);
    END IF;

    UPDATE time_slots SET status = 'HOLD' WHERE id = p_slot_id;
    INSERT INTO appointments (id, user_id, specialist_id, time_slot_id, status, priority, expires_at)
    VALUES (gen_random_uuid(), p_user_id, v_slot.specialist_id, p_slot_id, 'HOLD',
            p_priority, now() + p_hold_ttl)
    RETURNING * INTO v_appt;

    v_event := booking_emit_event(v_appt, 'HELD', NULL, p_actor_id, NULL, NULL);
    RETURN booking_finish_request(v_event);
END
$$;

CREATE OR REPLACE FUNCTION booking_cancel(
    p_id uuid, p_owner_id uuid, p_actor_id uuid, p_reason text, p_request_id uuid
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

    UPDATE appointments SET status = 'CANCELLED', expires_at = NULL, updated_at = now()
    WHERE id = p_id RETURNING * INTO v_appt;
    v_event := booking_emit_event(v_appt, 'CANCELLED', v_old, p_actor_id, p_reason, NULL);
    PERFORM booking_release_slot(v_appt.time_slot_id);
    RETURN booking_finish_request(v_event);
END
$$;

CREATE OR REPLACE FUNCTION booking_reschedule(
    p_id uuid,
    p_new_slot_id uuid,
    p_owner_id uuid,
    p_actor_id uuid,
    p_check_user_overlap boolean,
    p_request_id uuid
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
    PERFORM booking_claim_slot(v_new);
    IF p_check_user_overlap THEN
        PERFORM booking_check_user_overlap(v_appt.user_id, v_new, p_id);
    END IF;

    UPDATE time_slots
    SET status = CASE WHEN v_appt.status = 'HOLD' THEN 'HOLD' ELSE 'BOOKED' END::timeslot_status
    WHERE id = p_new_slot_id;
    UPDATE appointments SET time_slot_id = p_new_slot_id, updated_at = now()
    WHERE id = p_id RETURNING * INTO v_appt;

    v_event := booking_emit_event(
        v_appt, 'RESCHEDULED', v_appt.status, p_actor_id, NULL, v_old_slot_id);
    PERFORM booking_release_slot(v_old_slot_id);
    RETURN booking_finish_request(v_event);
END
$$;

DROP FUNCTION booking_policy_exempt_actor(uuid);
DROP FUNCTION booking_hold_slot_v2(
    uuid, uuid, appointment_priority, uuid, interval, boolean, uuid, boolean);
DROP FUNCTION booking_cancel_v2(uuid, uuid, uuid, text, uuid, boolean);
DROP FUNCTION booking_reschedule_v2(uuid, uuid, uuid, uuid, boolean, uuid, boolean);
DROP FUNCTION booking_check_cancel_window(appointments, text);
DROP FUNCTION booking_check_hold_window(time_slots);
CREATE OR REPLACE FUNCTION booking_may_hold(p_user_id uuid, p_slot time_slots) RETURNS boolean
LANGUAGE sql STABLE
RETURN true;
DROP FUNCTION booking_client_may_hold(time_slots);
DROP FUNCTION booking_hold_window(uuid);
DROP FUNCTION booking_policy(uuid);
DROP TABLE booking_policy_defaults;

DROP FUNCTION booking_forget_schedule_runs(interval, integer);
DROP TABLE schedule_runs;
DROP TABLE schedule_exceptions;
DROP TABLE schedule_rules;

ALTER TABLE specialists
    DROP CONSTRAINT specialists_policy_not_negative,
    DROP COLUMN cancellation_cutoff_hours,
    DROP COLUMN max_advance_days,
    DROP COLUMN min_notice_minutes,
    DROP COLUMN time_zone;
