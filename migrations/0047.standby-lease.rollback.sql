-- Back to 0046: no standby lease.

DROP TRIGGER booking_standby_lease ON users;
DROP TRIGGER booking_standby_lease ON specialists;
DROP TRIGGER booking_standby_lease ON time_slots;
DROP TRIGGER booking_standby_lease ON appointments;
DROP TRIGGER booking_standby_lease ON appointment_events;
DROP TRIGGER booking_standby_lease ON idempotency_keys;
DROP TRIGGER booking_standby_lease ON access_tokens;
DROP TRIGGER booking_standby_lease ON login_throttle;
DROP TRIGGER booking_standby_lease ON calendar_feeds;
DROP TRIGGER booking_standby_lease ON calendar_sequences;
DROP TRIGGER booking_standby_lease ON booking_policy_defaults;
DROP TRIGGER booking_standby_lease ON booking_event_horizon;
DROP TRIGGER booking_standby_lease ON schedule_rules;
DROP TRIGGER booking_standby_lease ON schedule_exceptions;
DROP TRIGGER booking_standby_lease ON appointment_series;
DROP TRIGGER booking_standby_lease ON waitlist_entries;
DROP TRIGGER booking_standby_lease ON webhook_endpoints;

CREATE OR REPLACE FUNCTION booking_sync_barrier() RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('synchronous_standby_names') <> '' THEN
        -- Transactional: it takes an xid and WAL, so the commit waits.
        PERFORM pg_logical_emit_message(true, 'booking_sync_barrier', '');
    END IF;
END
$$;

DROP FUNCTION booking_standby_lease_trigger();
DROP FUNCTION booking_require_standby_lease();
DROP FUNCTION booking_standby_lease_held();
