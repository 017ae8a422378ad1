-- Signed webhooks (docs/operations.md, "Webhooks"). Each endpoint has its
-- own durable cursor into the event log, an (xid, seq) position that
-- advances only after the receiver answered 2xx, and a lease: the replica
-- whose lease is current is the only one delivering to the endpoint.
CREATE TABLE webhook_endpoints (
    id                  uuid PRIMARY KEY,
    url                 text NOT NULL,
    -- Event types delivered (appointment_events.event_type); empty: all.
    event_types         text[] NOT NULL DEFAULT '{}',
    -- Newest first; every delivery is signed with each (rotation).
    secrets             text[] NOT NULL,
    enabled             boolean NOT NULL DEFAULT TRUE,
    disabled_reason     text,
    -- Last event delivered (or skipped by the type filter).
    cursor_xid          xid8 NOT NULL DEFAULT '0',
    cursor_seq          bigint NOT NULL DEFAULT 0,
    -- Failed attempts in a row, and when the next attempt is due (backoff).
    failures            integer NOT NULL DEFAULT 0,
    next_attempt_at     timestamptz NOT NULL DEFAULT now(),
    last_error          text,
    delivered           bigint NOT NULL DEFAULT 0,
    lease_owner         text,
    lease_expires_at    timestamptz,
    created_by          uuid,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT webhook_endpoints_url_scheme CHECK (url ~ '^https?://'),
    CONSTRAINT webhook_endpoints_secret_count CHECK (cardinality(secrets) BETWEEN 1 AND 5),
    CONSTRAINT webhook_endpoints_event_types CHECK (event_types <@ ARRAY[
        'HELD', 'CONFIRMED', 'CANCELLED', 'HOLD_EXPIRED', 'NO_SHOW', 'RESCHEDULED']::text[])
);
CREATE INDEX webhook_endpoints_created ON webhook_endpoints (created_at, id);
