-- Durability across failover (storage/durability.py, docs/cluster.md).
--
-- A commit that waits for the synchronous standbys and whose wait is
-- cancelled or terminated becomes visible on the primary although no
-- standby has it. An answer that passes on what it reads (a replayed
-- request id, an event delivered to a stream) must therefore not trust
-- that the commits it read are replicated. It calls booking_sync_barrier():
-- its own transaction then writes a WAL record, so its commit waits for the
-- synchronous standbys as a write does. WAL is one sequence: once that
-- wait ends normally, every commit the transaction could see (all of them
-- earlier in the WAL) is on the standbys that are synchronous at that
-- moment. Without synchronous standbys no commit waits for one, and the
-- barrier writes nothing.
-- The synchronous standby's lease (docs/cluster.md, "A resumed old
-- primary"). A primary frozen longer than the HA manager's TTL is replaced;
-- when it resumes, the statements its clients sent before or during the
-- freeze are still in its sockets and run before it is demoted. Its
-- synchronous standby was promoted in its absence, so no standby has
-- replied to it for as long as it was frozen: a commit is refused unless a
-- synchronous standby replied within booking.standby_lease (a setting of
-- the database or role; 2 s when unset; standbys reply at least every
-- wal_receiver_status_interval, 1 s in the shipped configuration). The
-- check runs on the node itself, which cannot ask the DCS, with no clock
-- but its own. Without synchronous standbys there is no lease to check.
-- pg_stat_replication shows reply times only to members of
-- pg_read_all_stats: the check runs as the schema's owner, and passes when
-- the owner cannot see them (the service warns at start).
CREATE FUNCTION booking_standby_lease_held() RETURNS boolean
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT current_setting('synchronous_standby_names') = ''
        OR NOT pg_has_role('pg_read_all_stats', 'USAGE')
        OR EXISTS (
            SELECT 1 FROM pg_stat_replication
            WHERE sync_state IN ('sync', 'quorum')
              AND reply_time > clock_timestamp() - coalesce(
                  nullif(current_setting('booking.standby_lease', true), ''), '2s')::interval)
$$;

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
CREATE FUNCTION booking_require_standby_lease() RETURNS void
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

-- The deferred constraint trigger on every table the service writes: it
-- runs at COMMIT, before the commit record is written, once per
-- transaction (a transaction-local setting marks it done).
CREATE FUNCTION booking_standby_lease_trigger() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('booking.standby_lease_checked', true) IS DISTINCT FROM 'on' THEN
        PERFORM booking_require_standby_lease();
        PERFORM set_config('booking.standby_lease_checked', 'on', true);
    END IF;
    RETURN NULL;
END
$$;

CREATE FUNCTION booking_sync_barrier() RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('synchronous_standby_names') <> '' THEN
        -- A resumed old primary refuses a replay as it refuses a write.
        PERFORM booking_require_standby_lease();
        -- Transactional: it takes an xid and WAL, so the commit waits.
        PERFORM pg_logical_emit_message(true, 'booking_sync_barrier', '');
    END IF;
END
$$;
