-- Undoes 0040.sync-barrier: the replay without a barrier, and no barrier.

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
    RETURN v_key;
END
$$;

DROP FUNCTION booking_sync_barrier();
