-- Back to 0012: one seat per slot, the unique index again. Fails (as it
-- should) while any slot has more than one live appointment.

CREATE OR REPLACE FUNCTION booking_release_slot(p_slot_id uuid) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE time_slots SET status = 'AVAILABLE' WHERE id = p_slot_id;
    PERFORM booking_offer_slot(p_slot_id);
END
$$;

CREATE OR REPLACE FUNCTION booking_reclaim_slot(p_slot time_slots) RETURNS time_slots
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

CREATE OR REPLACE FUNCTION booking_delete_slot(p_slot_id uuid) RETURNS void
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

CREATE OR REPLACE FUNCTION booking_hold_slot_v2(
    p_slot_id uuid,
    p_user_id uuid,
    p_priority appointment_priority,
    p_actor_id uuid,
    p_hold_ttl interval,
    p_check_user_overlap boolean,
    p_request_id uuid,
    p_policy_exempt boolean
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
    IF NOT p_policy_exempt THEN
        PERFORM booking_check_hold_window(v_slot);
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

CREATE OR REPLACE FUNCTION booking_offer_slot(p_slot_id uuid) RETURNS appointment_events
LANGUAGE plpgsql AS $$
DECLARE
    v_slot time_slots;
    v_entry waitlist_entries;
    v_appt appointments;
BEGIN
    SELECT * INTO v_slot FROM time_slots WHERE id = p_slot_id AND status = 'AVAILABLE';
    IF v_slot.id IS NULL THEN
        RETURN NULL;
    END IF;
    v_entry := booking_waitlist_claimant(v_slot, true);
    IF v_entry.id IS NULL THEN
        RETURN NULL;
    END IF;

    UPDATE time_slots SET status = 'HOLD' WHERE id = p_slot_id;
    INSERT INTO appointments (id, user_id, specialist_id, time_slot_id, status, priority, expires_at)
    VALUES (gen_random_uuid(), v_entry.user_id, v_slot.specialist_id, p_slot_id, 'HOLD',
            v_entry.priority, now() + v_entry.offer_ttl)
    RETURNING * INTO v_appt;
    UPDATE waitlist_entries
    SET status = 'OFFERED', appointment_id = v_appt.id, updated_at = now()
    WHERE id = v_entry.id;

    -- The server makes the offer (no actor). Readers find the entry of a
    -- HELD event through waitlist_entries.appointment_id (storage/events.py).
    RETURN booking_emit_event(v_appt, 'HELD', NULL, NULL, NULL, NULL);
END
$$;

CREATE OR REPLACE FUNCTION booking_slot_is_free(p_slot time_slots) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    IF p_slot.deleted_at IS NOT NULL OR p_slot.status = 'BOOKED' THEN
        RETURN false;
    END IF;
    IF p_slot.status = 'AVAILABLE' THEN
        RETURN true;
    END IF;
    IF EXISTS (SELECT 1 FROM appointments
               WHERE time_slot_id = p_slot.id AND status = 'HOLD' AND expires_at > now()) THEN
        RETURN false;
    END IF;
    RETURN (booking_waitlist_claimant(p_slot, false)).id IS NULL;
END
$$;

DROP FUNCTION booking_hold_slot_v3(uuid, uuid, appointment_priority, uuid, interval, boolean, uuid, boolean, integer);
DROP FUNCTION booking_insert_slots_v2(uuid[], timestamptz[], timestamptz[], integer[]);
DROP TRIGGER appointments_seats ON appointments;
DROP TRIGGER time_slots_status ON time_slots;
DROP FUNCTION booking_set_slot_capacity(uuid, integer);
DROP FUNCTION booking_claim_seats(time_slots, integer);
DROP FUNCTION booking_appointment_seats();
DROP FUNCTION booking_slot_status();
CREATE UNIQUE INDEX appointments_one_live_per_slot
    ON appointments (time_slot_id) WHERE status <> 'CANCELLED';
DROP INDEX appointments_live_by_slot;
ALTER TABLE time_slots DROP CONSTRAINT time_slots_seats;
ALTER TABLE appointments DROP COLUMN party_size;
ALTER TABLE time_slots DROP COLUMN seats_held, DROP COLUMN seats_taken, DROP COLUMN capacity;
