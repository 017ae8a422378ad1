-- depends: 0046.appointment-slot-times-index
--
-- A resumed old primary refuses commits and replays: the synchronous
-- standby's lease (storage/sql/durability.sql, storage/sql/lease.sql,
-- docs/cluster.md "A resumed old primary").

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

-- Refuses (STANDBY_LEASE_EXPIRED, answered UNAVAILABLE) unless the lease is
-- held. Never remembered as a request's outcome: the request's key is
-- cleared first, so a retry once the lease is back applies the request.
CREATE FUNCTION booking_require_standby_lease() RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_max_age text;
BEGIN
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

CREATE OR REPLACE FUNCTION booking_sync_barrier() RETURNS void
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

CREATE CONSTRAINT TRIGGER booking_standby_lease AFTER INSERT OR UPDATE OR DELETE ON users
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    WHEN (current_setting('synchronous_standby_names') <> '')
    EXECUTE FUNCTION booking_standby_lease_trigger();
CREATE CONSTRAINT TRIGGER booking_standby_lease AFTER INSERT OR UPDATE OR DELETE ON specialists
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    WHEN (current_setting('synchronous_standby_names') <> '')
    EXECUTE FUNCTION booking_standby_lease_trigger();
CREATE CONSTRAINT TRIGGER booking_standby_lease AFTER INSERT OR UPDATE OR DELETE ON time_slots
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    WHEN (current_setting('synchronous_standby_names') <> '')
    EXECUTE FUNCTION booking_standby_lease_trigger();
CREATE CONSTRAINT TRIGGER booking_standby_lease AFTER INSERT OR UPDATE OR DELETE ON appointments
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    WHEN (current_setting('synchronous_standby_names') <> '')
    EXECUTE FUNCTION booking_standby_lease_trigger();
CREATE CONSTRAINT TRIGGER booking_standby_lease AFTER INSERT OR UPDATE OR DELETE ON appointment_events
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    WHEN (current_setting('synchronous_standby_names') <> '')
    EXECUTE FUNCTION booking_standby_lease_trigger();
CREATE CONSTRAINT TRIGGER booking_standby_lease AFTER INSERT OR UPDATE OR DELETE ON idempotency_keys
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    WHEN (current_setting('synchronous_standby_names') <> '')
    EXECUTE FUNCTION booking_standby_lease_trigger();
CREATE CONSTRAINT TRIGGER booking_standby_lease AFTER INSERT OR UPDATE OR DELETE ON access_tokens
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    WHEN (current_setting('synchronous_standby_names') <> '')
    EXECUTE FUNCTION booking_standby_lease_trigger();
CREATE CONSTRAINT TRIGGER booking_standby_lease AFTER INSERT OR UPDATE OR DELETE ON login_throttle
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    WHEN (current_setting('synchronous_standby_names') <> '')
    EXECUTE FUNCTION booking_standby_lease_trigger();
CREATE CONSTRAINT TRIGGER booking_standby_lease AFTER INSERT OR UPDATE OR DELETE ON calendar_feeds
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    WHEN (current_setting('synchronous_standby_names') <> '')
    EXECUTE FUNCTION booking_standby_lease_trigger();
CREATE CONSTRAINT TRIGGER booking_standby_lease AFTER INSERT OR UPDATE OR DELETE ON calendar_sequences
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    WHEN (current_setting('synchronous_standby_names') <> '')
    EXECUTE FUNCTION booking_standby_lease_trigger();
CREATE CONSTRAINT TRIGGER booking_standby_lease AFTER INSERT OR UPDATE OR DELETE ON booking_policy_defaults
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    WHEN (current_setting('synchronous_standby_names') <> '')
    EXECUTE FUNCTION booking_standby_lease_trigger();
CREATE CONSTRAINT TRIGGER booking_standby_lease AFTER INSERT OR UPDATE OR DELETE ON booking_event_horizon
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    WHEN (current_setting('synchronous_standby_names') <> '')
    EXECUTE FUNCTION booking_standby_lease_trigger();
CREATE CONSTRAINT TRIGGER booking_standby_lease AFTER INSERT OR UPDATE OR DELETE ON schedule_rules
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    WHEN (current_setting('synchronous_standby_names') <> '')
    EXECUTE FUNCTION booking_standby_lease_trigger();
CREATE CONSTRAINT TRIGGER booking_standby_lease AFTER INSERT OR UPDATE OR DELETE ON schedule_exceptions
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    WHEN (current_setting('synchronous_standby_names') <> '')
    EXECUTE FUNCTION booking_standby_lease_trigger();
CREATE CONSTRAINT TRIGGER booking_standby_lease AFTER INSERT OR UPDATE OR DELETE ON appointment_series
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    WHEN (current_setting('synchronous_standby_names') <> '')
    EXECUTE FUNCTION booking_standby_lease_trigger();
CREATE CONSTRAINT TRIGGER booking_standby_lease AFTER INSERT OR UPDATE OR DELETE ON waitlist_entries
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    WHEN (current_setting('synchronous_standby_names') <> '')
    EXECUTE FUNCTION booking_standby_lease_trigger();
CREATE CONSTRAINT TRIGGER booking_standby_lease AFTER INSERT OR UPDATE OR DELETE ON webhook_endpoints
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    WHEN (current_setting('synchronous_standby_names') <> '')
    EXECUTE FUNCTION booking_standby_lease_trigger();
