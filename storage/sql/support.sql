-- Building blocks shared by the transitions.
--
-- Lock order, to keep deadlocks rare: user row, then slot rows (by id), then
-- appointment rows. Under REPEATABLE READ a row that another transaction
-- changed after our snapshot makes FOR UPDATE fail with 40001; storage/
-- retries, and the retry sees the new state. That is also why the user lock
-- is a real (no-op) UPDATE: a bare FOR UPDATE would not stop a concurrent
-- hold from the same user checking overlaps against a stale snapshot.
--
-- Business failures raise SQLSTATE BK001 with the reason as the message and
-- a JSON object of fields as the detail; the keys are the fields of the
-- domain error that storage/errors.py names for that reason (a test checks
-- every booking_fail call against it). A failure of a request that began
-- executing also carries the request's key in its HINT, so storage/ can
-- remember it (requests.sql).

CREATE FUNCTION booking_fail(p_reason text, p_detail jsonb) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION USING ERRCODE = 'BK001', MESSAGE = p_reason, DETAIL = p_detail::text,
        HINT = coalesce(current_setting('booking.request_key', true), '');
END
$$;

CREATE FUNCTION booking_require_snapshot_isolation() RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('transaction_isolation') NOT IN ('repeatable read', 'serializable') THEN
        RAISE EXCEPTION USING ERRCODE = 'BK002',
            MESSAGE = 'booking transitions need REPEATABLE READ or stronger, not '
                || current_setting('transaction_isolation');
    END IF;
END
$$;

CREATE FUNCTION booking_emit_event(
    p_appointment appointments,
    p_event_type text,
    p_old_status appointment_status,
    p_actor_id uuid,
    p_reason text,
    p_previous_slot_id uuid
) RETURNS appointment_events
LANGUAGE plpgsql AS $$
DECLARE
    v_event appointment_events;
BEGIN
    INSERT INTO appointment_events (
        id, appointment_id, event_type, old_status, new_status, time_slot_id,
        previous_slot_id, specialist_id, user_id, priority, start_time, end_time,
        expires_at, appointment_created_at, actor_id, reason)
    SELECT gen_random_uuid(), p_appointment.id, p_event_type, p_old_status,
        p_appointment.status, p_appointment.time_slot_id, p_previous_slot_id,
        p_appointment.specialist_id, p_appointment.user_id, p_appointment.priority,
        s.start_time, s.end_time, p_appointment.expires_at,
        p_appointment.created_at, p_actor_id, p_reason
    FROM time_slots s
    WHERE s.id = p_appointment.time_slot_id
    RETURNING * INTO v_event;
    RETURN v_event;
END
$$;

-- Checks the user can book, and when p_serialize locks it for the rest of
-- the transaction (see the header for why this is an UPDATE).
CREATE FUNCTION booking_lock_user(p_user_id uuid, p_serialize boolean) RETURNS users
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

-- The user's live appointments are found by the slot times kept on them
-- (appointments_user_slot_end: only those that end after the slot begins,
-- none of the user's past), then among the rows written before those
-- columns existed and not yet backfilled (slot_end IS NULL: an empty range
-- of the same index once `booking-service migrate backfill` is done).
-- Always the generic plans (three buffers per probe, with or without
-- history): left to choose, PL/pgSQL kept planning the probes afresh on a
-- database with a million past appointments, 0.15-0.6 ms per hold
-- (docs/performance.md, 2026-12-08).
CREATE FUNCTION booking_check_user_overlap(
    p_user_id uuid, p_slot time_slots, p_exclude_appointment_id uuid
) RETURNS void
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    v_conflict uuid;
BEGIN
    SELECT a.id INTO v_conflict
    FROM appointments a
    WHERE a.user_id = p_user_id
      AND a.slot_end > p_slot.start_time
      AND a.slot_start < p_slot.end_time
      AND (a.status = 'CONFIRMED' OR (a.status = 'HOLD' AND a.expires_at > now()))
      AND a.id IS DISTINCT FROM p_exclude_appointment_id
    LIMIT 1;
    IF v_conflict IS NULL THEN
        SELECT a.id INTO v_conflict
        FROM appointments a
        JOIN time_slots s ON s.id = a.time_slot_id
        WHERE a.user_id = p_user_id
          AND a.slot_end IS NULL
          AND (a.status = 'CONFIRMED' OR (a.status = 'HOLD' AND a.expires_at > now()))
          AND s.start_time < p_slot.end_time
          AND s.end_time > p_slot.start_time
          AND a.id IS DISTINCT FROM p_exclude_appointment_id
        LIMIT 1;
    END IF;
    IF v_conflict IS NOT NULL THEN
        PERFORM booking_fail('USER_OVERLAP', jsonb_build_object(
            'user_id', p_user_id, 'conflicting_appointment_id', v_conflict));
    END IF;
END
$$;

-- Whether the user has a live appointment overlapping the slot: the test
-- of booking_check_user_overlap, for a CLIENT's search.
CREATE FUNCTION booking_user_overlaps(p_user_id uuid, p_slot time_slots) RETURNS boolean
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN EXISTS (
        SELECT 1 FROM appointments a
        WHERE a.user_id = p_user_id
          AND a.slot_end > p_slot.start_time
          AND a.slot_start < p_slot.end_time
          AND (a.status = 'CONFIRMED' OR (a.status = 'HOLD' AND a.expires_at > now())))
    OR EXISTS (
        SELECT 1 FROM appointments a
        JOIN time_slots s ON s.id = a.time_slot_id
        WHERE a.user_id = p_user_id
          AND a.slot_end IS NULL
          AND (a.status = 'CONFIRMED' OR (a.status = 'HOLD' AND a.expires_at > now()))
          AND s.start_time < p_slot.end_time
          AND s.end_time > p_slot.start_time);
END
$$;

-- Finds an appointment the caller may touch, then locks its slot and the
-- appointment itself (in that order). p_owner_id NULL means any owner; a
-- foreign appointment looks exactly like a missing one.
CREATE FUNCTION booking_lock_appointment(p_id uuid, p_owner_id uuid) RETURNS appointments
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

CREATE FUNCTION booking_wrong_state(p_appt appointments, p_transition text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM booking_fail('WRONG_STATE', jsonb_build_object(
        'appointment_id', p_appt.id, 'status', p_appt.status, 'transition', p_transition));
END
$$;
