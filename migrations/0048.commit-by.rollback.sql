-- The lease without the caller's time bound, as 0047 made it.

CREATE OR REPLACE FUNCTION booking_require_standby_lease() RETURNS void
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

DROP FUNCTION booking_commit_by(timestamptz);
DROP FUNCTION booking_require_commit_by();
DROP FUNCTION booking_commit_by_passed();
