-- depends: 0007.sql-source-tree
--
-- Event retention: a pruning function and the horizon it records (storage/sql/retention.sql).
-- Nothing is pruned until a server runs with an event retention set.

CREATE TABLE booking_event_horizon (
    id          boolean PRIMARY KEY DEFAULT true,
    pruned_xid  xid8 NOT NULL,
    pruned_seq  bigint NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT booking_event_horizon_one_row CHECK (id)
);

-- Deleting an event checks idempotency_keys for references to it.
CREATE INDEX idempotency_keys_event ON idempotency_keys (event_id) WHERE event_id IS NOT NULL;

-- Deletes up to p_limit events created before now() - p_retention, oldest
-- first, and returns how many. Events a stored request id still names are
-- kept (their key is forgotten after the request-id retention, and a later
-- run deletes them); they lie at or before the horizon, so no cursor reader
-- sees them again. Only events below the stable horizon are considered: a
-- transaction still running cannot commit an event the horizon already
-- covers. Replicas take turns on a transaction-level advisory lock; one
-- that finds it taken does nothing this round.
CREATE FUNCTION booking_prune_events(p_retention interval, p_limit integer)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_count integer;
    v_xid xid8;
    v_seq bigint;
BEGIN
    IF NOT pg_try_advisory_xact_lock(hashtext('booking_prune_events')) THEN
        RETURN 0;
    END IF;
    WITH doomed AS (
        SELECT e.id, e.xid, e.seq FROM appointment_events e
        WHERE e.xid < pg_snapshot_xmin(pg_current_snapshot())
          AND e.created_at < now() - p_retention
          AND NOT EXISTS (SELECT 1 FROM idempotency_keys k WHERE k.event_id = e.id)
        ORDER BY e.xid, e.seq
        LIMIT p_limit
    ), gone AS (
        DELETE FROM appointment_events e USING doomed d WHERE e.id = d.id
        RETURNING d.xid, d.seq
    ), last AS (
        SELECT xid, seq FROM gone ORDER BY xid DESC, seq DESC LIMIT 1
    )
    SELECT (SELECT count(*)::integer FROM gone), last.xid, last.seq
    INTO v_count, v_xid, v_seq
    FROM (SELECT 1) one LEFT JOIN last ON true;
    IF v_count > 0 THEN
        INSERT INTO booking_event_horizon AS h (pruned_xid, pruned_seq)
        VALUES (v_xid, v_seq)
        ON CONFLICT (id) DO UPDATE
        SET pruned_xid = EXCLUDED.pruned_xid, pruned_seq = EXCLUDED.pruned_seq, updated_at = now()
        WHERE (EXCLUDED.pruned_xid, EXCLUDED.pruned_seq) > (h.pruned_xid, h.pruned_seq);
    END IF;
    RETURN v_count;
END
$$;
