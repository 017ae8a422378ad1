-- Back to 0011: a user's events are read through the position index again.

DROP INDEX IF EXISTS appointment_events_user;
