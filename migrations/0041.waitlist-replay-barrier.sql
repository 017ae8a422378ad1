-- depends: 0040.sync-barrier
--
-- A replayed CreateWaitlistEntry request id answers only once the entry is
-- on the synchronous standbys (storage/sql/durability.sql). Same signature.

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
            -- A replay: only once the entry is on the synchronous standbys
            -- (durability.sql).
            PERFORM booking_sync_barrier();
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
