-- Back to 0008: no waitlist; a released slot is simply AVAILABLE again.
-- Holds offered to waiters stay as they are (ordinary holds). Locks are
-- taken in the order transactions take them (see 0009.waitlist.sql).

LOCK TABLE users IN SHARE ROW EXCLUSIVE MODE;
LOCK TABLE appointments IN ACCESS EXCLUSIVE MODE;

CREATE OR REPLACE FUNCTION booking_release_slot(p_slot_id uuid) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE time_slots SET status = 'AVAILABLE' WHERE id = p_slot_id;
END
$$;

DROP FUNCTION booking_insert_slots(uuid[], timestamptz[], timestamptz[]);
DROP TRIGGER appointments_waitlist_offer_settled ON appointments;
DROP FUNCTION booking_waitlist_offer_settled();
DROP FUNCTION booking_expire_waitlist_entries(integer);
DROP FUNCTION booking_cancel_waitlist_entry(uuid, uuid);
DROP FUNCTION booking_create_waitlist_entry(
    uuid, uuid, text, timestamptz, timestamptz, appointment_priority, interval, uuid, uuid);
DROP FUNCTION booking_slot_is_free(time_slots);
DROP FUNCTION booking_slot_created(uuid);
DROP FUNCTION booking_offer_slot(uuid);
DROP FUNCTION booking_waitlist_claimant(time_slots, boolean);
DROP FUNCTION booking_waitlist_user_eligible(uuid, time_slots);
DROP FUNCTION booking_may_hold(uuid, time_slots);
DROP TABLE waitlist_entries;
DROP TYPE waitlist_entry_status;
