-- depends: 0020.seats
--
-- Buffers (storage/sql/buffers.sql, docs/seats.md): a specialist's time
-- before and after each appointment (default 0), each live appointment's
-- buffered range set by a trigger, and the exclusion constraint
-- appointments_buffers_apart over those ranges. Live appointments get their
-- slot's range (every buffer is 0 until this commits), so the constraint
-- covers them too; with no buffers the ranges are slots, which never
-- overlap, so it refuses nothing that was allowed before.
--
-- Expand only: new columns with constant defaults or none (no rewrite),
-- new functions, and bodies of the same signatures. The index build and the
-- backfill hold appointments' lock until commit; the previous release's
-- writes wait for it and go on.

-- The previous release's transactions take these tables' locks in more
-- than one order (a hold: slot, then appointment; a cancel: appointment,
-- then slot), so ALTERs taking them one by one could close a cycle with
-- one of them. Instead every lock this migration needs is taken first, all
-- at once or none: an attempt that has not got them all within 50 ms gives
-- back what it got and tries again, so nothing waits on it for long and no
-- cycle lasts.
DO $$
BEGIN
    FOR i IN 1 .. 1200 LOOP
        BEGIN
            PERFORM set_config('lock_timeout', '50ms', true);
            LOCK TABLE specialists, appointments IN ACCESS EXCLUSIVE MODE;
            PERFORM set_config('lock_timeout', '0', true);
            RETURN;
        EXCEPTION WHEN lock_not_available THEN
            PERFORM pg_sleep(0.01 * random());
        END;
    END LOOP;
    RAISE EXCEPTION 'could not lock specialists, appointments for the migration';
END
$$;

ALTER TABLE specialists
    ADD COLUMN buffer_before_minutes integer NOT NULL DEFAULT 0,
    ADD COLUMN buffer_after_minutes integer NOT NULL DEFAULT 0,
    ADD CONSTRAINT specialists_buffers_range CHECK (
        buffer_before_minutes BETWEEN 0 AND 1440 AND buffer_after_minutes BETWEEN 0 AND 1440);
ALTER TABLE appointments ADD COLUMN buffered_range tstzrange;

UPDATE appointments a SET buffered_range = tstzrange(s.start_time, s.end_time, '[)')
FROM time_slots s
WHERE s.id = a.time_slot_id AND a.status <> 'CANCELLED';

ALTER TABLE appointments ADD CONSTRAINT appointments_buffers_apart EXCLUDE USING gist (
    specialist_id WITH =, buffered_range WITH &&, time_slot_id WITH <>
) WHERE (status <> 'CANCELLED');

CREATE FUNCTION booking_buffer_range(p_slot time_slots) RETURNS tstzrange
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_range tstzrange;
BEGIN
    SELECT tstzrange(p_slot.start_time - make_interval(mins => p.buffer_before_minutes),
                     p_slot.end_time + make_interval(mins => p.buffer_after_minutes), '[)')
    INTO v_range
    FROM specialists p WHERE p.id = p_slot.specialist_id;
    RETURN v_range;
END
$$;

CREATE FUNCTION booking_appointment_range() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    SELECT tstzrange(s.start_time - make_interval(mins => p.buffer_before_minutes),
                     s.end_time + make_interval(mins => p.buffer_after_minutes), '[)')
    INTO NEW.buffered_range
    FROM time_slots s JOIN specialists p ON p.id = s.specialist_id
    WHERE s.id = NEW.time_slot_id;
    RETURN NEW;
END
$$;

CREATE FUNCTION booking_buffer_conflict(
    p_slot time_slots, p_exclude_appointment_id uuid, p_lapsed boolean
) RETURNS appointments
LANGUAGE plpgsql STABLE AS $$
DECLARE
    -- Computed once, so the gist index gets a constant to search with.
    v_range tstzrange := booking_buffer_range(p_slot);
    v_conflict appointments;
BEGIN
    SELECT a.* INTO v_conflict FROM appointments a
    WHERE a.specialist_id = p_slot.specialist_id
      AND a.status <> 'CANCELLED'
      AND a.buffered_range && v_range
      AND a.time_slot_id <> p_slot.id
      AND a.id IS DISTINCT FROM p_exclude_appointment_id
      AND (p_lapsed OR a.status <> 'HOLD' OR a.expires_at > now())
    LIMIT 1;
    RETURN v_conflict;
END
$$;

CREATE FUNCTION booking_slot_buffer_blocked(p_slot time_slots) RETURNS boolean
LANGUAGE plpgsql STABLE COST 5 AS $$
BEGIN
    RETURN (booking_buffer_conflict(p_slot, NULL, false)).id IS NOT NULL;
END
$$;

CREATE FUNCTION booking_check_buffers(p_slot time_slots, p_exclude_appointment_id uuid)
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_range tstzrange := booking_buffer_range(p_slot);
    v_lapsed appointments;
    v_conflict appointments;
BEGIN
    -- The common case in one index probe: nothing in the way at all.
    v_conflict := booking_buffer_conflict(p_slot, p_exclude_appointment_id, true);
    IF v_conflict.id IS NULL THEN
        RETURN;
    END IF;
    FOR v_lapsed IN
        SELECT a.* FROM appointments a
        WHERE a.specialist_id = p_slot.specialist_id
          AND a.status = 'HOLD' AND a.expires_at <= now()
          AND a.buffered_range && v_range
          AND a.time_slot_id <> p_slot.id
          AND a.id IS DISTINCT FROM p_exclude_appointment_id
    LOOP
        PERFORM 1 FROM time_slots WHERE id = v_lapsed.time_slot_id FOR UPDATE SKIP LOCKED;
        CONTINUE WHEN NOT FOUND;
        SELECT * INTO v_lapsed FROM appointments
        WHERE id = v_lapsed.id AND status = 'HOLD'
        FOR UPDATE SKIP LOCKED;
        CONTINUE WHEN v_lapsed.id IS NULL;
        PERFORM booking_expire_hold(v_lapsed);
    END LOOP;
    v_conflict := booking_buffer_conflict(p_slot, p_exclude_appointment_id, true);
    IF v_conflict.id IS NOT NULL THEN
        PERFORM booking_fail('WITHIN_BUFFER', jsonb_build_object(
            'slot_id', p_slot.id,
            'window_start_time', lower(v_conflict.buffered_range),
            'window_end_time', upper(v_conflict.buffered_range)));
    END IF;
END
$$;

CREATE FUNCTION booking_user_overlaps(p_user_id uuid, p_slot time_slots) RETURNS boolean
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN EXISTS (
        SELECT 1 FROM appointments a
        JOIN time_slots s ON s.id = a.time_slot_id
        WHERE a.user_id = p_user_id
          AND (a.status = 'CONFIRMED' OR (a.status = 'HOLD' AND a.expires_at > now()))
          AND s.start_time < p_slot.end_time
          AND s.end_time > p_slot.start_time);
END
$$;

CREATE TRIGGER appointments_range
    BEFORE INSERT OR UPDATE OF time_slot_id ON appointments
    FOR EACH ROW EXECUTE FUNCTION booking_appointment_range();

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
        -- A slot a buffer blocks is offered to nobody (buffers.sql); a
        -- lapsed hold in the way counts, as the constraint counts it.
        EXIT WHEN (booking_buffer_conflict(v_slot, NULL, true)).id IS NOT NULL;
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

