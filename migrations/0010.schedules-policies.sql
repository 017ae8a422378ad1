-- depends: 0009.waitlist
--
-- Specialists' time zones and working hours (storage/sql/schedules.sql), and
-- booking policies (storage/sql/policies.sql). Every new column is NULL or
-- has a constant default, so no table is rewritten while the previous
-- release serves. The transitions that enforce policies get versioned
-- names; the old names become wrappers the previous release keeps calling
-- (storage/sql/contract.sql).

ALTER TABLE specialists
    ADD COLUMN time_zone text NOT NULL DEFAULT 'UTC',
    ADD COLUMN min_notice_minutes integer,
    ADD COLUMN max_advance_days integer,
    ADD COLUMN cancellation_cutoff_hours integer,
    ADD CONSTRAINT specialists_policy_not_negative CHECK (
        min_notice_minutes >= 0 AND max_advance_days >= 0 AND cancellation_cutoff_hours >= 0);

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

-- p_policy_exempt: the caller is not bound by the booking policies
-- (policies.sql); service/policy.py decides who is.
CREATE FUNCTION booking_hold_slot_v2(
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
DECLARE
    v_event appointment_events;
    v_slot time_slots;
    v_appt appointments;
BEGIN
    v_event := booking_begin_request('HoldSlot', p_actor_id, p_request_id,
        p_slot_id::text, p_user_id::text, p_priority::text, p_actor_id::text);
    IF v_event.id IS NOT NULL THEN
        RETURN v_event;
    END IF;

    PERFORM booking_lock_user(p_user_id, p_check_user_overlap);

    -- Waits for a concurrent request changing the slot. If it commits a
    -- change, this statement fails with 40001 and the retry sees the slot
    -- taken (a true refusal); if it rolls back, this request goes on and
    -- may win the slot.
    SELECT * INTO v_slot FROM time_slots
    WHERE id = p_slot_id AND deleted_at IS NULL
    FOR UPDATE;
    IF v_slot.id IS NULL THEN
        PERFORM booking_fail('SLOT_NOT_FOUND', jsonb_build_object('id', p_slot_id));
    END IF;
    IF NOT p_policy_exempt THEN
        PERFORM booking_check_hold_window(v_slot);
    END IF;
    PERFORM booking_claim_slot(v_slot);
    IF p_check_user_overlap THEN
        PERFORM booking_check_user_overlap(p_user_id, v_slot, NULL);
    END IF;

    UPDATE time_slots SET status = 'HOLD' WHERE id = p_slot_id;
    INSERT INTO appointments (id, user_id, specialist_id, time_slot_id, status, priority, expires_at)
    VALUES (gen_random_uuid(), p_user_id, v_slot.specialist_id, p_slot_id, 'HOLD',
            p_priority, now() + p_hold_ttl)
    RETURNING * INTO v_appt;

    v_event := booking_emit_event(v_appt, 'HELD', NULL, p_actor_id, NULL, NULL);
    RETURN booking_finish_request(v_event);
END
$$;

CREATE FUNCTION booking_cancel_v2(
    p_id uuid, p_owner_id uuid, p_actor_id uuid, p_reason text, p_request_id uuid,
    p_policy_exempt boolean
) RETURNS appointment_events
LANGUAGE plpgsql AS $$
DECLARE
    v_event appointment_events;
    v_appt appointments;
    v_old appointment_status;
BEGIN
    v_event := booking_begin_request('CancelAppointment', p_actor_id, p_request_id,
        p_id::text, p_owner_id::text, p_actor_id::text, p_reason);
    IF v_event.id IS NOT NULL THEN
        RETURN v_event;
    END IF;

    v_appt := booking_lock_appointment(p_id, p_owner_id);
    v_old := v_appt.status;
    IF v_old NOT IN ('HOLD', 'CONFIRMED') THEN
        PERFORM booking_wrong_state(v_appt, 'cancel');
    END IF;
    IF NOT p_policy_exempt THEN
        PERFORM booking_check_cancel_window(v_appt, 'cancel');
    END IF;

    UPDATE appointments SET status = 'CANCELLED', expires_at = NULL, updated_at = now()
    WHERE id = p_id RETURNING * INTO v_appt;
    v_event := booking_emit_event(v_appt, 'CANCELLED', v_old, p_actor_id, p_reason, NULL);
    PERFORM booking_release_slot(v_appt.time_slot_id);
    RETURN booking_finish_request(v_event);
END
$$;

CREATE FUNCTION booking_reschedule_v2(
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
    PERFORM booking_claim_slot(v_new);
    IF p_check_user_overlap THEN
        PERFORM booking_check_user_overlap(v_appt.user_id, v_new, p_id);
    END IF;

    UPDATE time_slots
    SET status = CASE WHEN v_appt.status = 'HOLD' THEN 'HOLD' ELSE 'BOOKED' END::timeslot_status
    WHERE id = p_new_slot_id;
    UPDATE appointments SET time_slot_id = p_new_slot_id, updated_at = now()
    WHERE id = p_id RETURNING * INTO v_appt;

    v_event := booking_emit_event(
        v_appt, 'RESCHEDULED', v_appt.status, p_actor_id, NULL, v_old_slot_id);
    PERFORM booking_release_slot(v_old_slot_id);
    RETURN booking_finish_request(v_event);
END
$$;

-- The transitions as the previous release calls them, before booking
-- policies (policies.sql). It cannot say whether its caller is exempt, so
-- the actor's role decides, by the rule service/policy.py states for this
-- release: staff (and the server itself, no actor) are exempt, a CLIENT is
-- not. So a previous-release replica still enforces the limits.
CREATE FUNCTION booking_policy_exempt_actor(p_actor_id uuid) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT coalesce((SELECT role <> 'CLIENT' FROM users WHERE id = p_actor_id), true)
$$;

CREATE OR REPLACE FUNCTION booking_hold_slot(
    p_slot_id uuid,
    p_user_id uuid,
    p_priority appointment_priority,
    p_actor_id uuid,
    p_hold_ttl interval,
    p_check_user_overlap boolean,
    p_request_id uuid
) RETURNS appointment_events
LANGUAGE plpgsql AS $$
BEGIN
    RETURN booking_hold_slot_v2(
        p_slot_id => p_slot_id, p_user_id => p_user_id, p_priority => p_priority,
        p_actor_id => p_actor_id, p_hold_ttl => p_hold_ttl,
        p_check_user_overlap => p_check_user_overlap, p_request_id => p_request_id,
        p_policy_exempt => booking_policy_exempt_actor(p_actor_id));
END
$$;

CREATE OR REPLACE FUNCTION booking_cancel(
    p_id uuid, p_owner_id uuid, p_actor_id uuid, p_reason text, p_request_id uuid
) RETURNS appointment_events
LANGUAGE plpgsql AS $$
BEGIN
    RETURN booking_cancel_v2(
        p_id => p_id, p_owner_id => p_owner_id, p_actor_id => p_actor_id,
        p_reason => p_reason, p_request_id => p_request_id,
        p_policy_exempt => booking_policy_exempt_actor(p_actor_id));
END
$$;

CREATE OR REPLACE FUNCTION booking_reschedule(
    p_id uuid,
    p_new_slot_id uuid,
    p_owner_id uuid,
    p_actor_id uuid,
    p_check_user_overlap boolean,
    p_request_id uuid
) RETURNS appointment_events
LANGUAGE plpgsql AS $$
BEGIN
    RETURN booking_reschedule_v2(
        p_id => p_id, p_new_slot_id => p_new_slot_id, p_owner_id => p_owner_id,
        p_actor_id => p_actor_id, p_check_user_overlap => p_check_user_overlap,
        p_request_id => p_request_id,
        p_policy_exempt => booking_policy_exempt_actor(p_actor_id));
END
$$;

CREATE TABLE schedule_rules (
    specialist_id   uuid NOT NULL REFERENCES specialists (id),
    position        integer NOT NULL,
    -- ISO weekday: 1 is Monday, 7 Sunday.
    weekday         smallint NOT NULL,
    start_minute    integer NOT NULL,
    end_minute      integer NOT NULL,
    slot_minutes    integer NOT NULL,
    gap_minutes     integer NOT NULL DEFAULT 0,
    -- Inclusive; NULL: unbounded.
    effective_from  date,
    effective_until date,
    CONSTRAINT schedule_rules_pkey PRIMARY KEY (specialist_id, position),
    CONSTRAINT schedule_rules_weekday CHECK (weekday BETWEEN 1 AND 7),
    CONSTRAINT schedule_rules_hours CHECK (
        0 <= start_minute AND start_minute < end_minute AND end_minute <= 1440),
    CONSTRAINT schedule_rules_slots CHECK (slot_minutes > 0 AND gap_minutes >= 0),
    CONSTRAINT schedule_rules_dates CHECK (effective_from <= effective_until)
);

-- OFF: the date (whole, or from start to end) has no slots. EXTRA: hours
-- worked on that date on top of the weekly rules.
CREATE TABLE schedule_exceptions (
    specialist_id   uuid NOT NULL REFERENCES specialists (id),
    position        integer NOT NULL,
    on_date         date NOT NULL,
    kind            text NOT NULL,
    -- NULL (OFF only): the whole day.
    start_minute    integer,
    end_minute      integer,
    -- EXTRA only.
    slot_minutes    integer,
    gap_minutes     integer,
    CONSTRAINT schedule_exceptions_pkey PRIMARY KEY (specialist_id, position),
    CONSTRAINT schedule_exceptions_kind CHECK (kind IN ('OFF', 'EXTRA')),
    CONSTRAINT schedule_exceptions_hours CHECK (
        (start_minute IS NULL) = (end_minute IS NULL)
        AND (start_minute IS NULL
             OR (0 <= start_minute AND start_minute < end_minute AND end_minute <= 1440))),
    CONSTRAINT schedule_exceptions_extra CHECK (
        (kind = 'EXTRA') = (slot_minutes IS NOT NULL)
        AND (kind = 'EXTRA') = (gap_minutes IS NOT NULL)
        AND (kind <> 'EXTRA' OR start_minute IS NOT NULL)
        AND (slot_minutes IS NULL OR (slot_minutes > 0 AND gap_minutes >= 0)))
);

-- One row per materialisation that had a request id: its report, replayed
-- to every copy of the request. Kept as long as request ids are.
CREATE TABLE schedule_runs (
    actor_id        uuid NOT NULL,
    request_id      uuid NOT NULL,
    specialist_id   uuid NOT NULL REFERENCES specialists (id),
    fingerprint     text NOT NULL,
    report          jsonb NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT schedule_runs_pkey PRIMARY KEY (actor_id, request_id)
);
CREATE INDEX schedule_runs_created ON schedule_runs (created_at);

-- Forgets up to p_limit runs older than p_retention; SKIP LOCKED lets
-- several replicas prune at once.
CREATE FUNCTION booking_forget_schedule_runs(p_retention interval, p_limit integer)
RETURNS integer
LANGUAGE sql AS $$
    WITH doomed AS (
        SELECT actor_id, request_id FROM schedule_runs
        WHERE created_at < now() - p_retention
        ORDER BY created_at
        LIMIT p_limit
        FOR UPDATE SKIP LOCKED
    ), gone AS (
        DELETE FROM schedule_runs r USING doomed d
        WHERE r.actor_id = d.actor_id AND r.request_id = d.request_id
        RETURNING 1
    )
    SELECT count(*)::integer FROM gone
$$;

-- Waitlist offers and availability search now respect the booking window.
-- Whether this user may hold this slot now, beyond the slot being free and
-- the user being active: the one place booking policies (notice, advance
-- limits) are checked for waitlist offers and for SearchAvailableSlots. A
-- CLIENT is bound by the booking window (policies.sql); staff are exempt,
-- as they are from HoldSlot's check.
CREATE OR REPLACE FUNCTION booking_may_hold(p_user_id uuid, p_slot time_slots) RETURNS boolean
LANGUAGE sql STABLE
RETURN coalesce((SELECT u.role <> 'CLIENT' FROM users u WHERE u.id = p_user_id), false)
    OR booking_client_may_hold(p_slot);
