-- Back to a request-id mechanism each for the waitlist and schedules. The
-- waitlist's ids are back on its entries; materialisation reports stored as
-- keys are not moved back (a repeated request then materialises again,
-- which skips the slots that exist).

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

CREATE UNIQUE INDEX waitlist_entries_request
    ON waitlist_entries (created_by, request_id) WHERE request_id IS NOT NULL;

CREATE OR REPLACE FUNCTION booking_create_waitlist_entry(
    p_user_id uuid,
    p_specialist_id uuid,
    p_service_type text,
    p_window_start timestamptz,
    p_window_end timestamptz,
    p_priority appointment_priority,
    p_offer_ttl interval,
    p_actor_id uuid,
    p_request_id uuid
) RETURNS waitlist_entries
LANGUAGE plpgsql AS $$
DECLARE
    v_operation constant text := 'CreateWaitlistEntry';
    v_entry waitlist_entries;
    v_user users;
    v_specialist specialists;
BEGIN
    PERFORM booking_require_snapshot_isolation();
    IF p_request_id IS NOT NULL THEN
        SELECT * INTO v_entry FROM waitlist_entries
        WHERE created_by = p_actor_id AND request_id = p_request_id;
        IF FOUND THEN
            IF (v_entry.user_id, v_entry.specialist_id, v_entry.service_type,
                v_entry.window_start, v_entry.window_end, v_entry.priority)
               IS DISTINCT FROM (p_user_id, p_specialist_id, p_service_type,
                                 p_window_start, p_window_end, p_priority) THEN
                PERFORM booking_fail('REQUEST_ID_REUSED', jsonb_build_object(
                    'request_id', p_request_id, 'operation', v_operation));
            END IF;
            RETURN v_entry;
        END IF;
    END IF;

    SELECT * INTO v_user FROM users WHERE id = p_user_id;
    IF v_user.id IS NULL THEN
        PERFORM booking_fail('USER_NOT_FOUND', jsonb_build_object('id', p_user_id));
    END IF;
    IF NOT v_user.is_active THEN
        PERFORM booking_fail('USER_INACTIVE', jsonb_build_object('user_id', p_user_id));
    END IF;
    IF p_specialist_id IS NOT NULL THEN
        SELECT * INTO v_specialist FROM specialists WHERE id = p_specialist_id;
        IF v_specialist.id IS NULL THEN
            PERFORM booking_fail('SPECIALIST_NOT_FOUND', jsonb_build_object('id', p_specialist_id));
        END IF;
        IF NOT v_specialist.is_active THEN
            PERFORM booking_fail('SPECIALIST_INACTIVE', jsonb_build_object(
                'specialist_id', p_specialist_id));
        END IF;
    END IF;

    INSERT INTO waitlist_entries (
        id, user_id, specialist_id, service_type, window_start, window_end, priority,
        offer_ttl, created_by, request_id)
    VALUES (gen_random_uuid(), p_user_id, p_specialist_id, p_service_type, p_window_start,
            p_window_end, p_priority, p_offer_ttl, p_actor_id, p_request_id)
    RETURNING * INTO v_entry;
    RETURN v_entry;
END
$$;

CREATE OR REPLACE FUNCTION booking_begin_request(
    p_operation text, p_actor_id uuid, p_request_id uuid, VARIADIC p_params text[]
) RETURNS appointment_events
LANGUAGE plpgsql AS $$
DECLARE
    v_actor uuid;
    v_fingerprint text;
    v_key idempotency_keys;
    v_event appointment_events;
BEGIN
    -- Every transition starts here, so the common case is kept cheap: the
    -- isolation is tested inline (a PERFORM is a query of its own, run only
    -- to raise the error), and a request without an id computes no key.
    IF current_setting('transaction_isolation') NOT IN ('repeatable read', 'serializable') THEN
        PERFORM booking_require_snapshot_isolation();
    END IF;
    IF p_request_id IS NULL THEN
        RETURN NULL;
    END IF;
    v_actor := booking_request_actor(p_actor_id);
    v_fingerprint := md5(concat_ws('|', VARIADIC p_params));
    SELECT * INTO v_key FROM idempotency_keys
    WHERE actor_id = v_actor AND request_id = p_request_id;
    IF NOT FOUND THEN
        PERFORM set_config('booking.request_key', jsonb_build_object(
            'actor_id', v_actor, 'request_id', p_request_id,
            'operation', p_operation, 'fingerprint', v_fingerprint)::text, true);
        RETURN NULL;
    END IF;
    IF v_key.operation <> p_operation OR v_key.fingerprint <> v_fingerprint THEN
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

DROP FUNCTION booking_waitlist_request_params(
    uuid, uuid, text, timestamptz, timestamptz, appointment_priority);
DROP FUNCTION booking_finish_request_result(jsonb);
DROP FUNCTION booking_request_outcome(text, uuid, uuid, text[]);

DELETE FROM idempotency_keys WHERE result IS NOT NULL;
ALTER TABLE idempotency_keys DROP CONSTRAINT idempotency_keys_one_outcome;
ALTER TABLE idempotency_keys ADD CONSTRAINT idempotency_keys_one_outcome
    CHECK ((event_id IS NULL) <> (error_reason IS NULL));
ALTER TABLE idempotency_keys DROP COLUMN result;
