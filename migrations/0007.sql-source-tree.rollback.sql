-- Back to the functions of 0005 (and 0002, where 0005 kept them).

DROP FUNCTION booking_delete_slot(uuid);

CREATE OR REPLACE FUNCTION booking_lock_user(p_user_id uuid, p_serialize boolean) RETURNS users
LANGUAGE plpgsql AS $$
DECLARE
    v_user users;
BEGIN
    IF p_serialize THEN
        UPDATE users SET updated_at = updated_at WHERE id = p_user_id RETURNING * INTO v_user;
    ELSE
        SELECT * INTO v_user FROM users WHERE id = p_user_id;
    END IF;
    IF v_user.id IS NULL THEN
        PERFORM booking_fail('USER_NOT_FOUND', jsonb_build_object('user_id', p_user_id));
    END IF;
    IF NOT v_user.is_active THEN
        PERFORM booking_fail('USER_INACTIVE', jsonb_build_object('user_id', p_user_id));
    END IF;
    RETURN v_user;
END
$$;

CREATE OR REPLACE FUNCTION booking_lock_appointment(p_id uuid, p_owner_id uuid) RETURNS appointments
LANGUAGE plpgsql AS $$
DECLARE
    v_appt appointments;
BEGIN
    SELECT * INTO v_appt FROM appointments WHERE id = p_id;
    IF v_appt.id IS NULL OR (p_owner_id IS NOT NULL AND v_appt.user_id <> p_owner_id) THEN
        PERFORM booking_fail('APPOINTMENT_NOT_FOUND', jsonb_build_object('appointment_id', p_id));
    END IF;
    PERFORM 1 FROM time_slots WHERE id = v_appt.time_slot_id FOR UPDATE;
    SELECT * INTO v_appt FROM appointments WHERE id = p_id FOR UPDATE;
    RETURN v_appt;
END
$$;

CREATE OR REPLACE FUNCTION booking_expire_hold(p_appointment appointments) RETURNS appointment_events
LANGUAGE plpgsql AS $$
DECLARE
    v_appt appointments;
BEGIN
    UPDATE appointments
    SET status = 'CANCELLED', expires_at = NULL, updated_at = now()
    WHERE id = p_appointment.id
    RETURNING * INTO v_appt;
    RETURN booking_emit_event(v_appt, 'HOLD_EXPIRED', 'HOLD', NULL, NULL, NULL);
END
$$;

CREATE OR REPLACE FUNCTION booking_claim_slot(p_slot time_slots) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_holder appointments;
BEGIN
    IF NOT (SELECT is_active FROM specialists WHERE id = p_slot.specialist_id) THEN
        PERFORM booking_fail('SPECIALIST_INACTIVE', jsonb_build_object(
            'specialist_id', p_slot.specialist_id));
    END IF;
    IF p_slot.status = 'AVAILABLE' THEN
        RETURN;
    END IF;
    IF p_slot.status = 'HOLD' THEN
        SELECT * INTO v_holder FROM appointments
        WHERE time_slot_id = p_slot.id AND status = 'HOLD'
        FOR UPDATE;
        IF v_holder.id IS NOT NULL AND v_holder.expires_at <= now() THEN
            PERFORM booking_expire_hold(v_holder);
            RETURN;
        END IF;
    END IF;
    PERFORM booking_fail('SLOT_UNAVAILABLE', jsonb_build_object(
        'slot_id', p_slot.id, 'status', p_slot.status));
END
$$;

CREATE OR REPLACE FUNCTION booking_expire_holds(p_limit integer) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_appt appointments;
    v_count integer := 0;
BEGIN
    PERFORM booking_require_snapshot_isolation();
    FOR v_appt IN
        SELECT * FROM appointments
        WHERE status = 'HOLD' AND expires_at <= now()
        ORDER BY expires_at
        LIMIT p_limit
        FOR UPDATE SKIP LOCKED
    LOOP
        PERFORM 1 FROM time_slots WHERE id = v_appt.time_slot_id FOR UPDATE SKIP LOCKED;
        CONTINUE WHEN NOT FOUND;
        PERFORM booking_expire_hold(v_appt);
        UPDATE time_slots SET status = 'AVAILABLE' WHERE id = v_appt.time_slot_id;
        v_count := v_count + 1;
    END LOOP;
    RETURN v_count;
END
$$;

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
    v_fp text := md5(concat_ws('|', p_slot_id, p_user_id, p_priority, p_actor_id));
    v_event appointment_events;
    v_slot time_slots;
    v_appt appointments;
BEGIN
    PERFORM booking_require_snapshot_isolation();
    v_event := booking_replay(p_actor_id, p_request_id, 'HoldSlot', v_fp);
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
        PERFORM booking_fail('SLOT_NOT_FOUND', jsonb_build_object('slot_id', p_slot_id));
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
    RETURN booking_remember(p_actor_id, p_request_id, 'HoldSlot', v_fp, v_event);
END
$$;

CREATE OR REPLACE FUNCTION booking_confirm(
    p_id uuid, p_owner_id uuid, p_actor_id uuid, p_request_id uuid
) RETURNS appointment_events
LANGUAGE plpgsql AS $$
DECLARE
    v_fp text := md5(concat_ws('|', p_id, p_owner_id, p_actor_id));
    v_event appointment_events;
    v_appt appointments;
BEGIN
    PERFORM booking_require_snapshot_isolation();
    v_event := booking_replay(p_actor_id, p_request_id, 'ConfirmAppointment', v_fp);
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
    UPDATE time_slots SET status = 'BOOKED' WHERE id = v_appt.time_slot_id;

    v_event := booking_emit_event(v_appt, 'CONFIRMED', 'HOLD', p_actor_id, NULL, NULL);
    RETURN booking_remember(p_actor_id, p_request_id, 'ConfirmAppointment', v_fp, v_event);
END
$$;

CREATE OR REPLACE FUNCTION booking_cancel(
    p_id uuid, p_owner_id uuid, p_actor_id uuid, p_reason text, p_request_id uuid
) RETURNS appointment_events
LANGUAGE plpgsql AS $$
DECLARE
    v_fp text := md5(concat_ws('|', p_id, p_owner_id, p_actor_id, p_reason));
    v_event appointment_events;
    v_appt appointments;
    v_old appointment_status;
BEGIN
    PERFORM booking_require_snapshot_isolation();
    v_event := booking_replay(p_actor_id, p_request_id, 'CancelAppointment', v_fp);
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
    UPDATE time_slots SET status = 'AVAILABLE' WHERE id = v_appt.time_slot_id;

    v_event := booking_emit_event(v_appt, 'CANCELLED', v_old, p_actor_id, p_reason, NULL);
    RETURN booking_remember(p_actor_id, p_request_id, 'CancelAppointment', v_fp, v_event);
END
$$;

CREATE OR REPLACE FUNCTION booking_mark_no_show(
    p_id uuid, p_actor_id uuid, p_request_id uuid
) RETURNS appointment_events
LANGUAGE plpgsql AS $$
DECLARE
    v_fp text := md5(concat_ws('|', p_id, p_actor_id));
    v_event appointment_events;
    v_appt appointments;
    v_start timestamptz;
BEGIN
    PERFORM booking_require_snapshot_isolation();
    v_event := booking_replay(p_actor_id, p_request_id, 'MarkNoShow', v_fp);
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
    RETURN booking_remember(p_actor_id, p_request_id, 'MarkNoShow', v_fp, v_event);
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
    v_fp text := md5(concat_ws('|', p_id, p_new_slot_id, p_owner_id, p_actor_id));
    v_event appointment_events;
    v_appt appointments;
    v_old_slot_id uuid;
    v_new time_slots;
BEGIN
    PERFORM booking_require_snapshot_isolation();
    v_event := booking_replay(p_actor_id, p_request_id, 'RescheduleAppointment', v_fp);
    IF v_event.id IS NOT NULL THEN
        RETURN v_event;
    END IF;

    SELECT * INTO v_appt FROM appointments WHERE id = p_id;
    IF v_appt.id IS NULL OR (p_owner_id IS NOT NULL AND v_appt.user_id <> p_owner_id) THEN
        PERFORM booking_fail('APPOINTMENT_NOT_FOUND', jsonb_build_object('appointment_id', p_id));
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
        PERFORM booking_fail('SLOT_NOT_FOUND', jsonb_build_object('slot_id', p_new_slot_id));
    END IF;
    IF v_new.specialist_id <> v_appt.specialist_id THEN
        PERFORM booking_fail('SPECIALIST_MISMATCH', jsonb_build_object(
            'slot_id', p_new_slot_id, 'specialist_id', v_appt.specialist_id));
    END IF;
    PERFORM booking_claim_slot(v_new);
    IF p_check_user_overlap THEN
        PERFORM booking_check_user_overlap(v_appt.user_id, v_new, p_id);
    END IF;

    UPDATE time_slots SET status = 'AVAILABLE' WHERE id = v_old_slot_id;
    UPDATE time_slots
    SET status = CASE WHEN v_appt.status = 'HOLD' THEN 'HOLD' ELSE 'BOOKED' END::timeslot_status
    WHERE id = p_new_slot_id;
    UPDATE appointments SET time_slot_id = p_new_slot_id, updated_at = now()
    WHERE id = p_id RETURNING * INTO v_appt;

    v_event := booking_emit_event(
        v_appt, 'RESCHEDULED', v_appt.status, p_actor_id, NULL, v_old_slot_id);
    RETURN booking_remember(p_actor_id, p_request_id, 'RescheduleAppointment', v_fp, v_event);
END
$$;

DROP FUNCTION booking_reclaim_slot(time_slots);
DROP FUNCTION booking_release_slot(uuid);
DROP FUNCTION booking_finish_request(appointment_events);
DROP FUNCTION booking_begin_request(text, uuid, uuid, text[]);
DROP FUNCTION booking_request_actor(uuid);

UPDATE idempotency_keys
SET error_detail = jsonb_build_object(
    CASE error_reason WHEN 'SLOT_NOT_FOUND' THEN 'slot_id'
                      WHEN 'APPOINTMENT_NOT_FOUND' THEN 'appointment_id'
                      ELSE 'user_id' END,
    error_detail->'id')
WHERE error_reason IN ('SLOT_NOT_FOUND', 'APPOINTMENT_NOT_FOUND', 'USER_NOT_FOUND')
  AND error_detail ? 'id';
