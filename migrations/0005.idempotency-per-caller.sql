-- depends: 0004.auth-invalidation
--
-- Request ids (AIP-155) become per caller, and remember failures too.
--
-- * The key is (actor_id, request_id): one caller's ids can neither collide
--   with nor reveal another's. The constraint keeps its name,
--   idempotency_keys_pkey, which storage/ retries on.
-- * A key stores the first outcome of a request that began executing: the
--   event of its success, or the reason and detail of its business failure
--   (BK001). Every copy of the request gets that outcome.
-- * Keys are forgotten after a retention period (booking_forget_request_ids,
--   run by the sweeper).
-- * HoldSlot waits for the slot lock instead of failing NOWAIT: a refusal is
--   only ever answered from a committed hold or booking.
--
-- The public transition functions keep their signatures, so a server of the
-- previous release keeps working against this schema; only their bodies and
-- the internal helpers change.

ALTER TABLE idempotency_keys
    ADD COLUMN actor_id uuid,
    ADD COLUMN error_reason text,
    ADD COLUMN error_detail jsonb,
    ALTER COLUMN event_id DROP NOT NULL;

-- The server acting on its own (no actor) is one caller: the nil uuid.
UPDATE idempotency_keys k
SET actor_id = coalesce(e.actor_id, '00000000-0000-0000-0000-000000000000')
FROM appointment_events e
WHERE e.id = k.event_id;

ALTER TABLE idempotency_keys
    ALTER COLUMN actor_id SET NOT NULL,
    DROP CONSTRAINT idempotency_keys_pkey,
    ADD CONSTRAINT idempotency_keys_pkey PRIMARY KEY (actor_id, request_id),
    ADD CONSTRAINT idempotency_keys_one_outcome
        CHECK ((event_id IS NULL) <> (error_reason IS NULL));
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);

-- A business failure raised after booking_replay found no outcome is the
-- outcome of a request that began executing. Without an EXCEPTION block
-- (a subtransaction on every call) the function cannot store it itself, as
-- the failure aborts its transaction; so the failure carries the request's
-- key in its HINT, and storage/ stores it with booking_remember_failure in
-- a second statement.
CREATE OR REPLACE FUNCTION booking_fail(p_reason text, p_detail jsonb) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION USING ERRCODE = 'BK001', MESSAGE = p_reason, DETAIL = p_detail::text,
        HINT = coalesce(current_setting('booking.request_key', true), '');
END
$$;

-- The previous helpers stay (expand, then contract in a later release): a
-- statement of the previous release that compiled a transition before this
-- migration committed may still call them. The old booking_remember files
-- its key under the event's actor, as the new key requires.
CREATE OR REPLACE FUNCTION booking_remember(
    p_request_id uuid, p_operation text, p_fingerprint text, p_event appointment_events
) RETURNS appointment_events
LANGUAGE plpgsql AS $$
BEGIN
    IF p_request_id IS NOT NULL THEN
        INSERT INTO idempotency_keys (actor_id, request_id, operation, fingerprint, event_id)
        VALUES (coalesce(p_event.actor_id, '00000000-0000-0000-0000-000000000000'),
                p_request_id, p_operation, p_fingerprint, p_event.id);
    END IF;
    RETURN p_event;
END
$$;

-- Returns the event a caller's request id already produced, raises the
-- failure it already produced, or returns NULL when the request is new (and
-- marks the transaction so a failure names the key to remember).
CREATE FUNCTION booking_replay(
    p_actor_id uuid, p_request_id uuid, p_operation text, p_fingerprint text
) RETURNS appointment_events
LANGUAGE plpgsql AS $$
DECLARE
    v_actor uuid := coalesce(p_actor_id, '00000000-0000-0000-0000-000000000000');
    v_key idempotency_keys;
    v_event appointment_events;
BEGIN
    IF p_request_id IS NULL THEN
        RETURN NULL;
    END IF;
    SELECT * INTO v_key FROM idempotency_keys
    WHERE actor_id = v_actor AND request_id = p_request_id;
    IF NOT FOUND THEN
        PERFORM set_config('booking.request_key', jsonb_build_object(
            'actor_id', v_actor, 'request_id', p_request_id,
            'operation', p_operation, 'fingerprint', p_fingerprint)::text, true);
        RETURN NULL;
    END IF;
    IF v_key.operation <> p_operation OR v_key.fingerprint <> p_fingerprint THEN
        PERFORM booking_fail('REQUEST_ID_REUSED', jsonb_build_object(
            'request_id', p_request_id, 'operation', v_key.operation));
    END IF;
    IF v_key.event_id IS NULL THEN
        PERFORM booking_fail(v_key.error_reason, v_key.error_detail);
    END IF;
    SELECT * INTO v_event FROM appointment_events WHERE id = v_key.event_id;
    RETURN v_event;
END
$$;

CREATE FUNCTION booking_remember(
    p_actor_id uuid, p_request_id uuid, p_operation text, p_fingerprint text,
    p_event appointment_events
) RETURNS appointment_events
LANGUAGE plpgsql AS $$
BEGIN
    IF p_request_id IS NOT NULL THEN
        INSERT INTO idempotency_keys (actor_id, request_id, operation, fingerprint, event_id)
        VALUES (coalesce(p_actor_id, '00000000-0000-0000-0000-000000000000'),
                p_request_id, p_operation, p_fingerprint, p_event.id);
    END IF;
    RETURN p_event;
END
$$;

-- Stores a failure as the outcome of the request named by p_key (a failure's
-- HINT). True when it is now the stored outcome; false when another copy's
-- outcome was stored first (replay the request to get it). A copy that
-- committed after this statement's snapshot makes it fail with 40001, and
-- the retry replays.
CREATE FUNCTION booking_remember_failure(p_key jsonb, p_reason text, p_detail jsonb)
RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    v_inserted boolean;
BEGIN
    PERFORM booking_require_snapshot_isolation();
    INSERT INTO idempotency_keys (
        actor_id, request_id, operation, fingerprint, error_reason, error_detail)
    VALUES ((p_key->>'actor_id')::uuid, (p_key->>'request_id')::uuid, p_key->>'operation',
            p_key->>'fingerprint', p_reason, p_detail)
    ON CONFLICT (actor_id, request_id) DO NOTHING
    RETURNING TRUE INTO v_inserted;
    RETURN coalesce(v_inserted, FALSE);
END
$$;

-- Forgets up to p_limit keys older than p_retention. SKIP LOCKED lets
-- several replicas prune at once without waiting on each other.
CREATE FUNCTION booking_forget_request_ids(p_retention interval, p_limit integer)
RETURNS integer
LANGUAGE sql AS $$
    WITH doomed AS (
        SELECT actor_id, request_id FROM idempotency_keys
        WHERE created_at < now() - p_retention
        ORDER BY created_at
        LIMIT p_limit
        FOR UPDATE SKIP LOCKED
    ), gone AS (
        DELETE FROM idempotency_keys k USING doomed d
        WHERE k.actor_id = d.actor_id AND k.request_id = d.request_id
        RETURNING 1
    )
    SELECT count(*)::integer FROM gone
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
DECLARE
    v_fp text := md5(concat_ws('|', p_slot_id, p_user_id, p_priority, p_actor_id));
    v_event appointment_events;
    v_slot time_slots;
    v_appt appointments;
BEGIN
    PERFORM booking_require_snapshot_isolation();
    v_event := booking_replay(p_actor_id, p_request_id, 'HoldSlot', v_fp);
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
        PERFORM booking_fail('SLOT_NOT_FOUND', jsonb_build_object('slot_id', p_slot_id));
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
    RETURN booking_remember(p_actor_id, p_request_id, 'HoldSlot', v_fp, v_event);
END
$$;

CREATE OR REPLACE FUNCTION booking_confirm(
    p_id uuid, p_owner_id uuid, p_actor_id uuid, p_request_id uuid
) RETURNS appointment_events
LANGUAGE plpgsql AS $$
DECLARE
    v_fp text := md5(concat_ws('|', p_id, p_owner_id, p_actor_id));
    v_event appointment_events;
    v_appt appointments;
BEGIN
    PERFORM booking_require_snapshot_isolation();
    v_event := booking_replay(p_actor_id, p_request_id, 'ConfirmAppointment', v_fp);
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
    UPDATE time_slots SET status = 'BOOKED' WHERE id = v_appt.time_slot_id;

    v_event := booking_emit_event(v_appt, 'CONFIRMED', 'HOLD', p_actor_id, NULL, NULL);
    RETURN booking_remember(p_actor_id, p_request_id, 'ConfirmAppointment', v_fp, v_event);
END
$$;

CREATE OR REPLACE FUNCTION booking_cancel(
    p_id uuid, p_owner_id uuid, p_actor_id uuid, p_reason text, p_request_id uuid
) RETURNS appointment_events
LANGUAGE plpgsql AS $$
DECLARE
    v_fp text := md5(concat_ws('|', p_id, p_owner_id, p_actor_id, p_reason));
    v_event appointment_events;
    v_appt appointments;
    v_old appointment_status;
BEGIN
    PERFORM booking_require_snapshot_isolation();
    v_event := booking_replay(p_actor_id, p_request_id, 'CancelAppointment', v_fp);
    IF v_event.id IS NOT NULL THEN
        RETURN v_event;
    END IF;

    v_appt := booking_lock_appointment(p_id, p_owner_id);
    v_old := v_appt.status;
    IF v_old NOT IN ('HOLD', 'CONFIRMED') THEN
        PERFORM booking_wrong_state(v_appt, 'cancel');
    END IF;

    UPDATE appointments SET status = 'CANCELLED', expires_at = NULL, updated_at = now()
    WHERE id = p_id RETURNING * INTO v_appt;
    UPDATE time_slots SET status = 'AVAILABLE' WHERE id = v_appt.time_slot_id;

    v_event := booking_emit_event(v_appt, 'CANCELLED', v_old, p_actor_id, p_reason, NULL);
    RETURN booking_remember(p_actor_id, p_request_id, 'CancelAppointment', v_fp, v_event);
END
$$;

CREATE OR REPLACE FUNCTION booking_mark_no_show(
    p_id uuid, p_actor_id uuid, p_request_id uuid
) RETURNS appointment_events
LANGUAGE plpgsql AS $$
DECLARE
    v_fp text := md5(concat_ws('|', p_id, p_actor_id));
    v_event appointment_events;
    v_appt appointments;
    v_start timestamptz;
BEGIN
    PERFORM booking_require_snapshot_isolation();
    v_event := booking_replay(p_actor_id, p_request_id, 'MarkNoShow', v_fp);
    IF v_event.id IS NOT NULL THEN
        RETURN v_event;
    END IF;

    v_appt := booking_lock_appointment(p_id, NULL);
    IF v_appt.status <> 'CONFIRMED' THEN
        PERFORM booking_wrong_state(v_appt, 'mark_no_show');
    END IF;
    SELECT start_time INTO v_start FROM time_slots WHERE id = v_appt.time_slot_id;
    IF v_start > now() THEN
        PERFORM booking_fail('SLOT_NOT_STARTED', jsonb_build_object(
            'appointment_id', p_id, 'start_time', v_start));
    END IF;

    -- The slot stays BOOKED: the time was used up either way.
    UPDATE appointments SET status = 'NO_SHOW', updated_at = now()
    WHERE id = p_id RETURNING * INTO v_appt;

    v_event := booking_emit_event(v_appt, 'NO_SHOW', 'CONFIRMED', p_actor_id, NULL, NULL);
    RETURN booking_remember(p_actor_id, p_request_id, 'MarkNoShow', v_fp, v_event);
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
DECLARE
    v_fp text := md5(concat_ws('|', p_id, p_new_slot_id, p_owner_id, p_actor_id));
    v_event appointment_events;
    v_appt appointments;
    v_old_slot_id uuid;
    v_new time_slots;
BEGIN
    PERFORM booking_require_snapshot_isolation();
    v_event := booking_replay(p_actor_id, p_request_id, 'RescheduleAppointment', v_fp);
    IF v_event.id IS NOT NULL THEN
        RETURN v_event;
    END IF;

    SELECT * INTO v_appt FROM appointments WHERE id = p_id;
    IF v_appt.id IS NULL OR (p_owner_id IS NOT NULL AND v_appt.user_id <> p_owner_id) THEN
        PERFORM booking_fail('APPOINTMENT_NOT_FOUND', jsonb_build_object('appointment_id', p_id));
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
        PERFORM booking_fail('SLOT_NOT_FOUND', jsonb_build_object('slot_id', p_new_slot_id));
    END IF;
    IF v_new.specialist_id <> v_appt.specialist_id THEN
        PERFORM booking_fail('SPECIALIST_MISMATCH', jsonb_build_object(
            'slot_id', p_new_slot_id, 'specialist_id', v_appt.specialist_id));
    END IF;
    PERFORM booking_claim_slot(v_new);
    IF p_check_user_overlap THEN
        PERFORM booking_check_user_overlap(v_appt.user_id, v_new, p_id);
    END IF;

    UPDATE time_slots SET status = 'AVAILABLE' WHERE id = v_old_slot_id;
    UPDATE time_slots
    SET status = CASE WHEN v_appt.status = 'HOLD' THEN 'HOLD' ELSE 'BOOKED' END::timeslot_status
    WHERE id = p_new_slot_id;
    UPDATE appointments SET time_slot_id = p_new_slot_id, updated_at = now()
    WHERE id = p_id RETURNING * INTO v_appt;

    v_event := booking_emit_event(
        v_appt, 'RESCHEDULED', v_appt.status, p_actor_id, NULL, v_old_slot_id);
    RETURN booking_remember(p_actor_id, p_request_id, 'RescheduleAppointment', v_fp, v_event);
END
$$;
