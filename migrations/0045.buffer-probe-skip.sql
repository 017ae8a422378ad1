-- depends: 0044.appointment-slot-times
--
-- The buffer probe skipped for specialists whose buffers were never used
-- (storage/sql/buffers.sql, docs/performance.md "Seats, series and
-- buffers"): specialists.buffers_used, kept by a trigger, and the probe
-- returning at once while it is false.
--
-- Expand only: a new column with a constant default (no rewrite), a new
-- trigger, and bodies of the same signatures. The ALTER needs specialists'
-- lock for a moment; it is taken with a short lock_timeout and retried, so
-- the previous release's holds never queue behind it for long.
DO $$
BEGIN
    FOR i IN 1 .. 1200 LOOP
        BEGIN
            PERFORM set_config('lock_timeout', '50ms', true);
            LOCK TABLE specialists IN ACCESS EXCLUSIVE MODE;
            PERFORM set_config('lock_timeout', '0', true);
            RETURN;
        EXCEPTION WHEN lock_not_available THEN
            PERFORM pg_sleep(0.01 * random());
        END;
    END LOOP;
    RAISE EXCEPTION 'could not lock specialists for the migration';
END
$$;

ALTER TABLE specialists ADD COLUMN buffers_used boolean NOT NULL DEFAULT false;

-- A specialist whose buffers are 0 now may have used some before: a live
-- appointment of it may hold a range wider than its slot (only live ones
-- meet the probe and the constraint).
UPDATE specialists p SET buffers_used = true
WHERE p.buffer_before_minutes > 0 OR p.buffer_after_minutes > 0
   OR EXISTS (
       SELECT 1 FROM appointments a JOIN time_slots s ON s.id = a.time_slot_id
       WHERE a.specialist_id = p.id AND a.status <> 'CANCELLED'
         AND a.buffered_range <> tstzrange(s.start_time, s.end_time, '[)'));

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

CREATE OR REPLACE FUNCTION booking_buffer_conflict(
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

CREATE OR REPLACE FUNCTION booking_check_buffers(p_slot time_slots, p_exclude_appointment_id uuid)
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
