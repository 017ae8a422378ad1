-- Seats: a slot has a capacity, and up to that many seats are occupied by
-- its live appointments, each taking its party_size (docs/seats.md).
--
-- The count lives on the slot (seats_taken, and seats_held for the part in
-- HOLD), kept by a trigger on appointments in the same transaction as
-- every change of an appointment's status, slot or party size, whoever
-- makes it: a transition of this release or a previous one, the waitlist,
-- the sweeper. time_slots_seats (tables.sql) refuses any count above the
-- capacity, so no interleaving of writers can overbook a slot; the
-- transitions check first, under the slot's row lock, to refuse with a
-- reason. The slot's status is derived from the counts by a trigger on the
-- slot itself, so it can never disagree with them:
--
--   AVAILABLE  a seat is free (seats_taken < capacity);
--   HOLD       every seat is taken and at least one by a hold;
--   BOOKED     every seat is taken by a confirmed (or no-show) appointment.
--
-- With capacity 1 these are exactly the statuses of a slot before seats.

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

CREATE TRIGGER time_slots_status
    BEFORE INSERT OR UPDATE ON time_slots
    FOR EACH ROW EXECUTE FUNCTION booking_slot_status();

-- Moves the seats of an appointment between slots and states: what the
-- old row occupied is given back, what the new row occupies is taken (a
-- deleted row, which only maintenance does, gives its seats back). A
-- TRUNCATE fires no row trigger: whoever truncates appointments resets the
-- counts (tools/bench/db.py does).
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

CREATE TRIGGER appointments_seats
    AFTER INSERT OR DELETE OR UPDATE OF status, time_slot_id, party_size ON appointments
    FOR EACH ROW EXECUTE FUNCTION booking_appointment_seats();

-- Makes room for p_party_size seats on a locked slot: free as it is, or
-- after reclaiming its lapsed holds (whose seats go to waiters first).
-- Refuses SLOT_UNAVAILABLE when every seat is taken, NOT_ENOUGH_SEATS when
-- some are free but fewer than the party.
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

-- Raises or lowers a slot's capacity. Lowering below the seats taken (after
-- reclaiming lapsed holds) is CAPACITY_BELOW_SEATS_TAKEN; seats added are
-- offered to the waitlist at once, like freed ones.
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
