-- Back to 0043: the overlap check and the search join every live
-- appointment of the user to its slot.

CREATE OR REPLACE FUNCTION booking_appointment_range() RETURNS trigger
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

CREATE OR REPLACE FUNCTION booking_check_user_overlap(
    p_user_id uuid, p_slot time_slots, p_exclude_appointment_id uuid
) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_conflict uuid;
BEGIN
    SELECT a.id INTO v_conflict
    FROM appointments a
    JOIN time_slots s ON s.id = a.time_slot_id
    WHERE a.user_id = p_user_id
      AND (a.status = 'CONFIRMED' OR (a.status = 'HOLD' AND a.expires_at > now()))
      AND s.start_time < p_slot.end_time
      AND s.end_time > p_slot.start_time
      AND a.id IS DISTINCT FROM p_exclude_appointment_id
    LIMIT 1;
    IF v_conflict IS NOT NULL THEN
        PERFORM booking_fail('USER_OVERLAP', jsonb_build_object(
            'user_id', p_user_id, 'conflicting_appointment_id', v_conflict));
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION booking_user_overlaps(p_user_id uuid, p_slot time_slots) RETURNS boolean
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

ALTER TABLE appointments DROP COLUMN slot_start, DROP COLUMN slot_end;

ALTER TABLE time_slots DROP CONSTRAINT time_slots_length_bounded;
