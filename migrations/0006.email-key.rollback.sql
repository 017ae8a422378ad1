DROP INDEX users_email_lower;
DROP INDEX users_email_key;
DROP FUNCTION booking_email_key(text);
CREATE UNIQUE INDEX users_email_key ON users (lower(email));
