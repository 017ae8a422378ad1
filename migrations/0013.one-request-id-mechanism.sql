-- depends: 0012.history-indexes
--
-- One request-id mechanism (storage/sql/requests.sql): CreateWaitlistEntry
-- and MaterializeSchedule keep their request ids in idempotency_keys, as
-- the transitions do, with the same replay (success and failure), the same
-- per-caller scope and the same retention. A success that is not an event
-- is the key's `result`. Existing waitlist request ids and materialisation
-- reports become keys, so they keep replaying; the unique index and the
-- table that held them go (no previous release used either).

ALTER TABLE idempotency_keys ADD COLUMN result jsonb;
ALTER TABLE idempotency_keys DROP CONSTRAINT idempotency_keys_one_outcome;
ALTER TABLE idempotency_keys ADD CONSTRAINT idempotency_keys_one_outcome
    CHECK (num_nonnulls(event_id, result, error_reason) = 1) NOT VALID;
ALTER TABLE idempotency_keys VALIDATE CONSTRAINT idempotency_keys_one_outcome;

CREATE FUNCTION booking_request_outcome(
    p_operation text, p_actor_id uuid, p_request_id uuid, VARIADIC p_params text[]
) RETURNS idempotency_keys
LANGUAGE plpgsql AS $$
DECLARE
    v_actor uuid := booking_request_actor(p_actor_id);
    v_fingerprint text := md5(concat_ws('|', VARIADIC p_params));
    v_key idempotency_keys;
BEGIN
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
    IF v_key.error_reason IS NOT NULL THEN
        PERFORM booking_fail(v_key.error_reason, v_key.error_detail);
    END IF;
    RETURN v_key;
END
$$;

CREATE OR REPLACE FUNCTION booking_begin_request(
    p_operation text, p_actor_id uuid, p_request_id uuid, VARIADIC p_params text[]
) RETURNS appointment_events
LANGUAGE plpgsql AS $$
DECLARE
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
    v_key := booking_request_outcome(p_operation, p_actor_id, p_request_id, VARIADIC p_params);
    IF v_key.event_id IS NULL THEN
        RETURN NULL;
    END IF;
    SELECT * INTO v_event FROM appointment_events WHERE id = v_key.event_id;
    RETURN v_event;
END
$$;

CREATE FUNCTION booking_finish_request_result(p_result jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_key jsonb := nullif(current_setting('booking.request_key', true), '')::jsonb;
BEGIN
    IF v_key IS NOT NULL THEN
        INSERT INTO idempotency_keys (actor_id, request_id, operation, fingerprint, result)
        VALUES ((v_key->>'actor_id')::uuid, (v_key->>'request_id')::uuid,
                v_key->>'operation', v_key->>'fingerprint', p_result);
    END IF;
    RETURN p_result;
END
$$;

CREATE FUNCTION booking_waitlist_request_params(
    p_user_id uuid,
    p_specialist_id uuid,
    p_service_type text,
    p_window_start timestamptz,
    p_window_end timestamptz,
    p_priority appointment_priority
) RETURNS text[]
LANGUAGE sql STABLE PARALLEL SAFE
RETURN ARRAY[p_user_id::text, coalesce(p_specialist_id::text, ''), coalesce(p_service_type, ''),
             extract(epoch FROM p_window_start)::text, extract(epoch FROM p_window_end)::text,
             p_priority::text];

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
    v_key idempotency_keys;
    v_entry waitlist_entries;
    v_user users;
    v_specialist specialists;
BEGIN
    PERFORM booking_require_snapshot_isolation();
    IF p_request_id IS NOT NULL THEN
        v_key := booking_request_outcome('CreateWaitlistEntry', p_actor_id, p_request_id,
            VARIADIC booking_waitlist_request_params(p_user_id, p_specialist_id,
                p_service_type, p_window_start, p_window_end, p_priority));
        IF v_key.result IS NOT NULL THEN
            SELECT * INTO v_entry FROM waitlist_entries
            WHERE id = (v_key.result->>'waitlist_entry_id')::uuid;
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
    PERFORM booking_finish_request_result(jsonb_build_object('waitlist_entry_id', v_entry.id));
    RETURN v_entry;
END
$$;

INSERT INTO idempotency_keys (actor_id, request_id, operation, fingerprint, result, created_at)
SELECT booking_request_actor(created_by), request_id, 'CreateWaitlistEntry',
       md5(concat_ws('|', VARIADIC booking_waitlist_request_params(
           user_id, specialist_id, service_type, window_start, window_end, priority))),
       jsonb_build_object('waitlist_entry_id', id), created_at
FROM waitlist_entries WHERE request_id IS NOT NULL
ON CONFLICT (actor_id, request_id) DO NOTHING;

-- The reports' fingerprints were md5('<specialist>|<first>|<end>'), which is
-- what booking_request_outcome computes from those three parameters.
INSERT INTO idempotency_keys (actor_id, request_id, operation, fingerprint, result, created_at)
SELECT actor_id, request_id, 'MaterializeSchedule', fingerprint, report, created_at
FROM schedule_runs
ON CONFLICT (actor_id, request_id) DO NOTHING;

DROP INDEX waitlist_entries_request;
DROP FUNCTION booking_forget_schedule_runs(interval, integer);
DROP TABLE schedule_runs;
