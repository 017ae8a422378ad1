DROP TRIGGER appointments_calendar_sequence ON appointments;
DROP FUNCTION booking_bump_calendar_sequence();
DROP TABLE calendar_sequences;
DROP TABLE calendar_feeds;
