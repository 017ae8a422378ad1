-- depends: 0022.series
--
-- Calendar feeds: secret per-user and per-specialist feed tokens, and the
-- iCalendar SEQUENCE of each appointment (storage/sql/feeds.sql).

-- Calendar feeds (docs/operations.md, "Calendar feeds"): one secret token
-- per user or per specialist, stored only as its SHA-256 digest. Rotating
-- replaces the digest (the old URL stops working at once); revoking deletes
-- the row.
CREATE TABLE calendar_feeds (
    id              uuid PRIMARY KEY,
    user_id         uuid REFERENCES users (id),
    specialist_id   uuid REFERENCES specialists (id),
    token_sha256    bytea NOT NULL,
    created_by      uuid,
    created_at      timestamptz NOT NULL DEFAULT now(),
    rotated_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT calendar_feeds_one_subject CHECK ((user_id IS NULL) <> (specialist_id IS NULL)),
    CONSTRAINT calendar_feeds_digest_length CHECK (octet_length(token_sha256) = 32)
);
CREATE UNIQUE INDEX calendar_feeds_token ON calendar_feeds (token_sha256);
CREATE UNIQUE INDEX calendar_feeds_user ON calendar_feeds (user_id) WHERE user_id IS NOT NULL;
CREATE UNIQUE INDEX calendar_feeds_specialist ON calendar_feeds (specialist_id)
    WHERE specialist_id IS NOT NULL;

-- The iCalendar SEQUENCE of an appointment: how often it was moved or
-- cancelled. Kept beside the appointments table rather than in it, so its
-- row type (which the transition functions return) does not change, and
-- not derived from the event log, which retention prunes. No row: 0.
CREATE TABLE calendar_sequences (
    appointment_id  uuid PRIMARY KEY REFERENCES appointments (id),
    sequence        integer NOT NULL
);

CREATE FUNCTION booking_bump_calendar_sequence() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO calendar_sequences AS s (appointment_id, sequence) VALUES (NEW.id, 1)
    ON CONFLICT (appointment_id) DO UPDATE SET sequence = s.sequence + 1;
    RETURN NULL;
END $$;

-- In the transaction of the change itself; only reschedules and cancels.
CREATE TRIGGER appointments_calendar_sequence
    AFTER UPDATE OF time_slot_id, status ON appointments
    FOR EACH ROW
    WHEN (OLD.time_slot_id IS DISTINCT FROM NEW.time_slot_id
          OR (NEW.status = 'CANCELLED' AND OLD.status IS DISTINCT FROM 'CANCELLED'))
    EXECUTE FUNCTION booking_bump_calendar_sequence();
