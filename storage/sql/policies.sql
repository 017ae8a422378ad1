-- Booking policies: when a CLIENT may hold a slot, and until when it may
-- cancel or reschedule a confirmed appointment (docs/schedules.md).
--
-- Each specialist may set its own limits (NULL columns on specialists);
-- the rest come from booking_policy_defaults, the server-wide defaults.
-- They live in the database, not in each replica's flags, so every replica
-- enforces the same limits at every instant: a change commits once and the
-- next transition anywhere sees it. 0 means no limit.
--
-- The checks run inside the transitions (transitions.sql), against now(),
-- the database clock. Operators and admins are exempt: the transitions take
-- p_policy_exempt from service/policy.py. booking_client_may_hold is the
-- yes/no form of the hold check, for queries that choose slots for a
-- CLIENT (offers, availability).

CREATE TABLE booking_policy_defaults (
    id                          boolean PRIMARY KEY DEFAULT true,
    min_notice_minutes          integer NOT NULL DEFAULT 0,
    max_advance_days            integer NOT NULL DEFAULT 0,
    cancellation_cutoff_hours   integer NOT NULL DEFAULT 0,
    updated_at                  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT booking_policy_defaults_one_row CHECK (id),
    CONSTRAINT booking_policy_defaults_not_negative CHECK (
        min_notice_minutes >= 0 AND max_advance_days >= 0 AND cancellation_cutoff_hours >= 0)
);
INSERT INTO booking_policy_defaults DEFAULT VALUES;

-- The limits that apply to a specialist's slots: its own, else the defaults.
CREATE FUNCTION booking_policy(
    p_specialist_id uuid,
    OUT min_notice_minutes integer,
    OUT max_advance_days integer,
    OUT cancellation_cutoff_hours integer
)
LANGUAGE sql STABLE AS $$
    SELECT coalesce(s.min_notice_minutes, d.min_notice_minutes, 0),
           coalesce(s.max_advance_days, d.max_advance_days, 0),
           coalesce(s.cancellation_cutoff_hours, d.cancellation_cutoff_hours, 0)
    FROM specialists s LEFT JOIN booking_policy_defaults d ON d.id
    WHERE s.id = p_specialist_id
$$;

-- The start times a CLIENT may hold right now, inclusive; NULL: no bound.
CREATE FUNCTION booking_hold_window(
    p_specialist_id uuid, OUT earliest_start timestamptz, OUT latest_start timestamptz
)
LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN p.min_notice_minutes > 0
                THEN now() + make_interval(mins => p.min_notice_minutes) END,
           CASE WHEN p.max_advance_days > 0
                THEN now() + make_interval(days => p.max_advance_days) END
    FROM booking_policy(p_specialist_id) p
$$;

-- Whether a CLIENT may hold the slot now, by the booking window alone.
CREATE FUNCTION booking_client_may_hold(p_slot time_slots) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT coalesce(p_slot.start_time >= w.earliest_start, true)
       AND coalesce(p_slot.start_time <= w.latest_start, true)
    FROM booking_hold_window(p_slot.specialist_id) w
$$;

-- Raises OUTSIDE_BOOKING_WINDOW unless a CLIENT may hold the slot now.
CREATE FUNCTION booking_check_hold_window(p_slot time_slots) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_window record;
    v_policy record;
BEGIN
    IF booking_client_may_hold(p_slot) THEN
        RETURN;
    END IF;
    SELECT * INTO v_window FROM booking_hold_window(p_slot.specialist_id);
    SELECT * INTO v_policy FROM booking_policy(p_slot.specialist_id);
    PERFORM booking_fail('OUTSIDE_BOOKING_WINDOW', jsonb_build_object(
        'slot_id', p_slot.id, 'start_time', p_slot.start_time,
        'min_notice_minutes', v_policy.min_notice_minutes,
        'max_advance_days', v_policy.max_advance_days,
        'earliest_start_time', v_window.earliest_start,
        'latest_start_time', v_window.latest_start));
END
$$;

-- Raises OUTSIDE_CANCELLATION_WINDOW when a CLIENT may no longer cancel or
-- reschedule (p_transition) the appointment: it is CONFIRMED and starts in
-- less than the cancellation cutoff. A HOLD is never bound by the cutoff.
CREATE FUNCTION booking_check_cancel_window(p_appt appointments, p_transition text)
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_hours integer;
    v_start timestamptz;
    v_cutoff timestamptz;
BEGIN
    IF p_appt.status <> 'CONFIRMED' THEN
        RETURN;
    END IF;
    SELECT p.cancellation_cutoff_hours INTO v_hours FROM booking_policy(p_appt.specialist_id) p;
    IF v_hours = 0 THEN
        RETURN;
    END IF;
    SELECT start_time INTO v_start FROM time_slots WHERE id = p_appt.time_slot_id;
    v_cutoff := v_start - make_interval(hours => v_hours);
    IF now() < v_cutoff THEN
        RETURN;
    END IF;
    PERFORM booking_fail('OUTSIDE_CANCELLATION_WINDOW', jsonb_build_object(
        'appointment_id', p_appt.id, 'transition', p_transition, 'start_time', v_start,
        'cancellation_cutoff_hours', v_hours, 'cutoff_time', v_cutoff));
END
$$;
