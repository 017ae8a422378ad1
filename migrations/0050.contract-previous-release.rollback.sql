-- The functions the previous releases called, as storage/sql/contract.sql
-- had them before the contract migration.

CREATE FUNCTION booking_replay(p_request_id uuid, p_operation text, p_fingerprint text)
RETURNS appointment_events
LANGUAGE plpgsql AS $$
DECLARE
    v_key idempotency_keys;
    v_event appointment_events;
BEGIN
    IF p_request_id IS NULL THEN
        RETURN NULL;
    END IF;
    SELECT * INTO v_key FROM idempotency_keys WHERE request_id = p_request_id;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF v_key.operation <> p_operation OR v_key.fingerprint <> p_fingerprint THEN
        PERFORM booking_fail('REQUEST_ID_REUSED', jsonb_build_object(
            'request_id', p_request_id, 'operation', v_key.operation));
    END IF;
    SELECT * INTO v_event FROM appointment_events WHERE id = v_key.event_id;
    RETURN v_event;
END
$$;

CREATE FUNCTION booking_remember(
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

-- The transitions as the previous release calls them, before booking
-- policies (policies.sql). It cannot say whether its caller is exempt, so
-- the actor's role decides, by the rule service/policy.py states for this
-- release: staff (and the server itself, no actor) are exempt, a CLIENT is
-- not. So a previous-release replica still enforces the limits.
CREATE FUNCTION booking_policy_exempt_actor(p_actor_id uuid) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT coalesce((SELECT role <> 'CLIENT' FROM users WHERE id = p_actor_id), true)
$$;

CREATE FUNCTION booking_hold_slot(
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

CREATE FUNCTION booking_cancel(
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

CREATE FUNCTION booking_reschedule(
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

-- The one-seat waitlist claimant, as the seats' migration left it.
CREATE FUNCTION booking_waitlist_claimant(p_slot time_slots, p_lock boolean)
RETURNS waitlist_entries
LANGUAGE plpgsql AS $$
DECLARE
    v_service_type text;
    v_candidate record;
    v_rank smallint := -1;
    v_seq bigint := 0;
    v_entry waitlist_entries;
BEGIN
    IF p_slot.deleted_at IS NOT NULL OR p_slot.start_time <= now() THEN
        RETURN NULL;
    END IF;
    SELECT service_type INTO v_service_type FROM specialists
    WHERE id = p_slot.specialist_id AND is_active;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    -- One candidate at a time, each scan resuming after the last: with
    -- LIMIT 1 the plan is always the queue indexes' order, however many
    -- entries wait. The window test is range containment, so that no index
    -- on the window can lure the planner away from that order.
    LOOP
        SELECT q.id, q.queue_rank, q.seq INTO v_candidate FROM (
            (SELECT w.id, w.queue_rank, w.seq FROM waitlist_entries w
             WHERE w.status = 'ACTIVE' AND w.specialist_id = p_slot.specialist_id
               AND (w.queue_rank, w.seq) > (v_rank, v_seq)
               AND tstzrange(w.window_start, w.window_end)
                   @> tstzrange(p_slot.start_time, p_slot.end_time)
             ORDER BY w.queue_rank, w.seq LIMIT 1)
            UNION ALL
            (SELECT w.id, w.queue_rank, w.seq FROM waitlist_entries w
             WHERE w.status = 'ACTIVE' AND w.service_type = v_service_type
               AND (w.queue_rank, w.seq) > (v_rank, v_seq)
               AND tstzrange(w.window_start, w.window_end)
                   @> tstzrange(p_slot.start_time, p_slot.end_time)
             ORDER BY w.queue_rank, w.seq LIMIT 1)
        ) q
        ORDER BY q.queue_rank, q.seq
        LIMIT 1;
        EXIT WHEN NOT FOUND;
        v_rank := v_candidate.queue_rank;
        v_seq := v_candidate.seq;
        IF p_lock THEN
            SELECT * INTO v_entry FROM waitlist_entries
            WHERE id = v_candidate.id AND status = 'ACTIVE'
            FOR UPDATE SKIP LOCKED;
            CONTINUE WHEN v_entry.id IS NULL;
            PERFORM 1 FROM users WHERE id = v_entry.user_id FOR NO KEY UPDATE SKIP LOCKED;
            CONTINUE WHEN NOT FOUND;
            UPDATE users SET updated_at = updated_at WHERE id = v_entry.user_id;
        ELSE
            SELECT * INTO v_entry FROM waitlist_entries WHERE id = v_candidate.id;
        END IF;
        IF booking_waitlist_user_eligible(v_entry.user_id, p_slot) THEN
            RETURN v_entry;
        END IF;
    END LOOP;
    RETURN NULL;
END
$$;
