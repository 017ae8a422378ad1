-- depends: 0031.webhooks
--
-- Durability across failover (storage/durability.py): booking_sync_barrier(),
-- a transaction's way to wait until every commit it can see is on the
-- synchronous standbys, and the request-id replay (every operation's:
-- transitions, waitlist entries, materialisations) calls it before it
-- answers, so a retry never answers OK for a commit that was made visible
-- without the standbys (its wait cancelled). Same signature.

CREATE FUNCTION booking_sync_barrier() RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('synchronous_standby_names') <> '' THEN
        -- Transactional: it takes an xid and WAL, so the commit waits.
        PERFORM pg_logical_emit_message(true, 'booking_sync_barrier', '');
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION booking_request_outcome(
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
