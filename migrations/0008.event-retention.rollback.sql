-- Back to 0007: keep every event again (those already pruned stay gone).

DROP FUNCTION booking_prune_events(interval, integer);
DROP INDEX idempotency_keys_event;
DROP TABLE booking_event_horizon;
