-- depends: 0006.email-key
--
-- The transitions as a source tree (storage/sql/): no change for clients.
--
-- * One release point: booking_release_slot frees a slot for cancel,
--   reschedule, the expiry of a hold (sweeper and reclaim) and DeleteSlot,
--   which is now a function too and expires a lapsed hold instead of
--   refusing it.
-- * The request-id prologue and epilogue are written once
--   (booking_begin_request, booking_finish_request); fingerprints are
--   computed exactly as before, so keys stored earlier still replay.
-- * A missing resource's detail key is 'id', the field of the domain error.
--
-- Public functions keep their signatures, so the previous release keeps
-- working against this schema.

CREATE FUNCTION booking_request_actor(p_actor_id uuid) RETURNS uuid
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN coalesce(p_actor_id, '00000000-0000-0000-0000-000000000000'::uuid);

CREATE FUNCTION booking_begin_request(
    p_operation text, p_actor_id uuid, p_request_id uuid, VARIADIC p_params text[]
) RETURNS appointment_events
LANGUAGE plpgsql AS $$
DECLARE
    v_actor uuid := booking_request_actor(p_actor_id);
    v_fingerprint text := md5(concat_ws('|', VARIADIC p_params));
    v_key idempotency_keys;
    v_event appointment_events;
BEGIN
    PERFORM booking_require_snapshot_isolation();
    IF p_request_id IS NULL THEN
        RETURN NULL;
    END IF;
    SELECT * INTO v_key FROM idempotency_keys
    WHERE actor_id = v_actor AND request_id = p_request_id;
    IF NOT FOUND THEN
        PERFORM set_config('booking.request_key', jsonb_build_object(
            'actor_id', v_actor, 'request_id', p_request_id,
            'operation', p_operation, 'fingerprint', v_fingerprint)::text, true);
        RETURN NULL;
    END IF;
    IF v_key.operation <> p_operation OR v_key.fingerprint <> v_fingerprint THEN
        PERFORM booking_fail('REQUEST_ID_REUSED', jsonb_build_object(
            'request_id', p_request_id, 'operation', v_key.operation));
    END IF;
    IF v_key.event_id IS NULL THEN
        PERFORM booking_fail(v_key.error_reason, v_key.error_detail);
    END IF;
    SELECT * INTO v_event FROM appointment_events WHERE id = v_key.event_id;
    RETURN v_event;
END
$$;

CREATE FUNCTION booking_finish_request(p_event appointment_events)
RETURNS appointment_events
LANGUAGE plpgsql AS $$
DECLARE
    v_key jsonb := nullif(current_setting('booking.request_key', true), '')::jsonb;
BEGIN
    IF v_key IS NOT NULL THEN
        INSERT INTO idempotency_keys (actor_id, request_id, operation, fingerprint, event_id)
        VALUES ((v_key->>'actor_id')::uuid, (v_key->>'request_id')::uuid,
                v_key->>'operation', v_key->>'fingerprint', p_event.id);
    END IF;
    RETURN p_event;
END
$$;

CREATE FUNCTION booking_release_slot(p_slot_id uuid) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE time_slots SET status = 'AVAILABLE' WHERE id = p_slot_id;
END
$$;

CREATE FUNCTION booking_reclaim_slot(p_slot time_slots) RETURNS time_slots
LANGUAGE plpgsql AS $$
DECLARE
    v_holder appointments;
    v_slot time_slots;
BEGIN
    IF p_slot.status <> 'HOLD' THEN
        RETURN p_slot;
    END IF;
    SELECT * INTO v_holder FROM appointments
    WHERE time_slot_id = p_slot.id AND status = 'HOLD'
    FOR UPDATE;
    IF v_holder.id IS NULL OR v_holder.expires_at > now() THEN
        RETURN p_slot;
    END IF;
    PERFORM booking_expire_hold(v_holder);
    SELECT * INTO v_slot FROM time_slots WHERE id = p_slot.id;
    RETURN v_slot;
END
$$;

CREATE FUNCTION booking_delete_slot(p_slot_id uuid) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_slot time_slots;
BEGIN
    PERFORM booking_require_snapshot_isolation();
    SELECT * INTO v_slot FROM time_slots
    WHERE id = p_slot_id AND deleted_at IS NULL
    FOR UPDATE;
    IF v_slot.id IS NULL THEN
        PERFORM booking_fail('SLOT_NOT_FOUND', jsonb_build_object('id', p_slot_id));
    END IF;
    v_slot := booking_reclaim_slot(v_slot);
    IF v_slot.status <> 'AVAILABLE' THEN
        PERFORM booking_fail('SLOT_NOT_AVAILABLE', jsonb_build_object(
            'slot_id', p_slot_id, 'status', v_slot.status));
    END IF;
    UPDATE time_slots SET deleted_at = now() WHERE id = p_slot_id;
END
$$;

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
        PERFORM booking_fail('USER_NOT_FOUND', jsonb_build_object('id', p_user_id));
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
        PERFORM booking_fail('APPOINTMENT_NOT_FOUND', jsonb_build_object('id', p_id));
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
    v_event appointment_events;
BEGIN
    UPDATE appointments
    SET status = 'CANCELLED', expires_at = NULL, updated_at = now()
    WHERE id = p_appointment.id
    RETURNING * INTO v_appt;
    v_event := booking_emit_event(v_appt, 'HOLD_EXPIRED', 'HOLD', NULL, NULL, NULL);
    PERFORM booking_release_slot(v_appt.time_slot_id);
    RETURN v_event;
END
$$;

CREATE OR REPLACE FUNCTION booking_claim_slot(p_slot time_slots) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_slot time_slots;
BEGIN
    IF NOT (SELECT is_active FROM specialists WHERE id = p_slot.specialist_id) THEN
        PERFORM booking_fail('SPECIALIST_INACTIVE', jsonb_build_object(
            'specialist_id', p_slot.specialist_id));
    END IF;
    v_slot := booking_reclaim_slot(p_slot);
    IF v_slot.status <> 'AVAILABLE' THEN
        PERFORM booking_fail('SLOT_UNAVAILABLE', jsonb_build_object(
            'slot_id', v_slot.id, 'status', v_slot.status));
    END IF;
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

CREATE OR REPLACE FUNCTION booking_confirm(
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
    UPDATE time_slots SET status = 'BOOKED' WHERE id = v_appt.time_slot_id;

    v_event := booking_emit_event(v_appt, 'CONFIRMED', 'HOLD', p_actor_id, NULL, NULL);
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

CREATE OR REPLACE FUNCTION booking_mark_no_show(
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

-- booking_replay and booking_remember are no longer called by this
-- release's functions, but stay until the next release's contract step: a
-- statement that compiled a transition before this migration may still be
-- running (docs/upgrades.md).

-- Failures remembered before this migration name a missing resource's id
-- under the old keys.
UPDATE idempotency_keys
SET error_detail = jsonb_build_object('id', coalesce(
    error_detail->'slot_id', error_detail->'appointment_id', error_detail->'user_id'))
WHERE error_reason IN ('SLOT_NOT_FOUND', 'APPOINTMENT_NOT_FOUND', 'USER_NOT_FOUND')
  AND NOT error_detail ? 'id';
