-- Request ids (AIP-155): every copy of a request gets one answer.
--
-- One mechanism for every operation that takes a request id: the
-- appointment transitions, CreateWaitlistEntry, MaterializeSchedule and
-- HoldSeries.
-- A key is (caller, request id): one caller's ids can neither collide with
-- nor reveal another's. It stores the first outcome of a request that began
-- executing: the event of a transition's success, the result of another
-- operation's success (a waitlist entry's id, a materialisation's report,
-- a series' id),
-- or the reason and detail of a business failure. Keys are forgotten after
-- one retention period (booking_forget_request_ids, run by the sweeper).
--
-- Every such operation starts with booking_request_outcome (a transition
-- through booking_begin_request) and ends with booking_finish_request (an
-- event) or booking_finish_request_result (any other result); the replay
-- logic and the fingerprint rule live only here.

-- The server acting on its own (no actor) is one caller: the nil uuid.
CREATE FUNCTION booking_request_actor(p_actor_id uuid) RETURNS uuid
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN coalesce(p_actor_id, '00000000-0000-0000-0000-000000000000'::uuid);

-- The outcome a caller's request id already has: its key, when the id
-- already succeeded (event_id or result set); the failure it already
-- produced, raised again; or NULL when the request is new. A new request's
-- key is kept for the rest of the transaction: booking_fail names it in a
-- failure's HINT (so storage/ can remember the failure), and the finish
-- functions below store the success. p_params are the request's parameters
-- as text: the same id with other parameters is REQUEST_ID_REUSED (NULL
-- parameters are skipped, so pass coalesce(x, '') where one may be NULL and
-- another not).
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
    -- A replay answers OK for a commit that may have been made visible
    -- without the synchronous standbys (its wait cancelled): this
    -- transaction's own commit then waits for them (durability.sql). A
    -- replayed failure has aborted this transaction; storage/requests.py
    -- runs the barrier after it.
    PERFORM booking_sync_barrier();
    RETURN v_key;
END
$$;

-- Starts a transition: booking_request_outcome, answering with the event a
-- caller's request id already produced, or NULL when the request is new.
CREATE FUNCTION booking_begin_request(
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

-- Ends a transition that succeeded: remembers its event under the request's
-- key, if it has one, and returns the event.
CREATE FUNCTION booking_finish_request(p_event appointment_events)
RETURNS appointment_events
LANGUAGE plpgsql AS $$
DECLARE
    v_key jsonb := nullif(current_setting('booking.request_key', true), '')::jsonb;
BEGIN
    IF v_key IS NOT NULL THEN
        INSERT INTO idempotency_keys (actor_id, request_id, operation, fingerprint, event_id)
        VALUES ((v_key->>'actor_id')::uuid, (v_key->>'request_id')::uuid,
                v_key->>'operation', v_key->>'fingerprint', p_event.id);
    END IF;
    RETURN p_event;
END
$$;

-- Ends a request whose success is not an event (a waitlist entry, a
-- materialisation's report): remembers p_result under the request's key, if
-- it has one, and returns it. A copy that stored first makes this fail on
-- the key (idempotency_keys_pkey), and Database.run's retry replays.
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

-- The answer of a hold that was not let near the slot: the server refused
-- it because, while it waited, another hold of the slot committed
-- (storage/flights.py). With a request id it gets the answer the hold itself
-- would give: a replay of the id's first outcome, or SLOT_UNAVAILABLE,
-- remembered as the id's outcome like any refusal. The parameters behind the
-- key are booking_hold_slot's, so a later copy that reaches the slot replays
-- this answer, and a copy with other parameters is REQUEST_ID_REUSED.
CREATE FUNCTION booking_refuse_hold(
    p_slot_id uuid,
    p_user_id uuid,
    p_priority appointment_priority,
    p_actor_id uuid,
    p_request_id uuid,
    p_status text
) RETURNS appointment_events
LANGUAGE plpgsql AS $$
DECLARE
    v_event appointment_events;
BEGIN
    v_event := booking_begin_request('HoldSlot', p_actor_id, p_request_id,
        p_slot_id::text, p_user_id::text, p_priority::text, p_actor_id::text);
    IF v_event.id IS NOT NULL THEN
        RETURN v_event;
    END IF;
    PERFORM booking_fail('SLOT_UNAVAILABLE', jsonb_build_object(
        'slot_id', p_slot_id, 'status', p_status));
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
