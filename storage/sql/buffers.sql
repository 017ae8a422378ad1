-- Buffers (docs/seats.md, "Buffers"): a specialist may need time before
-- and after each appointment. Each live appointment carries its buffered
-- range, its slot widened by the specialist's buffers when it took the
-- slot (booking_appointment_range, below), and the exclusion constraint
-- appointments_buffers_apart (tables.sql) refuses two live appointments of
-- one specialist, in different slots, whose buffered ranges overlap. So
-- the break after one appointment and the preparation before the next both
-- fit between them, whatever writes them and however they race.
--
-- The transitions check first (booking_check_buffers), to refuse with a
-- reason (WITHIN_BUFFER, with the blocking window) and to reclaim lapsed
-- holds in the way; a concurrent hold that slips past the check meets the
-- constraint, which storage/ retries, and the retry sees it committed.
-- Changing a specialist's buffers never touches existing appointments:
-- their ranges stay as they were; holds after the change use the new ones.

-- specialists.buffers_used turns true the first time a buffer of the
-- specialist is above 0 and never turns back, whoever writes the row. Until
-- it does, every live appointment of the specialist holds exactly its slot
-- (its range was taken with no buffers) and slots of one specialist never
-- overlap (time_slots_no_overlap), so no appointment can be in another's
-- buffer and the probe below is skipped: one primary-key lookup instead of
-- the range and the gist probe. The constraint does not depend on the flag:
-- a hold that read it false just before a concurrent change of the buffers
-- committed still meets appointments_buffers_apart, and its retry reads it
-- true.
CREATE FUNCTION booking_specialist_buffers_used() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.buffers_used := NEW.buffer_before_minutes > 0 OR NEW.buffer_after_minutes > 0
        OR (TG_OP = 'UPDATE' AND OLD.buffers_used);
    RETURN NEW;
END
$$;

CREATE TRIGGER specialists_buffers_used
    BEFORE INSERT OR UPDATE ON specialists
    FOR EACH ROW EXECUTE FUNCTION booking_specialist_buffers_used();

-- The range a new appointment in the slot would block, with the
-- specialist's buffers as they are now.
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

-- Sets an appointment's buffered range and its slot's times (slot_start,
-- slot_end: tables.sql) when it takes a slot (a hold, an offer, a
-- reschedule), in this release or a previous one. A slot's times never
-- change, so the copy stays equal to the slot's range.
CREATE FUNCTION booking_appointment_range() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    SELECT tstzrange(s.start_time - make_interval(mins => p.buffer_before_minutes),
                     s.end_time + make_interval(mins => p.buffer_after_minutes), '[)'),
           s.start_time, s.end_time
    INTO NEW.buffered_range, NEW.slot_start, NEW.slot_end
    FROM time_slots s JOIN specialists p ON p.id = s.specialist_id
    WHERE s.id = NEW.time_slot_id;
    RETURN NEW;
END
$$;

CREATE TRIGGER appointments_range
    BEFORE INSERT OR UPDATE OF time_slot_id ON appointments
    FOR EACH ROW EXECUTE FUNCTION booking_appointment_range();

-- The first live appointment of the slot's specialist, in another slot,
-- that an appointment in this slot would come too close to; NULL if none.
-- With p_lapsed, holds that have lapsed but are not yet reclaimed count
-- (as the constraint counts them); without, they do not (offers, search).
CREATE FUNCTION booking_buffer_conflict(
    p_slot time_slots, p_exclude_appointment_id uuid, p_lapsed boolean
) RETURNS appointments
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_range tstzrange;
    v_conflict appointments;
BEGIN
    IF NOT (SELECT buffers_used FROM specialists WHERE id = p_slot.specialist_id) THEN
        RETURN NULL;
    END IF;
    -- Computed once, so the gist index gets a constant to search with.
    v_range := booking_buffer_range(p_slot);
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

-- Whether a buffer blocks the slot for a new appointment (search). Not
-- inlined, and costed as the one index probe it is, so that the search's
-- plan stays the start-time index in order (docs/api.md).
CREATE FUNCTION booking_slot_buffer_blocked(p_slot time_slots) RETURNS boolean
LANGUAGE plpgsql STABLE COST 5 AS $$
BEGIN
    RETURN (booking_buffer_conflict(p_slot, NULL, false)).id IS NOT NULL;
END
$$;

-- Raises WITHIN_BUFFER unless an appointment may take the locked slot as
-- far as buffers go. Lapsed holds in the way are reclaimed first, each
-- with its slot's lock taken SKIP LOCKED (this one is already held, so
-- waiting could close a cycle); one that cannot be locked now blocks.
CREATE FUNCTION booking_check_buffers(p_slot time_slots, p_exclude_appointment_id uuid)
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_range tstzrange;
    v_lapsed appointments;
    v_conflict appointments;
BEGIN
    -- The common case in one index probe (none without buffers used):
    -- nothing in the way at all.
    v_conflict := booking_buffer_conflict(p_slot, p_exclude_appointment_id, true);
    IF v_conflict.id IS NULL THEN
        RETURN;
    END IF;
    v_range := booking_buffer_range(p_slot);
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
