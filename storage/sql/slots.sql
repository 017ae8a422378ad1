-- How a slot is taken and given back.
--
-- booking_release_slot is the one place a slot becomes free again: cancel,
-- reschedule (the old slot), the expiry of a hold (by the sweeper, or
-- reclaimed by the next hold) and DeleteSlot (of a slot whose hold lapsed)
-- all go through it, so whatever must happen when a slot frees up is
-- written once, here: the slot is offered to the waitlist (waitlist.sql)
-- before anyone else can see it free. The caller holds the slot's row lock.

-- The seats the appointment gave back are already free (the trigger on
-- appointments, seats.sql); this offers them.
CREATE FUNCTION booking_release_slot(p_slot_id uuid) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM booking_offer_slot(p_slot_id);
END
$$;

-- Creates slots, in the order given, and offers each to the waitlist
-- (booking_slot_created) in the same transaction; returns them as they
-- then are (HOLD when a waiter got one). Overlaps are refused by
-- time_slots_no_overlap. The one way storage/ creates slots. Any isolation
-- will do: CreateSlot runs it under REPEATABLE READ, MaterializeSchedule
-- under READ COMMITTED (so that its overlap check sees slots committed
-- while it waited for the specialist's lock). The offer reads the entry and
-- the user only after locking them, and a concurrent HoldSlot of the same
-- user serializes on the user row either way.
CREATE FUNCTION booking_insert_slots(
    p_specialist_ids uuid[], p_start_times timestamptz[], p_end_times timestamptz[]
) RETURNS SETOF time_slots
LANGUAGE plpgsql AS $$
DECLARE
    v_ids uuid[] := ARRAY(
        SELECT gen_random_uuid() FROM generate_series(1, cardinality(p_specialist_ids)));
BEGIN
    INSERT INTO time_slots (id, specialist_id, start_time, end_time)
    SELECT * FROM unnest(v_ids, p_specialist_ids, p_start_times, p_end_times);
    FOR i IN 1 .. cardinality(v_ids) LOOP
        PERFORM booking_slot_created(v_ids[i]);
    END LOOP;
    RETURN QUERY
        SELECT s.* FROM unnest(v_ids) WITH ORDINALITY AS u (id, n)
        JOIN time_slots s ON s.id = u.id
        ORDER BY u.n;
END
$$;

-- booking_insert_slots with a capacity for each slot (docs/seats.md).
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

-- Cancels a lapsed hold and releases its slot. The caller holds the locks
-- on the slot and the appointment.
CREATE FUNCTION booking_expire_hold(p_appointment appointments) RETURNS appointment_events
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

-- Expires the lapsed holds on a locked slot, if it has any, and returns the
-- slot as it then is (their seats may have gone to waiters).
CREATE FUNCTION booking_reclaim_slot(p_slot time_slots) RETURNS time_slots
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

-- Makes a locked slot free for one new seat (booking_claim_seats, seats.sql).
CREATE FUNCTION booking_claim_slot(p_slot time_slots) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM booking_claim_seats(p_slot, 1);
END
$$;

-- Releases up to p_limit lapsed holds. SKIP LOCKED lets several replicas
-- sweep one database without waiting on, or double-releasing, a hold.
CREATE FUNCTION booking_expire_holds(p_limit integer) RETURNS integer
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

-- Deletes a slot of which nobody occupies a seat (lapsed holds are expired
-- first). It is kept, marked deleted, because past appointments and events
-- may reference it; it no longer blocks overlapping slots.
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
    IF v_slot.seats_taken > 0 THEN
        PERFORM booking_fail('SLOT_NOT_AVAILABLE', jsonb_build_object(
            'slot_id', p_slot_id, 'status', v_slot.status));
    END IF;
    UPDATE time_slots SET deleted_at = now() WHERE id = p_slot_id;
END
$$;
