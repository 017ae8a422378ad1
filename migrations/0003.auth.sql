-- depends: 0002.appointment-transitions
--
-- Opaque bearer tokens, stored only as SHA-256 digests (docs/auth.md), and
-- per-account login throttling shared by every replica.

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
