-- depends: 0013.one-request-id-mechanism
--
-- Seats (docs/seats.md): a slot has a capacity (default 1) and up to that
-- many seats are taken by its live appointments, each with a party size.
-- The counts live on the slot, kept by a trigger on appointments, capped by
-- the CHECK time_slots_seats, and the slot's status is derived from them by
-- a trigger on the slot. The unique index of one live appointment per slot
-- gives way to a plain one (the CHECK is the limit now: at most capacity).
--
-- Expand only: new columns with constant defaults (no table rewrite), new
-- functions (booking_hold_slot_v3, booking_insert_slots_v2), and bodies of
-- the same signatures that the previous release keeps calling with the
-- same meaning (one seat). While this runs, the previous release's writes
-- to appointments wait for its locks; a transaction of it whose snapshot
-- predates the counts fails its first write of a counted slot with 40001
-- and its retry sees them.

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
            LOCK TABLE time_slots, appointments IN ACCESS EXCLUSIVE MODE;
            PERFORM set_config('lock_timeout', '0', true);
            RETURN;
        EXCEPTION WHEN lock_not_available THEN
            PERFORM pg_sleep(0.01 * random());
        END;
    END LOOP;
    RAISE EXCEPTION 'could not lock time_slots, appointments for the migration';
END
$$;

ALTER TABLE time_slots
    ADD COLUMN capacity integer NOT NULL DEFAULT 1,
    ADD COLUMN seats_taken integer NOT NULL DEFAULT 0,
    ADD COLUMN seats_held integer NOT NULL DEFAULT 0;
ALTER TABLE appointments
    ADD COLUMN party_size integer NOT NULL DEFAULT 1,
    ADD CONSTRAINT appointments_party_size_positive CHECK (party_size >= 1);

UPDATE time_slots s
SET seats_taken = c.taken, seats_held = c.held
FROM (SELECT time_slot_id, sum(party_size)::integer AS taken,
             coalesce(sum(party_size) FILTER (WHERE status = 'HOLD'), 0)::integer AS held
      FROM appointments WHERE status <> 'CANCELLED'
      GROUP BY time_slot_id) c
WHERE s.id = c.time_slot_id;

ALTER TABLE time_slots ADD CONSTRAINT time_slots_seats CHECK (
    capacity >= 1 AND seats_held >= 0 AND seats_held <= seats_taken
    AND seats_taken <= capacity);

CREATE INDEX appointments_live_by_slot
    ON appointments (time_slot_id) WHERE status <> 'CANCELLED';
DROP INDEX appointments_one_live_per_slot;

CREATE FUNCTION booking_slot_status() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.status := CASE
        WHEN NEW.seats_taken < NEW.capacity THEN 'AVAILABLE'
        WHEN NEW.seats_held > 0 THEN 'HOLD'
        ELSE 'BOOKED'
    END::timeslot_status;
    RETURN NEW;
END
$$;

CREATE FUNCTION booking_appointment_seats() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_old_taken integer := 0;
    v_old_held integer := 0;
    v_new_taken integer := 0;
    v_new_held integer := 0;
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') AND OLD.status <> 'CANCELLED' THEN
        v_old_taken := OLD.party_size;
        v_old_held := CASE WHEN OLD.status = 'HOLD' THEN OLD.party_size ELSE 0 END;
    END IF;
    IF TG_OP = 'DELETE' THEN
        IF v_old_taken > 0 THEN
            UPDATE time_slots
            SET seats_taken = seats_taken - v_old_taken, seats_held = seats_held - v_old_held
            WHERE id = OLD.time_slot_id;
        END IF;
        RETURN NULL;
    END IF;
    IF NEW.status <> 'CANCELLED' THEN
        v_new_taken := NEW.party_size;
        v_new_held := CASE WHEN NEW.status = 'HOLD' THEN NEW.party_size ELSE 0 END;
    END IF;
    IF TG_OP = 'UPDATE' AND OLD.time_slot_id = NEW.time_slot_id THEN
        IF (v_old_taken, v_old_held) <> (v_new_taken, v_new_held) THEN
            UPDATE time_slots
            SET seats_taken = seats_taken - v_old_taken + v_new_taken,
                seats_held = seats_held - v_old_held + v_new_held
            WHERE id = NEW.time_slot_id;
        END IF;
        RETURN NULL;
    END IF;
    IF v_old_taken > 0 THEN
        UPDATE time_slots
        SET seats_taken = seats_taken - v_old_taken, seats_held = seats_held - v_old_held
        WHERE id = OLD.time_slot_id;
    END IF;
    IF v_new_taken > 0 THEN
        UPDATE time_slots
        SET seats_taken = seats_taken + v_new_taken, seats_held = seats_held + v_new_held
        WHERE id = NEW.time_slot_id;
    END IF;
    RETURN NULL;
END
$$;

CREATE FUNCTION booking_claim_seats(p_slot time_slots, p_party_size integer) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_slot time_slots := p_slot;
BEGIN
    IF NOT (SELECT is_active FROM specialists WHERE id = p_slot.specialist_id) THEN
        PERFORM booking_fail('SPECIALIST_INACTIVE', jsonb_build_object(
            'specialist_id', p_slot.specialist_id));
    END IF;
    IF v_slot.capacity - v_slot.seats_taken >= p_party_size THEN
        RETURN;
    END IF;
    v_slot := booking_reclaim_slot(v_slot);
    IF v_slot.capacity - v_slot.seats_taken >= p_party_size THEN
        RETURN;
    END IF;
    IF v_slot.seats_taken >= v_slot.capacity THEN
        PERFORM booking_fail('SLOT_UNAVAILABLE', jsonb_build_object(
            'slot_id', v_slot.id, 'status', v_slot.status));
    END IF;
    PERFORM booking_fail('NOT_ENOUGH_SEATS', jsonb_build_object(
        'slot_id', v_slot.id, 'seats_available', v_slot.capacity - v_slot.seats_taken,
        'party_size', p_party_size));
END
$$;

CREATE FUNCTION booking_set_slot_capacity(p_slot_id uuid, p_capacity integer)
RETURNS time_slots
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
    IF p_capacity < v_slot.seats_taken THEN
        v_slot := booking_reclaim_slot(v_slot);
    END IF;
    IF p_capacity < v_slot.seats_taken THEN
        PERFORM booking_fail('CAPACITY_BELOW_SEATS_TAKEN', jsonb_build_object(
            'slot_id', p_slot_id, 'capacity', p_capacity, 'seats_taken', v_slot.seats_taken));
    END IF;
    UPDATE time_slots SET capacity = p_capacity WHERE id = p_slot_id;
    IF p_capacity > v_slot.capacity THEN
        PERFORM booking_offer_slot(p_slot_id);
    END IF;
    SELECT * INTO v_slot FROM time_slots WHERE id = p_slot_id;
    RETURN v_slot;
END
$$;

CREATE TRIGGER time_slots_status
    BEFORE INSERT OR UPDATE ON time_slots
    FOR EACH ROW EXECUTE FUNCTION booking_slot_status();

CREATE TRIGGER appointments_seats
    AFTER INSERT OR DELETE OR UPDATE OF status, time_slot_id, party_size ON appointments
    FOR EACH ROW EXECUTE FUNCTION booking_appointment_seats();

CREATE FUNCTION booking_insert_slots_v2(
    p_specialist_ids uuid[], p_start_times timestamptz[], p_end_times timestamptz[],
    p_capacities integer[]
) RETURNS SETOF time_slots
LANGUAGE plpgsql AS $$
DECLARE
    v_ids uuid[] := ARRAY(
        SELECT gen_random_uuid() FROM generate_series(1, cardinality(p_specialist_ids)));
BEGIN
    INSERT INTO time_slots (id, specialist_id, start_time, end_time, capacity)
    SELECT * FROM unnest(v_ids, p_specialist_ids, p_start_times, p_end_times, p_capacities);
    FOR i IN 1 .. cardinality(v_ids) LOOP
        PERFORM booking_slot_created(v_ids[i]);
    END LOOP;
    RETURN QUERY
        SELECT s.* FROM unnest(v_ids) WITH ORDINALITY AS u (id, n)
        JOIN time_slots s ON s.id = u.id
        ORDER BY u.n;
END
$$;

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

CREATE OR REPLACE FUNCTION booking_release_slot(p_slot_id uuid) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM booking_offer_slot(p_slot_id);
END
$$;

CREATE OR REPLACE FUNCTION booking_reclaim_slot(p_slot time_slots) RETURNS time_slots
LANGUAGE plpgsql AS $$
DECLARE
    v_holder appointments;
    v_slot time_slots;
    v_reclaimed boolean := false;
BEGIN
    IF p_slot.seats_held = 0 THEN
        RETURN p_slot;
    END IF;
    FOR v_holder IN
        SELECT * FROM appointments
        WHERE time_slot_id = p_slot.id AND status = 'HOLD' AND expires_at <= now()
        ORDER BY expires_at, id
        FOR UPDATE
    LOOP
        PERFORM booking_expire_hold(v_holder);
        v_reclaimed := true;
    END LOOP;
    IF NOT v_reclaimed THEN
        RETURN p_slot;
    END IF;
    SELECT * INTO v_slot FROM time_slots WHERE id = p_slot.id;
    RETURN v_slot;
END
$$;

CREATE OR REPLACE FUNCTION booking_claim_slot(p_slot time_slots) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM booking_claim_seats(p_slot, 1);
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
    IF v_slot.seats_taken > 0 THEN
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
BEGIN
    RETURN booking_hold_slot_v3(
        p_slot_id => p_slot_id, p_user_id => p_user_id, p_priority => p_priority,
        p_actor_id => p_actor_id, p_hold_ttl => p_hold_ttl,
        p_check_user_overlap => p_check_user_overlap, p_request_id => p_request_id,
        p_policy_exempt => p_policy_exempt, p_party_size => 1);
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

CREATE OR REPLACE FUNCTION booking_slot_is_free(p_slot time_slots) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    IF p_slot.deleted_at IS NOT NULL THEN
        RETURN false;
    END IF;
    IF p_slot.seats_taken < p_slot.capacity THEN
        RETURN true;
    END IF;
    IF p_slot.seats_held = 0 THEN
        RETURN false;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM appointments
                   WHERE time_slot_id = p_slot.id AND status = 'HOLD'
                     AND expires_at <= now()) THEN
        RETURN false;
    END IF;
    RETURN (booking_waitlist_claimant(p_slot, false)).id IS NULL;
END
$$;
