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
CREATE FUNCTION booking_sync_barrier() RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('synchronous_standby_names') <> '' THEN
        -- Transactional: it takes an xid and WAL, so the commit waits.
        PERFORM pg_logical_emit_message(true, 'booking_sync_barrier', '');
    END IF;
END
$$;
