-- Working hours: a specialist's weekly rules and dated exceptions, in the
-- specialist's local time (specialists.time_zone), and the record of each
-- materialisation into time_slots (docs/schedules.md).
--
-- Times of day are minutes after local midnight (0 .. 1440), so a day may
-- end at 24:00. The slots themselves are computed in Python with the
-- server's tz database (storage/wallclock.py) and inserted by the same code
-- path as BatchCreateSlots (storage/slots.py insert_slots); the exclusion
-- constraint on time_slots stays the authority on overlaps.

CREATE TABLE schedule_rules (
    specialist_id   uuid NOT NULL REFERENCES specialists (id),
    position        integer NOT NULL,
    -- ISO weekday: 1 is Monday, 7 Sunday.
    weekday         smallint NOT NULL,
    start_minute    integer NOT NULL,
    end_minute      integer NOT NULL,
    slot_minutes    integer NOT NULL,
    gap_minutes     integer NOT NULL DEFAULT 0,
    -- Inclusive; NULL: unbounded.
    effective_from  date,
    effective_until date,
    CONSTRAINT schedule_rules_pkey PRIMARY KEY (specialist_id, position),
    CONSTRAINT schedule_rules_weekday CHECK (weekday BETWEEN 1 AND 7),
    CONSTRAINT schedule_rules_hours CHECK (
        0 <= start_minute AND start_minute < end_minute AND end_minute <= 1440),
    CONSTRAINT schedule_rules_slots CHECK (slot_minutes > 0 AND gap_minutes >= 0),
    CONSTRAINT schedule_rules_dates CHECK (effective_from <= effective_until)
);

-- OFF: the date (whole, or from start to end) has no slots. EXTRA: hours
-- worked on that date on top of the weekly rules.
CREATE TABLE schedule_exceptions (
    specialist_id   uuid NOT NULL REFERENCES specialists (id),
    position        integer NOT NULL,
    on_date         date NOT NULL,
    kind            text NOT NULL,
    -- NULL (OFF only): the whole day.
    start_minute    integer,
    end_minute      integer,
    -- EXTRA only.
    slot_minutes    integer,
    gap_minutes     integer,
    CONSTRAINT schedule_exceptions_pkey PRIMARY KEY (specialist_id, position),
    CONSTRAINT schedule_exceptions_kind CHECK (kind IN ('OFF', 'EXTRA')),
    CONSTRAINT schedule_exceptions_hours CHECK (
        (start_minute IS NULL) = (end_minute IS NULL)
        AND (start_minute IS NULL
             OR (0 <= start_minute AND start_minute < end_minute AND end_minute <= 1440))),
    CONSTRAINT schedule_exceptions_extra CHECK (
        (kind = 'EXTRA') = (slot_minutes IS NOT NULL)
        AND (kind = 'EXTRA') = (gap_minutes IS NOT NULL)
        AND (kind <> 'EXTRA' OR start_minute IS NOT NULL)
        AND (slot_minutes IS NULL OR (slot_minutes > 0 AND gap_minutes >= 0)))
);

-- A materialisation with a request id stores its report as the request's
-- result (requests.sql), replayed to every copy and forgotten with the other
-- request ids.
