-- The waitlist: users waiting for a slot of a specialist, or of any
-- specialist of a service type, within a time window. When a slot becomes
-- free (booking_release_slot) or is created (booking_slot_created), the
-- first waiter entitled to it gets a HOLD on it in the same transaction
-- (booking_offer_slot). docs/waitlist.md describes the states and the rules.
--
-- Locks: the offer runs with the slot's row lock held (and, for a cancel,
-- the appointment's). It then takes an entry row and a user row, both with
-- SKIP LOCKED: an offer never waits for a lock, so it can close no cycle
-- with a HoldSlot that holds a user and waits for this slot. An entry or
-- user that is locked right now is passed over for this slot only.

CREATE TYPE waitlist_entry_status AS ENUM (
    'ACTIVE', 'OFFERED', 'FULFILLED', 'CANCELLED', 'DECLINED', 'LAPSED', 'EXPIRED');

CREATE TABLE waitlist_entries (
    id              uuid PRIMARY KEY,
    -- First come, first served within a priority: the order entries were
    -- created in, without ties.
    seq             bigint GENERATED ALWAYS AS IDENTITY,
    user_id         uuid NOT NULL REFERENCES users (id),
    -- Exactly one of the two: this specialist's slots, or any active
    -- specialist's of this service type.
    specialist_id   uuid REFERENCES specialists (id),
    service_type    text,
    window_start    timestamptz NOT NULL,
    window_end      timestamptz NOT NULL,
    priority        appointment_priority NOT NULL,
    -- The queue order of the priority, URGENT first: ascending, so that
    -- (queue_rank, seq) is one ascending key a scan can resume from.
    queue_rank      smallint NOT NULL GENERATED ALWAYS AS (
        CASE priority WHEN 'URGENT' THEN 0 WHEN 'VIP' THEN 1 ELSE 2 END) STORED,
    status          waitlist_entry_status NOT NULL DEFAULT 'ACTIVE',
    -- How long an offer's hold lasts: the server's setting when the entry
    -- was created, so every replica offers it alike.
    offer_ttl       interval NOT NULL,
    -- The offered appointment, from OFFERED on.
    appointment_id  uuid REFERENCES appointments (id),
    created_by      uuid NOT NULL,
    -- The request id that created it, if any; its replay is the request's
    -- key (requests.sql), forgotten after the request-id retention.
    request_id      uuid,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    -- The seats an offer holds, all or nothing (docs/seats.md).
    party_size      integer NOT NULL DEFAULT 1,

    CONSTRAINT waitlist_entries_window CHECK (window_start < window_end),
    CONSTRAINT waitlist_entries_party_size_positive CHECK (party_size >= 1),
    CONSTRAINT waitlist_entries_one_target
        CHECK ((specialist_id IS NULL) <> (service_type IS NULL)),
    CONSTRAINT waitlist_entries_offer_iff_offered CHECK (
        (appointment_id IS NULL) = (status IN ('ACTIVE', 'CANCELLED', 'EXPIRED'))),
    CONSTRAINT waitlist_entries_offer_ttl_positive CHECK (offer_ttl > interval '0')
);

-- The choice of entry for a slot: ACTIVE entries of the slot's specialist
-- and of its service type, each in queue order, merged (docs/waitlist.md
-- shows the plan). The window, id and party size are included so that the
-- scan tests an entry's window and seats without visiting the table.
CREATE INDEX waitlist_entries_specialist_queue
    ON waitlist_entries (specialist_id, queue_rank, seq)
    INCLUDE (window_start, window_end, id, party_size)
    WHERE status = 'ACTIVE' AND specialist_id IS NOT NULL;
CREATE INDEX waitlist_entries_service_queue
    ON waitlist_entries (service_type, queue_rank, seq)
    INCLUDE (window_start, window_end, id, party_size)
    WHERE status = 'ACTIVE' AND service_type IS NOT NULL;
-- An appointment is the offer of at most one entry; confirming or
-- cancelling it finds the entry here, and so does an event reader naming
-- the entry of an offer's HELD event.
CREATE UNIQUE INDEX waitlist_entries_offer
    ON waitlist_entries (appointment_id) WHERE appointment_id IS NOT NULL;
CREATE INDEX waitlist_entries_window_end ON waitlist_entries (window_end) WHERE status = 'ACTIVE';
CREATE INDEX waitlist_entries_user ON waitlist_entries (user_id, created_at, id);
CREATE INDEX waitlist_entries_created ON waitlist_entries (created_at, id);

-- Whether this user may hold this slot now, beyond the slot being free and
-- the user being active: the one place booking policies (notice, advance
-- limits) are checked for waitlist offers and for SearchAvailableSlots. A
-- CLIENT is bound by the booking window (policies.sql); staff are exempt,
-- as they are from HoldSlot's check.
CREATE FUNCTION booking_may_hold(p_user_id uuid, p_slot time_slots) RETURNS boolean
LANGUAGE sql STABLE
RETURN coalesce((SELECT u.role <> 'CLIENT' FROM users u WHERE u.id = p_user_id), false)
    OR booking_client_may_hold(p_slot);

-- Whether the user could take the slot as HoldSlot would let them: active,
-- no overlapping live appointment (booking_check_user_overlap, the rule
-- HoldSlot applies) and allowed by booking_may_hold.
CREATE FUNCTION booking_waitlist_user_eligible(p_user_id uuid, p_slot time_slots)
RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT coalesce((SELECT is_active FROM users WHERE id = p_user_id), false) THEN
        RETURN false;
    END IF;
    BEGIN
        PERFORM booking_check_user_overlap(p_user_id, p_slot, NULL);
    EXCEPTION WHEN SQLSTATE 'BK001' THEN
        RETURN false;
    END;
    RETURN booking_may_hold(p_user_id, p_slot);
END
$$;

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
CREATE FUNCTION booking_offer_slot(p_slot_id uuid) RETURNS appointment_events
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

-- Called once for every slot created, in the transaction that inserts it,
-- by whatever creates slots (booking_insert_slots in slots.sql, and any
-- future path): a new slot is offered to waiters like a freed one.
CREATE FUNCTION booking_slot_created(p_slot_id uuid) RETURNS appointment_events
LANGUAGE plpgsql AS $$
BEGIN
    RETURN booking_offer_slot(p_slot_id);
END
$$;

-- Whether HoldSlot would find a seat of this slot free: one is free now,
-- or every seat is taken but some by holds that have lapsed, and no waiter
-- would be offered them on reclaim.
CREATE FUNCTION booking_slot_is_free(p_slot time_slots) RETURNS boolean
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

-- When an offered hold ends, so does its entry: confirmed is FULFILLED,
-- cancelled before it lapsed is DECLINED, lapsed is LAPSED. It runs in the
-- transaction that changes the appointment, before the slot is released,
-- so the slot goes on to the next waiter, not back to this one.
CREATE FUNCTION booking_waitlist_offer_settled() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE waitlist_entries
    SET status = CASE
            WHEN NEW.status = 'CONFIRMED' THEN 'FULFILLED'
            WHEN OLD.expires_at <= now() THEN 'LAPSED'
            ELSE 'DECLINED'
        END::waitlist_entry_status,
        updated_at = now()
    WHERE appointment_id = NEW.id AND status = 'OFFERED';
    RETURN NULL;
END
$$;

CREATE TRIGGER appointments_waitlist_offer_settled
    AFTER UPDATE OF status ON appointments
    FOR EACH ROW WHEN (OLD.status = 'HOLD' AND NEW.status <> 'HOLD')
    EXECUTE FUNCTION booking_waitlist_offer_settled();

-- The parameters that identify a CreateWaitlistEntry request (its
-- fingerprint, requests.sql). One of specialist and service type is NULL,
-- so each is given as '' then; instants as epoch seconds, whatever the
-- session's time zone.
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
CREATE FUNCTION booking_create_waitlist_entry(
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

-- ACTIVE -> CANCELLED. An OFFERED entry is settled through its appointment
-- (confirm or cancel it), so cancelling it here is WAITLIST_ENTRY_WRONG_STATE.
-- p_owner_id NULL means any owner; a foreign entry looks like a missing one.
CREATE FUNCTION booking_cancel_waitlist_entry(p_id uuid, p_owner_id uuid)
RETURNS waitlist_entries
LANGUAGE plpgsql AS $$
DECLARE
    v_transition constant text := 'cancel';
    v_entry waitlist_entries;
BEGIN
    PERFORM booking_require_snapshot_isolation();
    SELECT * INTO v_entry FROM waitlist_entries WHERE id = p_id FOR UPDATE;
    IF v_entry.id IS NULL OR (p_owner_id IS NOT NULL AND v_entry.user_id <> p_owner_id) THEN
        PERFORM booking_fail('WAITLIST_ENTRY_NOT_FOUND', jsonb_build_object('id', p_id));
    END IF;
    IF v_entry.status <> 'ACTIVE' THEN
        PERFORM booking_fail('WAITLIST_ENTRY_WRONG_STATE', jsonb_build_object(
            'entry_id', p_id, 'status', v_entry.status, 'transition', v_transition));
    END IF;
    UPDATE waitlist_entries SET status = 'CANCELLED', updated_at = now()
    WHERE id = p_id
    RETURNING * INTO v_entry;
    RETURN v_entry;
END
$$;

-- ACTIVE entries whose window has ended become EXPIRED, up to p_limit at a
-- time; returns how many. SKIP LOCKED lets replicas sweep at once.
CREATE FUNCTION booking_expire_waitlist_entries(p_limit integer) RETURNS integer
LANGUAGE sql AS $$
    WITH doomed AS (
        SELECT id FROM waitlist_entries
        WHERE status = 'ACTIVE' AND window_end <= now()
        ORDER BY window_end
        LIMIT p_limit
        FOR UPDATE SKIP LOCKED
    ), done AS (
        UPDATE waitlist_entries w SET status = 'EXPIRED', updated_at = now()
        FROM doomed d WHERE w.id = d.id
        RETURNING 1
    )
    SELECT count(*)::integer FROM done
$$;
