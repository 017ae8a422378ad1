-- depends: 0003.auth
--
-- Servers cache token lookups; these triggers tell every replica at once
-- when a user's tokens may have stopped working or their identity changed.
-- Such changes are rare, so the NOTIFY inside the transaction costs nothing
-- that matters (unlike on the appointment path, docs/events.md).

CREATE FUNCTION booking_notify_auth_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    -- Separate branches: each expression is only planned when it runs, and
    -- users has no user_id column.
    IF TG_TABLE_NAME = 'users' THEN
        PERFORM pg_notify('booking_auth', NEW.id::text);
    ELSE
        PERFORM pg_notify('booking_auth', NEW.user_id::text);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER users_auth_changed
    AFTER UPDATE OF email, role, is_active, password_hash ON users
    FOR EACH ROW
    WHEN (OLD.email IS DISTINCT FROM NEW.email
       OR OLD.role IS DISTINCT FROM NEW.role
       OR OLD.is_active IS DISTINCT FROM NEW.is_active
       OR OLD.password_hash IS DISTINCT FROM NEW.password_hash)
    EXECUTE FUNCTION booking_notify_auth_change();

CREATE TRIGGER access_tokens_revoked
    AFTER UPDATE OF revoked_at ON access_tokens
    FOR EACH ROW
    WHEN (OLD.revoked_at IS NULL AND NEW.revoked_at IS NOT NULL)
    EXECUTE FUNCTION booking_notify_auth_change();
