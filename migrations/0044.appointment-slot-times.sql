-- depends: 0043.waitlist-party-size
--
-- The slot's times kept on the appointment (appointments.slot_start,
-- slot_end), so that the user-overlap check and a user's upcoming
-- appointments read only the user's appointments that end after an
-- instant, never the user's past (docs/performance.md, "History"); and
-- a slot's length bounded (time_slots_length_bounded, 48 hours), so that
-- ListSlots can bound the start of its index range.
--
-- Expand only: two nullable columns with no default (no rewrite), the
-- trigger that already sets the buffered range sets them too (so the
-- previous release's writes keep them as well), and bodies of the same
-- signatures. Rows written before this migration keep NULL until
-- `booking-service migrate backfill` sets them in batches; until then the
-- new bodies also look at those rows the old way, so they stay correct at
-- every point of the backfill. The CHECK is added NOT VALID (new rows
-- only, no scan under the lock); 0046 validates it and builds the index
-- CONCURRENTLY, without blocking writes. The ALTERs need the two tables'
-- locks for a moment (in the transitions' order, slots first); they are
-- taken with a short lock_timeout and retried, so the previous release's
-- holds never queue behind it for long.
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
    RAISE EXCEPTION 'could not lock time_slots and appointments for the migration';
END
$$;

ALTER TABLE appointments ADD COLUMN slot_start timestamptz, ADD COLUMN slot_end timestamptz;

ALTER TABLE time_slots ADD CONSTRAINT time_slots_length_bounded CHECK (
        end_time - start_time <= interval '48 hours'
        OR (start_time = '-infinity' AND end_time <= '0001-01-03 00:00:00+00')
        OR (end_time = 'infinity' AND start_time >= '9999-12-30 00:00:00+00')) NOT VALID;

CREATE OR REPLACE FUNCTION booking_appointment_range() RETURNS trigger
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

CREATE OR REPLACE FUNCTION booking_check_user_overlap(
    p_user_id uuid, p_slot time_slots, p_exclude_appointment_id uuid
) RETURNS void
LANGUAGE plpgsql AS $$
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

CREATE OR REPLACE FUNCTION booking_user_overlaps(p_user_id uuid, p_slot time_slots) RETURNS boolean
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
