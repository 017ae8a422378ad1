-- depends: 0049.hold-overlap-generic-plan
-- contract: drops the functions only the previous releases called or reached
--
-- The previous release (v0.2.0) calls the transitions by their unversioned
-- names, wrappers of the _v2 functions that decide exemption from the
-- actor's role; the releases before it called booking_replay and
-- booking_remember (two generations). Nothing in this release calls any of
-- them. A contract migration: `booking-service migrate apply --contract`
-- applies it once no replica of the previous release is left
-- (docs/upgrades.md); a replica of that release would fail every hold,
-- cancellation and reschedule after it.

DROP FUNCTION booking_reschedule(uuid, uuid, uuid, uuid, boolean, uuid);
DROP FUNCTION booking_cancel(uuid, uuid, uuid, text, uuid);
DROP FUNCTION booking_hold_slot(uuid, uuid, appointment_priority, uuid, interval, boolean, uuid);
DROP FUNCTION booking_policy_exempt_actor(uuid);
DROP FUNCTION booking_remember(uuid, uuid, text, text, appointment_events);
DROP FUNCTION booking_replay(uuid, uuid, text, text);
DROP FUNCTION booking_remember(uuid, text, text, appointment_events);
DROP FUNCTION booking_replay(uuid, text, text);
-- The one-seat waitlist claimant: bodies current before the seats' party
-- sizes called it, and a call begun then could still be running one.
DROP FUNCTION booking_waitlist_claimant(time_slots, boolean);
