-- Back to 0043: the buffer probe runs for every specialist.

CREATE OR REPLACE FUNCTION booking_buffer_conflict(
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

CREATE OR REPLACE FUNCTION booking_check_buffers(p_slot time_slots, p_exclude_appointment_id uuid)
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

DROP TRIGGER specialists_buffers_used ON specialists;
DROP FUNCTION booking_specialist_buffers_used();
ALTER TABLE specialists DROP COLUMN buffers_used;
