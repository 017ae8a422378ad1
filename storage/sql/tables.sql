-- The tables, types and indexes: the current schema in one place.
--
-- This file and the other files in storage/sql/ are the source of truth
-- for the database; migrations/ holds only the changes that lead here, and
-- tests/test_schema_source.py fails if the two ever disagree.
-- docs/schema.md explains each refinement of the original design.

CREATE EXTENSION IF NOT EXISTS btree_gist;

CREATE TYPE user_role AS ENUM ('CLIENT', 'OPERATOR', 'ADMIN');
CREATE TYPE timeslot_status AS ENUM ('AVAILABLE', 'HOLD', 'BOOKED');
CREATE TYPE appointment_status AS ENUM ('HOLD', 'CONFIRMED', 'CANCELLED', 'NO_SHOW');
CREATE TYPE appointment_priority AS ENUM ('NORMAL', 'VIP', 'URGENT');

CREATE TABLE users (
    id              uuid PRIMARY KEY,
    email           text NOT NULL,
    password_hash   text NOT NULL,
    role            user_role NOT NULL,
    is_active       boolean NOT NULL DEFAULT TRUE,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT users_email_not_blank CHECK (btrim(email) <> '')
);
-- One account per mailbox, by Unicode's canonical caseless match of the
-- email (email_key.sql): 'Ärger@x' and 'ärger@x' are one account. The name
-- users_email_key is how a duplicate becomes EMAIL_TAKEN.
CREATE UNIQUE INDEX users_email_key ON users (booking_email_key(email));
-- The previous release looked users up by lower(email); kept until no
-- replica of it can be running.
CREATE INDEX users_email_lower ON users (lower(email));
CREATE INDEX users_created ON users (created_at, id);

CREATE TABLE specialists (
    id              uuid PRIMARY KEY,
    full_name       text NOT NULL,
    service_type    text NOT NULL,
    is_active       boolean NOT NULL DEFAULT TRUE,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    -- An IANA name, checked against the server's tz database (which
    -- PostgreSQL does not share); schedules are laid out in it.
    time_zone       text NOT NULL DEFAULT 'UTC',
    -- Booking policy (policies.sql); NULL follows booking_policy_defaults.
    min_notice_minutes          integer,
    max_advance_days            integer,
    cancellation_cutoff_hours   integer,
    -- Time kept free before and after each appointment (buffers.sql).
    buffer_before_minutes       integer NOT NULL DEFAULT 0,
    buffer_after_minutes        integer NOT NULL DEFAULT 0,
    -- Whether any buffer of the specialist was ever above 0, so that some
    -- appointment may hold a range wider than its slot; set by a trigger,
    -- never cleared (buffers.sql). Until then holds skip the buffer probe.
    buffers_used                boolean NOT NULL DEFAULT false,
    CONSTRAINT specialists_policy_not_negative CHECK (
        min_notice_minutes >= 0 AND max_advance_days >= 0 AND cancellation_cutoff_hours >= 0),
    CONSTRAINT specialists_buffers_range CHECK (
        buffer_before_minutes BETWEEN 0 AND 1440 AND buffer_after_minutes BETWEEN 0 AND 1440)
);
CREATE INDEX specialists_created ON specialists (created_at, id);

CREATE TABLE time_slots (
    id              uuid PRIMARY KEY,
    specialist_id   uuid NOT NULL REFERENCES specialists (id),
    start_time      timestamptz NOT NULL,
    end_time        timestamptz NOT NULL,
    status          timeslot_status NOT NULL DEFAULT 'AVAILABLE',
    created_at      timestamptz NOT NULL DEFAULT now(),
    -- Deleted slots are kept (soft delete) because cancelled appointments
    -- and their events still reference them.
    deleted_at      timestamptz,
    -- Seats (docs/seats.md): up to capacity live appointments' party sizes
    -- may occupy the slot. seats_taken and seats_held (the part of it in
    -- HOLD) are kept by booking_appointment_seats, a trigger on
    -- appointments, in the transaction of every change; status is derived
    -- from them by booking_slot_status, so it always agrees with them.
    capacity        integer NOT NULL DEFAULT 1,
    seats_taken     integer NOT NULL DEFAULT 0,
    seats_held      integer NOT NULL DEFAULT 0,

    CONSTRAINT chk_time_range CHECK (start_time < end_time),
    -- A slot lasts at most 48 hours (storage.slots.MAX_SLOT_LENGTH), so a
    -- slot overlapping an instant starts at most 48 hours before it: the
    -- lower bound on start_time that keeps a specialist's range of
    -- idx_time_slots_specialist_time off the specialist's past. The edges
    -- of the API's range (0001-01-01, 9999-12-31T23:59:59.999999) reach
    -- PostgreSQL as -infinity and infinity (asyncpg's encoding): a slot
    -- there is bounded by the same 48 hours from the edge.
    CONSTRAINT time_slots_length_bounded CHECK (
        end_time - start_time <= interval '48 hours'
        OR (start_time = '-infinity' AND end_time <= '0001-01-03 00:00:00+00')
        OR (end_time = 'infinity' AND start_time >= '9999-12-30 00:00:00+00')),
    -- Never more seats taken than the slot has, whatever writes them.
    CONSTRAINT time_slots_seats CHECK (
        capacity >= 1 AND seats_held >= 0 AND seats_held <= seats_taken
        AND seats_taken <= capacity),
    -- Lets appointments reference (slot, specialist) so the two always agree.
    CONSTRAINT time_slots_id_specialist_key UNIQUE (id, specialist_id),
    -- A specialist never has two overlapping slots; '[)' lets adjacent
    -- slots (end = next start) coexist.
    CONSTRAINT time_slots_no_overlap EXCLUDE USING gist (
        specialist_id WITH =,
        tstzrange(start_time, end_time, '[)') WITH &&
    ) WHERE (deleted_at IS NULL)
);

CREATE INDEX idx_time_slots_specialist_time
    ON time_slots (specialist_id, start_time, end_time);
CREATE INDEX idx_time_slots_status ON time_slots (status);
CREATE INDEX time_slots_start ON time_slots (start_time, id);

CREATE TABLE appointments (
    id              uuid PRIMARY KEY,
    user_id         uuid NOT NULL REFERENCES users (id),
    specialist_id   uuid NOT NULL REFERENCES specialists (id),
    time_slot_id    uuid NOT NULL REFERENCES time_slots (id),
    status          appointment_status NOT NULL,
    priority        appointment_priority NOT NULL DEFAULT 'NORMAL',
    expires_at      timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    -- How many of the slot's seats this appointment occupies, all or none.
    party_size      integer NOT NULL DEFAULT 1,
    -- Its slot widened by the specialist's buffers when it took the slot
    -- (buffers.sql); set by a trigger.
    buffered_range  tstzrange,
    -- The recurring series it was held in, if any (series.sql).
    series_id       uuid,
    -- Its slot's start and end, copied when it takes the slot (the trigger
    -- appointments_range, buffers.sql), so that a user's upcoming
    -- appointments are found without reading the past ones' slots. NULL
    -- only on rows written before the columns existed, until
    -- `booking-service migrate backfill` has set them.
    slot_start      timestamptz,
    slot_end        timestamptz,

    CONSTRAINT appointments_party_size_positive CHECK (party_size >= 1),
    CONSTRAINT appointments_slot_specialist_fkey
        FOREIGN KEY (time_slot_id, specialist_id)
        REFERENCES time_slots (id, specialist_id),
    -- A hold always has an expiry and nothing else has one.
    CONSTRAINT appointments_expiry_iff_hold
        CHECK ((status = 'HOLD') = (expires_at IS NOT NULL)),
    -- No two live appointments of a specialist, in different slots, with
    -- overlapping buffered ranges (buffers.sql). With no buffers the ranges
    -- are the slots, which never overlap: nothing changes.
    CONSTRAINT appointments_buffers_apart EXCLUDE USING gist (
        specialist_id WITH =, buffered_range WITH &&, time_slot_id WITH <>
    ) WHERE (status <> 'CANCELLED')
);

-- The appointments that occupy a slot's seats: a CANCELLED appointment
-- (including an expired hold) frees its seats for a new one. At most
-- capacity seats are taken (time_slots_seats); with capacity 1 that is the
-- one live appointment per slot this index used to enforce as unique.
CREATE INDEX appointments_live_by_slot
    ON appointments (time_slot_id) WHERE status <> 'CANCELLED';
CREATE INDEX appointments_user ON appointments (user_id, status);
-- A user's appointments that end after an instant: the overlap check and a
-- user's upcoming appointments read only those, never the user's past.
CREATE INDEX appointments_user_slot_end ON appointments (user_id, slot_end);
CREATE INDEX appointments_specialist ON appointments (specialist_id, status);
CREATE INDEX appointments_hold_expiry ON appointments (expires_at) WHERE status = 'HOLD';

CREATE TABLE appointment_events (
    id                  uuid PRIMARY KEY,
    -- Stream position is (xid, seq): see docs/events.md for why a sequence
    -- alone would let readers skip events that commit out of order.
    xid                 xid8 NOT NULL DEFAULT pg_current_xact_id(),
    seq                 bigint GENERATED ALWAYS AS IDENTITY,
    appointment_id      uuid NOT NULL REFERENCES appointments (id),
    event_type          text NOT NULL,
    old_status          appointment_status,
    new_status          appointment_status NOT NULL,
    -- The appointment's state after the change, so consumers need no join.
    time_slot_id        uuid NOT NULL,
    previous_slot_id    uuid,
    specialist_id       uuid NOT NULL,
    user_id             uuid NOT NULL,
    priority            appointment_priority NOT NULL,
    start_time          timestamptz NOT NULL,
    end_time            timestamptz NOT NULL,
    expires_at          timestamptz,
    appointment_created_at timestamptz NOT NULL,
    -- NULL when the server acted on its own (hold expiry).
    actor_id            uuid,
    reason              text,
    created_at          timestamptz NOT NULL DEFAULT now(),

    CONSTRAINT appointment_events_type_check CHECK (event_type IN (
        'HELD', 'CONFIRMED', 'CANCELLED', 'HOLD_EXPIRED', 'NO_SHOW', 'RESCHEDULED'))
);
CREATE UNIQUE INDEX appointment_events_position ON appointment_events (xid, seq);
CREATE INDEX appointment_events_appointment ON appointment_events (appointment_id, xid, seq);
-- One user's events in stream order: a CLIENT reads only its own events,
-- and without this a read from an old cursor scans the whole log below it.
CREATE INDEX appointment_events_user ON appointment_events (user_id, xid, seq);

-- AIP-155 request ids, per caller, for every operation that takes one: each
-- key stores the first outcome of the request, the event of a transition's
-- success, the result of another operation's success (a waitlist entry's id,
-- a materialisation's report), or the reason and detail of a business
-- failure (requests.sql).
CREATE TABLE idempotency_keys (
    request_id      uuid NOT NULL,
    operation       text NOT NULL,
    fingerprint     text NOT NULL,
    event_id        uuid REFERENCES appointment_events (id),
    created_at      timestamptz NOT NULL DEFAULT now(),
    actor_id        uuid NOT NULL,
    error_reason    text,
    error_detail    jsonb,
    result          jsonb,
    CONSTRAINT idempotency_keys_pkey PRIMARY KEY (actor_id, request_id),
    CONSTRAINT idempotency_keys_one_outcome
        CHECK (num_nonnulls(event_id, result, error_reason) = 1)
);
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);
