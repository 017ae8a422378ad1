-- Back to 0002's functions and a key per request id. Remembered failures
-- are dropped, and where two callers used one request id only the older
-- key survives.

DROP FUNCTION booking_forget_request_ids(interval, integer);
DROP FUNCTION booking_remember_failure(jsonb, text, jsonb);

DROP FUNCTION booking_replay(uuid, uuid, text, text);
DROP FUNCTION booking_remember(uuid, uuid, text, text, appointment_events);

CREATE OR REPLACE FUNCTION booking_fail(p_reason text, p_detail jsonb) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION USING ERRCODE = 'BK001', MESSAGE = p_reason, DETAIL = p_detail::text;
END
$$;

CREATE OR REPLACE FUNCTION booking_replay(p_request_id uuid, p_operation text, p_fingerprint text)
RETURNS appointment_events
LANGUAGE plpgsql AS $$
DECLARE
    v_key idempotency_keys;
    v_event appointment_events;
BEGIN
    IF p_request_id IS NULL THEN
        RETURN NULL;
    END IF;
    SELECT * INTO v_key FROM idempotency_keys WHERE request_id = p_request_id;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF v_key.operation <> p_operation OR v_key.fingerprint <> p_fingerprint THEN
        PERFORM booking_fail('REQUEST_ID_REUSED', jsonb_build_object(
            'request_id', p_request_id, 'operation', v_key.operation));
    END IF;
    SELECT * INTO v_event FROM appointment_events WHERE id = v_key.event_id;
    RETURN v_event;
END
$$;

CREATE OR REPLACE FUNCTION booking_remember(
    p_request_id uuid, p_operation text, p_fingerprint text, p_event appointment_events
) RETURNS appointment_events
LANGUAGE plpgsql AS $$
BEGIN
    IF p_request_id IS NOT NULL THEN
        INSERT INTO idempotency_keys (request_id, operation, fingerprint, event_id)
        VALUES (p_request_id, p_operation, p_fingerprint, p_event.id);
    END IF;
    RETURN p_event;
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
    v_event := booking_replay(p_request_id, 'HoldSlot', v_fp);
    IF v_event.id IS NOT NULL THEN
        RETURN v_event;
    END IF;

    PERFORM booking_lock_user(p_user_id, p_check_user_overlap);

    -- NOWAIT: when another request holds this slot's lock, the slot is
    -- changing under it and is not AVAILABLE to us now. Failing at once
    -- (storage/ answers SLOT_UNAVAILABLE) spares a herd of callers queueing
    -- behind the winner only to fail with 40001 and retry.
    SELECT * INTO v_slot FROM time_slots
    WHERE id = p_slot_id AND deleted_at IS NULL
    FOR UPDATE NOWAIT;
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
    RETURN booking_remember(p_request_id, 'HoldSlot', v_fp, v_event);
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
    v_event := booking_replay(p_request_id, 'ConfirmAppointment', v_fp);
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
    RETURN booking_remember(p_request_id, 'ConfirmAppointment', v_fp, v_event);
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
    v_event := booking_replay(p_request_id, 'CancelAppointment', v_fp);
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
    RETURN booking_remember(p_request_id, 'CancelAppointment', v_fp, v_event);
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
    v_event := booking_replay(p_request_id, 'MarkNoShow', v_fp);
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
    RETURN booking_remember(p_request_id, 'MarkNoShow', v_fp, v_event);
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
    v_event := booking_replay(p_request_id, 'RescheduleAppointment', v_fp);
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
    RETURN booking_remember(p_request_id, 'RescheduleAppointment', v_fp, v_event);
END
$$;

DELETE FROM idempotency_keys WHERE event_id IS NULL;
DELETE FROM idempotency_keys k
USING idempotency_keys older
WHERE older.request_id = k.request_id
  AND (older.created_at, older.actor_id) < (k.created_at, k.actor_id);
DROP INDEX idempotency_keys_created;
ALTER TABLE idempotency_keys
    DROP CONSTRAINT idempotency_keys_one_outcome,
    DROP CONSTRAINT idempotency_keys_pkey,
    ADD CONSTRAINT idempotency_keys_pkey PRIMARY KEY (request_id),
    ALTER COLUMN event_id SET NOT NULL,
    DROP COLUMN error_detail,
    DROP COLUMN error_reason,
    DROP COLUMN actor_id;
