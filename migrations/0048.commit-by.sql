-- depends: 0047.standby-lease
--
-- A resumed old primary refuses what its callers stopped waiting for: the
-- transaction's own time bound, booking.commit_by, checked at its first
-- statement, at COMMIT (with the standby's lease) and in the sync barrier
-- (storage/sql/durability.sql, docs/cluster.md "A resumed old primary").

-- The caller's time bound (docs/cluster.md, "A resumed old primary"). The
-- service stamps each write transaction with booking.commit_by: the time by
-- which its caller stops waiting, by the service's clock plus a tolerance
-- for skew (storage/database.py). A statement that waited in a frozen
-- node's socket runs after that time; the node's own clock refuses it,
-- whatever its standby's lease looks like. Unset (a previous release, an
-- operator's session): no bound, the lease alone applies.
CREATE FUNCTION booking_commit_by_passed() RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT coalesce(nullif(current_setting('booking.commit_by', true), '')::timestamptz
        < clock_timestamp(), false)
$$;

-- Refuses (COMMIT_DEADLINE_PASSED, answered UNAVAILABLE) once the stamp has
-- passed. Never remembered as a request's outcome: the request's key is
-- cleared first, so a retry applies the request.
CREATE FUNCTION booking_require_commit_by() RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF booking_commit_by_passed() THEN
        PERFORM set_config('booking.request_key', '', true);
        PERFORM booking_fail('COMMIT_DEADLINE_PASSED', jsonb_build_object(
            'commit_by', current_setting('booking.commit_by', true)));
    END IF;
END
$$;

-- Stamps the transaction with its bound and checks it at once, so a
-- statement that waited in a frozen node's socket fails before it does
-- anything. The first thing a stamped transaction runs: folded into its
-- BEGIN, or the one-time filter of a single statement (WHERE
-- booking_commit_by(...)), which PostgreSQL evaluates before the rest of
-- the statement because it is STABLE and reads no column. Its side effect
-- is a transaction-local setting, which no snapshot sees.
CREATE FUNCTION booking_commit_by(p_commit_by timestamptz) RETURNS boolean
LANGUAGE plpgsql STABLE AS $$
BEGIN
    PERFORM set_config('booking.commit_by', p_commit_by::text, true);
    PERFORM booking_require_commit_by();
    RETURN true;
END
$$;

-- Refuses (STANDBY_LEASE_EXPIRED, answered UNAVAILABLE) unless the lease is
-- held, and (COMMIT_DEADLINE_PASSED) once the transaction's own bound has
-- passed. Never remembered as a request's outcome: the request's key is
-- cleared first, so a retry once the lease is back applies the request.
CREATE OR REPLACE FUNCTION booking_require_standby_lease() RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_max_age text;
BEGIN
    PERFORM booking_require_commit_by();
    IF NOT booking_standby_lease_held() THEN
        v_max_age := coalesce(nullif(current_setting('booking.standby_lease', true), ''), '2s');
        PERFORM set_config('booking.request_key', '', true);
        PERFORM booking_fail('STANDBY_LEASE_EXPIRED', jsonb_build_object('max_age', v_max_age));
    END IF;
END
$$;
