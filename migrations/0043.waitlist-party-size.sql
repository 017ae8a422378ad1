-- depends: 0042.series-transition-request-ids
--
-- A waitlist entry may ask for several seats (docs/seats.md): its
-- party_size (default 1, as every entry so far), and an offer holds that
-- many seats of the slot, all or nothing (the slot's seat count CHECK is
-- the authority). booking_waitlist_claimant_v2 takes the seats there are to
-- offer; booking_create_waitlist_entry_v2 the party size, and the
-- unversioned one (the previous release's call) is a party of one.
-- Expand only: the one-seat claimant stays until the contract migration,
-- since a call begun before this commits may still run a body that calls it.

ALTER TABLE waitlist_entries ADD COLUMN party_size integer NOT NULL DEFAULT 1;
ALTER TABLE waitlist_entries ADD CONSTRAINT waitlist_entries_party_size_positive
    CHECK (party_size >= 1);

-- The queue indexes include the party size, so that choosing an entry
-- still tests it without visiting the table (an index-only scan).
DROP INDEX waitlist_entries_specialist_queue;
CREATE INDEX waitlist_entries_specialist_queue
    ON waitlist_entries (specialist_id, queue_rank, seq)
    INCLUDE (window_start, window_end, id, party_size)
    WHERE status = 'ACTIVE' AND specialist_id IS NOT NULL;
DROP INDEX waitlist_entries_service_queue;
CREATE INDEX waitlist_entries_service_queue
    ON waitlist_entries (service_type, queue_rank, seq)
    INCLUDE (window_start, window_end, id, party_size)
    WHERE status = 'ACTIVE' AND service_type IS NOT NULL;

-- The entry a free slot goes to: the first ACTIVE entry in queue order
-- (URGENT before VIP before NORMAL, then first come), whose window holds the slot, that
-- names the slot's specialist or its service type, and whose user is
-- eligible. NULL if none, or if the slot is not one waiters are offered
-- (deleted, already started, or of an inactive specialist).
--
-- Only entries asking for at most p_seats seats are candidates: an offer
-- holds all of an entry's seats or none, and a larger party waits for a
-- slot with room for it while the smaller ones behind it are served.
--
-- With p_lock (an offer) the entry and its user are locked, SKIP LOCKED,
-- and the user row is updated so that a concurrent HoldSlot of the same
-- user serializes with the offer (see support.sql on booking_lock_user).
-- Without (a search), nothing is locked.
CREATE FUNCTION booking_waitlist_claimant_v2(
    p_slot time_slots, p_lock boolean, p_seats integer
) RETURNS waitlist_entries
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
               AND (w.queue_rank, w.seq) > (v_rank, v_seq) AND w.party_size <= p_seats
               AND tstzrange(w.window_start, w.window_end)
                   @> tstzrange(p_slot.start_time, p_slot.end_time)
             ORDER BY w.queue_rank, w.seq LIMIT 1)
            UNION ALL
            (SELECT w.id, w.queue_rank, w.seq FROM waitlist_entries w
             WHERE w.status = 'ACTIVE' AND w.service_type = v_service_type
               AND (w.queue_rank, w.seq) > (v_rank, v_seq) AND w.party_size <= p_seats
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

-- Offers a free slot's free seats to its claimants, in queue order, each
-- the seats its entry asks for (one unless it asks for more), all or
-- nothing: for each a HOLD for the entry's user at the entry's
-- priority, lasting the entry's offer TTL, and a HELD event naming the
-- entry. Returns the first offer's event, or NULL when nobody is waiting
-- for it. The caller holds the slot's row lock (or has just inserted the
-- slot). With capacity 1 this is one offer at most, as before seats.
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
        v_entry := booking_waitlist_claimant_v2(v_slot, true, v_slot.capacity - v_slot.seats_taken);
        EXIT WHEN v_entry.id IS NULL;

        -- The seats are counted, and the slot's status set, by the trigger
        -- on appointments (seats.sql); its CHECK on the slot keeps the count
        -- within capacity whatever runs at once.
        INSERT INTO appointments (
            id, user_id, specialist_id, time_slot_id, status, priority, expires_at, party_size)
        VALUES (gen_random_uuid(), v_entry.user_id, v_slot.specialist_id, p_slot_id, 'HOLD',
                v_entry.priority, now() + v_entry.offer_ttl, v_entry.party_size)
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

-- Whether HoldSlot would find a seat of this slot free: one is free now,
-- or every seat is taken but some by holds that have lapsed, and no waiter
-- would be offered them on reclaim.
CREATE OR REPLACE FUNCTION booking_slot_is_free(p_slot time_slots) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    v_lapsed integer;
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
    SELECT coalesce(sum(party_size), 0) INTO v_lapsed FROM appointments
    WHERE time_slot_id = p_slot.id AND status = 'HOLD' AND expires_at <= now();
    IF v_lapsed = 0 THEN
        RETURN false;
    END IF;
    RETURN (booking_waitlist_claimant_v2(
        p_slot, false, p_slot.capacity - p_slot.seats_taken + v_lapsed)).id IS NULL;
END
$$;

-- Joins the waitlist. With a request id (requests.sql), a repeat of the
-- same request returns the entry the first one created, or its failure;
-- other parameters under the same id are REQUEST_ID_REUSED. A party of one
-- adds nothing to the fingerprint (concat_ws skips the NULL), so ids stored
-- before entries had a party size keep replaying.
CREATE FUNCTION booking_create_waitlist_entry_v2(
    p_user_id uuid,
    p_specialist_id uuid,
    p_service_type text,
    p_window_start timestamptz,
    p_window_end timestamptz,
    p_priority appointment_priority,
    p_offer_ttl interval,
    p_actor_id uuid,
    p_request_id uuid,
    p_party_size integer
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
                p_service_type, p_window_start, p_window_end, p_priority)
                || nullif(p_party_size, 1)::text);
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
        offer_ttl, created_by, request_id, party_size)
    VALUES (gen_random_uuid(), p_user_id, p_specialist_id, p_service_type, p_window_start,
            p_window_end, p_priority, p_offer_ttl, p_actor_id, p_request_id, p_party_size)
    RETURNING * INTO v_entry;
    PERFORM booking_finish_request_result(jsonb_build_object('waitlist_entry_id', v_entry.id));
    RETURN v_entry;
END
$$;

-- The previous release's call: a party of one.
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
LANGUAGE sql
RETURN booking_create_waitlist_entry_v2(p_user_id, p_specialist_id, p_service_type,
    p_window_start, p_window_end, p_priority, p_offer_ttl, p_actor_id, p_request_id, 1);
