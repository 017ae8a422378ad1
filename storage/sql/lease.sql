-- Every table the service writes refuses a commit on a node whose
-- synchronous standby's lease has expired (booking_standby_lease_held() in
-- durability.sql). The WHEN clause is evaluated as each row changes, so
-- without synchronous standbys nothing is queued and a commit pays nothing.
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
