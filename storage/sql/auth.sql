-- Authentication: opaque bearer tokens, stored only as SHA-256 digests
-- (docs/auth.md), per-account login throttling shared by every replica, and
-- the triggers that tell every server to drop cached tokens.

CREATE TABLE access_tokens (
    token_hash      bytea PRIMARY KEY,
    user_id         uuid NOT NULL REFERENCES users (id),
    created_at      timestamptz NOT NULL DEFAULT now(),
    expires_at      timestamptz NOT NULL,
    revoked_at      timestamptz
);
CREATE INDEX access_tokens_user ON access_tokens (user_id);
CREATE INDEX access_tokens_expiry ON access_tokens (expires_at);

-- Keyed by the lower-cased email that was tried, whether or not an account
-- has it, so throttling reveals nothing about which accounts exist.
CREATE TABLE login_throttle (
    email_key       text PRIMARY KEY,
    failures        integer NOT NULL DEFAULT 0,
    window_start    timestamptz NOT NULL DEFAULT now(),
    locked_until    timestamptz
);


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
