DROP TRIGGER access_tokens_revoked ON access_tokens;
DROP TRIGGER users_auth_changed ON users;
DROP FUNCTION booking_notify_auth_change();
