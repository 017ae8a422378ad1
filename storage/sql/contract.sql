-- What only an earlier release calls, kept while it may still be running
-- during a rolling upgrade (expand, then contract: docs/upgrades.md).
--
-- The wrappers v0.2.0 called (booking_hold_slot, booking_cancel,
-- booking_reschedule) and the old generations of the request-id functions
-- were dropped by the contract migration. A function whose signature
-- changes gets a versioned name; its old version moves here, and the next
-- release's contract migration drops it.

-- The hold as the release before seats calls it: one seat, through the
-- same code as this release's holds (seats.sql).
CREATE FUNCTION booking_hold_slot_v2(
    p_slot_id uuid,
    p_user_id uuid,
    p_priority appointment_priority,
    p_actor_id uuid,
    p_hold_ttl interval,
    p_check_user_overlap boolean,
    p_request_id uuid,
    p_policy_exempt boolean
) RETURNS appointment_events
LANGUAGE plpgsql AS $$
BEGIN
    RETURN booking_hold_slot_v3(
        p_slot_id => p_slot_id, p_user_id => p_user_id, p_priority => p_priority,
        p_actor_id => p_actor_id, p_hold_ttl => p_hold_ttl,
        p_check_user_overlap => p_check_user_overlap, p_request_id => p_request_id,
        p_policy_exempt => p_policy_exempt, p_party_size => 1);
END
$$;
