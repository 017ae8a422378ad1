-- Undoes 0043.waitlist-party-size: entries of one seat each (the party
-- sizes are forgotten; an entry's offer already made keeps its seats).

CREATE OR REPLACE FUNCTION booking_offer_slot(p_slot_id uuid) RETURNS appointment_events
LANGUAGE plpgsql AS $$
DECLARE
    v_slot time_slots;
    v_entry waitlist_entries;
    v_appt appointments;
    v_event appointment_events;
    v_first appointment_events;
BEGIN
    LOOP
        SELECT * INTO v_slot FROM time_slots WHERE id = p_slot_id AND status = 'AVAILABLE';
        EXIT WHEN v_slot.id IS NULL;
        -- A slot a buffer blocks is offered to nobody (buffers.sql); a
        -- lapsed hold in the way counts, as the constraint counts it.
        EXIT WHEN (booking_buffer_conflict(v_slot, NULL, true)).id IS NOT NULL;
        v_entry := booking_waitlist_claimant(v_slot, true);
        EXIT WHEN v_entry.id IS NULL;

        -- The seat is counted, and the slot's status set, by the trigger on
        -- appointments (seats.sql).
        INSERT INTO appointments (
            id, user_id, specialist_id, time_slot_id, status, priority, expires_at)
        VALUES (gen_random_uuid(), v_entry.user_id, v_slot.specialist_id, p_slot_id, 'HOLD',
                v_entry.priority, now() + v_entry.offer_ttl)
        RETURNING * INTO v_appt;
        UPDATE waitlist_entries
        SET status = 'OFFERED', appointment_id = v_appt.id, updated_at = now()
        WHERE id = v_entry.id;

        -- The server makes the offer (no actor). Readers find the entry of a
        -- HELD event through waitlist_entries.appointment_id (storage/events.py).
        v_event := booking_emit_event(v_appt, 'HELD', NULL, NULL, NULL, NULL);
        IF v_first.id IS NULL THEN
            v_first := v_event;
        END IF;
    END LOOP;
    RETURN v_first;
END
$$;

CREATE OR REPLACE FUNCTION booking_slot_is_free(p_slot time_slots) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    IF p_slot.deleted_at IS NOT NULL THEN
        RETURN false;
    END IF;
    IF p_slot.seats_taken < p_slot.capacity THEN
        RETURN true;
    END IF;
    IF p_slot.seats_held = 0 THEN
        RETURN false;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM appointments
                   WHERE time_slot_id = p_slot.id AND status = 'HOLD'
                     AND expires_at <= now()) THEN
        RETURN false;
    END IF;
    RETURN (booking_waitlist_claimant(p_slot, false)).id IS NULL;
END
$$;

DROP FUNCTION booking_waitlist_claimant_v2(time_slots, boolean, integer);

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

DROP FUNCTION booking_create_waitlist_entry_v2(
    uuid, uuid, text, timestamptz, timestamptz, appointment_priority, interval, uuid, uuid,
    integer);
DROP INDEX waitlist_entries_specialist_queue;
CREATE INDEX waitlist_entries_specialist_queue
    ON waitlist_entries (specialist_id, queue_rank, seq)
    INCLUDE (window_start, window_end, id)
    WHERE status = 'ACTIVE' AND specialist_id IS NOT NULL;
DROP INDEX waitlist_entries_service_queue;
CREATE INDEX waitlist_entries_service_queue
    ON waitlist_entries (service_type, queue_rank, seq)
    INCLUDE (window_start, window_end, id)
    WHERE status = 'ACTIVE' AND service_type IS NOT NULL;
ALTER TABLE waitlist_entries DROP COLUMN party_size;
