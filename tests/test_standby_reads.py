"""Reads served by hot standbys: routing by intent, the maximum lag,
read-your-writes tokens, and standbys that stop, die or get promoted.

A real primary streams to two real standbys (tests/replication.py); a
server is configured with the standbys as its read URL, and everything goes
over gRPC. A standby made to lag (``recovery_min_apply_delay``) shows what a
read would return without the guarantee under test: a tokenless read that
it serves does not find a fresh write, which is what the tokened read would
return if the token were ignored.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest

from booking.v1 import slot_pb2 as spb
from booking.v1 import specialist_pb2 as sppb
from booking_client import Session, insecure_channel
from cluster.patroni import PatroniCluster, haproxy_available
from service.config import from_sources
from service.server import BookingServer
from storage import consistency, hosts, migrate, replicas
from tests.replication import NODE_SETTINGS, Node, ReplicatedCluster, replicated_cluster
from tests.support import Api, running_server, ts

TOKEN = consistency.HEADER
DEADLINE = 10.0


@pytest.fixture(scope="module")
async def shared_cluster() -> AsyncIterator[ReplicatedCluster]:
    # Asynchronous: a paused or killed standby holds no commit.
    async with replicated_cluster(2, synchronous=False) as c:
        yield c


@pytest.fixture
async def cluster(shared_cluster: ReplicatedCluster) -> ReplicatedCluster:
    """The module's primary and two standbys, as a new cluster has them:
    both streaming, replaying without delay, caught up."""
    await restore(shared_cluster)
    return shared_cluster


async def restore(cluster: ReplicatedCluster) -> None:
    """Undo what a test did to the standbys: resume a paused one, make a
    killed or promoted one again from the primary (pg_basebackup), lift
    any replay delay, and wait until both have replayed a new commit
    (so each reports a replay time, as after delay_replay's first commit)."""
    for index, node in enumerate(cluster.standbys):
        if node.paused and not node.killed:
            node.resume()
        if not node.killed and await node.fetchval("SELECT pg_is_in_recovery()"):
            await cluster.set_apply_delay(node, "0")
            continue
        node.stop()
        shutil.rmtree(cluster.base_dir / node.name, ignore_errors=True)
        cluster.standbys[index] = cluster._make_standby(node.name, NODE_SETTINGS)
    await cluster.wait_streaming()
    await cluster.primary.execute(
        "CREATE TABLE IF NOT EXISTS replay_mark (); INSERT INTO replay_mark DEFAULT VALUES"
    )
    lsn = await replayed_lsn(cluster)
    for node in cluster.standbys:
        await cluster.wait_replayed(node, lsn)


def read_url(nodes: list[Node]) -> str:
    """One URL naming every node in `nodes` (libpq multi-host style)."""
    target = hosts.parse(nodes[0].url())
    netloc = ",".join(str(h) for n in nodes for h in hosts.parse(n.url()).hosts)
    first = str(target.hosts[0])
    return nodes[0].url().replace(first, netloc, 1)


@asynccontextmanager
async def serving(cluster: ReplicatedCluster, **overrides: Any) -> AsyncIterator[BookingServer]:
    settings: dict[str, Any] = {
        "read_database_url": read_url(cluster.standbys),
        "read_max_lag_seconds": 3600.0,
        "read_token_wait_seconds": 0.3,
        "read_check_seconds": 0.5,
    }
    async with running_server(cluster.primary.url(), **(settings | overrides)) as srv:
        try:
            yield srv
        finally:
            for node in cluster.standbys:
                if node.paused and not node.killed:
                    node.resume()


def standbys_of(srv: BookingServer) -> replicas.Standbys:
    assert srv.db is not None and srv.db.standbys is not None
    return srv.db.standbys


async def delay_replay(cluster: ReplicatedCluster, *nodes: Node) -> None:
    """Hold back replay on `nodes` from now on. First a commit they replay:
    a standby that replayed none since it started reports no replay time,
    so its lag is unknown and it serves no tokenless read at all."""
    await cluster.primary.execute(
        "CREATE TABLE IF NOT EXISTS replay_mark (); INSERT INTO replay_mark DEFAULT VALUES"
    )
    for node in nodes:
        await cluster.wait_replayed(node, await replayed_lsn(cluster))
    for node in nodes:
        await cluster.set_apply_delay(node, "1h")


async def create(api: Api) -> tuple[str, str]:
    """A new specialist (a write); its id and the answer's token."""
    call = api.specialists.CreateSpecialist(
        sppb.CreateSpecialistRequest(full_name="Dr. Replica", service_type="dentist"),
        metadata=api.md,
        timeout=DEADLINE,
    )
    reply = await call
    trailers = dict(await call.trailing_metadata() or ())
    token = trailers.get(TOKEN)
    assert isinstance(token, str)
    return reply.specialist.id, token


async def get(api: Api, specialist_id: str, *tokens: str) -> grpc.StatusCode:
    try:
        await api.specialists.GetSpecialist(
            sppb.GetSpecialistRequest(id=specialist_id),
            metadata=[*api.md, *((TOKEN, t) for t in tokens)],
            timeout=DEADLINE,
        )
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


async def replayed_lsn(cluster: ReplicatedCluster) -> str:
    return str(await cluster.primary.fetchval("SELECT pg_current_wal_lsn()::text"))


async def test_a_tokened_read_on_a_lagging_standby_returns_the_write(
    cluster: ReplicatedCluster,
) -> None:
    await delay_replay(cluster, *cluster.standbys)
    # Logging in with the standbys behind also shows the credential and
    # token checks stay on the primary (READ_PRIMARY).
    async with serving(cluster) as srv, Api.connect(srv) as api:
        specialist_id, token = await create(api)
        routed = standbys_of(srv)
        # Without the token a standby serves the read, and it has not
        # replayed the write: what the token prevents.
        assert await get(api, specialist_id) is grpc.StatusCode.NOT_FOUND
        assert routed.counters.standby >= 1
        # With it, no standby has replayed past it within the wait: the
        # primary answers.
        assert await get(api, specialist_id, token) is grpc.StatusCode.OK
        assert routed.fallbacks.get("token", 0) >= 1
        # Once one standby has replayed past it, that standby serves it.
        fresh = cluster.standbys[0]
        await cluster.set_apply_delay(fresh, "0")
        await cluster.wait_replayed(fresh, await replayed_lsn(cluster))
        before = routed.counters.standby
        for _ in range(4):
            assert await get(api, specialist_id, token) is grpc.StatusCode.OK
        assert routed.counters.standby - before >= 1


async def get_by_field(api: Api, specialist_id: str, field: str, *tokens: str) -> grpc.StatusCode:
    """GetSpecialist with `field` as the request's consistency_token (and
    `tokens` as metadata, if any)."""
    try:
        await api.specialists.GetSpecialist(
            sppb.GetSpecialistRequest(id=specialist_id, consistency_token=field),
            metadata=[*api.md, *((TOKEN, t) for t in tokens)],
            timeout=DEADLINE,
        )
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


async def test_a_writes_response_field_carries_its_trailer_token(
    cluster: ReplicatedCluster,
) -> None:
    async with serving(cluster) as srv, Api.connect(srv) as api:
        for _ in range(2):
            call = api.specialists.CreateSpecialist(
                sppb.CreateSpecialistRequest(full_name="Dr. Field", service_type="dentist"),
                metadata=api.md,
                timeout=DEADLINE,
            )
            reply = await call
            trailer = dict(await call.trailing_metadata() or ()).get(TOKEN)
            assert isinstance(trailer, str) and consistency.decode(trailer) is not None
            assert reply.consistency_token == trailer
        # Another service's write, another response message: the same
        # generic filling (by the message's descriptor, not per servicer).
        specialist = await api.specialist()
        slot_call = api.slots.CreateSlot(
            spb.CreateSlotRequest(
                specialist_id=specialist.id,
                start_time=ts(datetime.now(UTC) + timedelta(days=3)),
                end_time=ts(datetime.now(UTC) + timedelta(days=3, minutes=30)),
            ),
            metadata=api.md,
            timeout=DEADLINE,
        )
        slot_reply = await slot_call
        slot_trailer = dict(await slot_call.trailing_metadata() or ()).get(TOKEN)
        assert slot_reply.consistency_token and slot_reply.consistency_token == slot_trailer
        deleted = api.slots.DeleteSlot(
            spb.DeleteSlotRequest(id=slot_reply.slot.id), metadata=api.md, timeout=DEADLINE
        )
        deleted_reply = await deleted
        assert deleted_reply.consistency_token == dict(await deleted.trailing_metadata() or ()).get(
            TOKEN
        )


async def test_a_read_with_only_the_field_token_on_a_lagging_standby_returns_the_write(
    cluster: ReplicatedCluster,
) -> None:
    await delay_replay(cluster, *cluster.standbys)
    async with serving(cluster) as srv, Api.connect(srv) as api:
        reply = await api.specialists.CreateSpecialist(
            sppb.CreateSpecialistRequest(full_name="Dr. Grpcurl", service_type="dentist"),
            metadata=api.md,
            timeout=DEADLINE,
        )
        token = reply.consistency_token
        assert consistency.decode(token) is not None
        routed = standbys_of(srv)
        # Without a token the lagging standby answers, and lacks the write.
        assert await get_by_field(api, reply.specialist.id, "") is grpc.StatusCode.NOT_FOUND
        # The field alone: the primary answers (no standby replayed it).
        fallbacks = routed.fallbacks.get("token", 0)
        assert await get_by_field(api, reply.specialist.id, token) is grpc.StatusCode.OK
        assert routed.fallbacks.get("token", 0) == fallbacks + 1
        # Field and metadata: the newest of all counts, wherever it is.
        real = consistency.decode(token)
        assert real is not None
        older = consistency.Token(real.system, real.timeline, 0).encode()
        assert await get_by_field(api, reply.specialist.id, older, token) is grpc.StatusCode.OK
        assert await get_by_field(api, reply.specialist.id, token, older) is grpc.StatusCode.OK
        # An unreadable field token is no error: the primary serves it.
        assert await get_by_field(api, reply.specialist.id, "garbage") is grpc.StatusCode.OK


async def test_a_token_of_another_cluster_or_timeline_is_served_by_the_primary(
    cluster: ReplicatedCluster,
) -> None:
    await delay_replay(cluster, *cluster.standbys)
    async with serving(cluster) as srv, Api.connect(srv) as api:
        specialist_id, token = await create(api)
        real = consistency.decode(token)
        assert real is not None
        other_cluster = consistency.Token(real.system ^ 1, real.timeline, 0).encode()
        other_timeline = consistency.Token(real.system, real.timeline + 1, 0).encode()
        # Positions 0: any standby has "replayed past" them, if only the
        # position were compared.
        for foreign in (other_cluster, other_timeline, "not-a-token"):
            assert await get(api, specialist_id, foreign) is grpc.StatusCode.OK
        # The newest of several tokens counts.
        older = consistency.Token(real.system, real.timeline, 0).encode()
        assert await get(api, specialist_id, older, token) is grpc.StatusCode.OK


async def test_a_standby_beyond_the_maximum_lag_serves_no_tokenless_read(
    cluster: ReplicatedCluster,
) -> None:
    await delay_replay(cluster, *cluster.standbys)
    async with serving(cluster, read_max_lag_seconds=0.5) as srv, Api.connect(srv) as api:
        specialist_id, _ = await create(api)
        # Until both standbys report more than the maximum lag.
        for node in cluster.standbys:
            conn = await replicas_conn(node)
            try:
                while (await conn.fetchrow(replicas.CHECK_SQL))[2] <= 0.5:
                    await conn.execute("SELECT pg_sleep(0.05)")
            finally:
                await conn.close()
        routed = standbys_of(srv)
        before = routed.counters.standby
        for _ in range(4):
            assert await get(api, specialist_id) is grpc.StatusCode.OK
        assert routed.counters.standby == before
        assert routed.fallbacks.get("lag_or_down", 0) >= 4


async def replicas_conn(node: Node) -> asyncpg.Connection:
    return await asyncpg.connect(node.url(), ssl=False)


async def test_a_paused_standby_fails_no_read(cluster: ReplicatedCluster) -> None:
    async with serving(cluster) as srv, Api.connect(srv) as api:
        specialist_id, token = await create(api)
        for node in cluster.standbys:
            await cluster.wait_replayed(node, await replayed_lsn(cluster))
        # Both standbys have pooled sessions now.
        for _ in range(4):
            assert await get(api, specialist_id) is grpc.StatusCode.OK
        routed = standbys_of(srv)
        cluster.standbys[0].pause()
        before = routed.counters.standby
        for _ in range(6):
            assert await get(api, specialist_id) is grpc.StatusCode.OK
            assert await get(api, specialist_id, token) is grpc.StatusCode.OK
        # The other standby served them.
        assert routed.counters.standby - before >= 6
        cluster.standbys[1].pause()
        for _ in range(4):
            assert await get(api, specialist_id, token) is grpc.StatusCode.OK
            assert await get(api, specialist_id) is grpc.StatusCode.OK


async def test_paused_standbys_leave_a_short_deadline_to_the_primary(
    cluster: ReplicatedCluster,
) -> None:
    # Each standby's check may take 5 s, more than the call has: a check
    # gets at most a third of the time left, so the primary still answers.
    async with serving(cluster, read_check_seconds=5.0) as srv, Api.connect(srv) as api:
        specialist_id, token = await create(api)
        for node in cluster.standbys:
            node.pause()
        for round_ in range(3):
            if round_:
                # Past DOWN_SECONDS: both standbys are checked again.
                await asyncio.sleep(replicas.DOWN_SECONDS + 0.1)
            for tokens in ((), (token,)):
                reply = await api.specialists.GetSpecialist(
                    sppb.GetSpecialistRequest(id=specialist_id),
                    metadata=[*api.md, *((TOKEN, t) for t in tokens)],
                    timeout=1.5,
                )
                assert reply.specialist.id == specialist_id


async def test_a_killed_standby_fails_no_read(cluster: ReplicatedCluster) -> None:
    async with serving(cluster) as srv, Api.connect(srv) as api:
        specialist_id, token = await create(api)
        for node in cluster.standbys:
            await cluster.wait_replayed(node, await replayed_lsn(cluster))
        for _ in range(4):
            assert await get(api, specialist_id) is grpc.StatusCode.OK
        routed = standbys_of(srv)
        cluster.standbys[0].kill()
        before = routed.counters.standby
        for _ in range(6):
            assert await get(api, specialist_id) is grpc.StatusCode.OK
            assert await get(api, specialist_id, token) is grpc.StatusCode.OK
        assert routed.counters.standby - before >= 6
        cluster.standbys[1].kill()
        for _ in range(4):
            assert await get(api, specialist_id) is grpc.StatusCode.OK
            assert await get(api, specialist_id, token) is grpc.StatusCode.OK


async def test_a_promoted_standby_serves_no_read(cluster: ReplicatedCluster) -> None:
    async with serving(cluster) as srv, Api.connect(srv) as api:
        first, _ = await create(api)
        for node in cluster.standbys:
            await cluster.wait_replayed(node, await replayed_lsn(cluster))
        for _ in range(4):
            assert await get(api, first) is grpc.StatusCode.OK
        # standby1 leaves recovery (a split brain as far as it is
        # concerned): it never sees what the primary writes next.
        promoted = cluster.standbys[0]
        promoted.promote()
        specialist_id, token = await create(api)
        await cluster.wait_replayed(cluster.standbys[1], await replayed_lsn(cluster))
        routed = standbys_of(srv)
        before = routed.counters.standby
        # Round robin would send every other read to the promoted node,
        # which lacks the write.
        for _ in range(8):
            assert await get(api, specialist_id) is grpc.StatusCode.OK
            assert await get(api, specialist_id, token) is grpc.StatusCode.OK
        assert routed.counters.standby - before >= 8
        assert "promoted" in routed.nodes[0].problem


async def test_reads_stay_on_the_primary_when_told(cluster: ReplicatedCluster) -> None:
    await delay_replay(cluster, *cluster.standbys)
    async with serving(cluster, reads_on_primary=True) as srv, Api.connect(srv) as api:
        assert srv.db is not None and srv.db.standbys is None
        call = api.specialists.CreateSpecialist(
            sppb.CreateSpecialistRequest(full_name="Dr. Primary", service_type="dentist"),
            metadata=api.md,
        )
        reply = await call
        # No standbys, no token to wait for.
        assert TOKEN not in dict(await call.trailing_metadata() or ())
        assert reply.consistency_token == ""
        assert await get(api, reply.specialist.id) is grpc.StatusCode.OK


async def test_a_client_session_reads_its_writes(cluster: ReplicatedCluster) -> None:
    await delay_replay(cluster, *cluster.standbys)
    async with serving(cluster) as srv, Api.connect(srv) as api:
        session = Session()
        async with insecure_channel(f"127.0.0.1:{srv.port}", interceptors=[session]) as channel:
            in_session = Api(channel, srv, api.token)
            ids = []
            for _ in range(3):
                reply = await in_session.specialists.CreateSpecialist(
                    sppb.CreateSpecialistRequest(full_name="Dr. Session", service_type="x"),
                    metadata=in_session.md,
                )
                ids.append(reply.specialist.id)
                assert await get(in_session, reply.specialist.id) is grpc.StatusCode.OK
            assert session.tokens
        # The same reads outside the session land on the lagging standbys.
        assert await get(api, ids[-1]) is grpc.StatusCode.NOT_FOUND
        # Handed to another session (another replica's client), the tokens
        # carry the guarantee.
        carried = Session(session.tokens)
        async with insecure_channel(f"127.0.0.1:{srv.port}", interceptors=[carried]) as channel:
            other = Api(channel, srv, api.token)
            assert await get(other, ids[0]) is grpc.StatusCode.OK


def test_read_configuration_from_the_environment() -> None:
    url = "postgresql://u:p@127.0.0.1:5433,127.0.0.1:5434/booking"
    config = from_sources(
        None,
        {
            "DATABASE_URL": "postgresql://u:p@127.0.0.1:5432/booking",
            "BOOKING_READ_DATABASE_URL": url,
            "BOOKING_READ_MAX_LAG_SECONDS": "2.5",
        },
    )
    assert config.reads == replicas.Settings(
        url=url, max_lag_seconds=2.5, token_wait_seconds=0.5, check_seconds=0.5, pool_max_size=10
    )
    assert (
        from_sources(
            None, {"BOOKING_READ_DATABASE_URL": url, "BOOKING_READS_ON_PRIMARY": "1"}
        ).reads
        is None
    )
    assert from_sources(None, {}).reads is None
    with pytest.raises(ValueError, match="read_max_lag_seconds"):
        from_sources(None, {"BOOKING_READ_MAX_LAG_SECONDS": "-1"})


def test_tokens_round_trip_and_order() -> None:
    token = consistency.Token(7, 2, 123)
    assert consistency.decode(token.encode()) == token
    assert consistency.decode("garbage") is None
    assert consistency.wanted_from(["garbage"]) == consistency.UNREADABLE
    newer = consistency.Token(7, 2, 124)
    assert consistency.wanted_from([newer.encode(), token.encode()]) == newer


@pytest.fixture(scope="module")
def patroni() -> Iterator[PatroniCluster]:
    if not haproxy_available():
        pytest.fail("HAProxy (Debian haproxy) could not be installed")
    work = Path(tempfile.mkdtemp(prefix="booking-reads-cluster-"))
    cluster = PatroniCluster(work, haproxy=True)
    try:
        cluster.start()
        migrate.apply(cluster.node_url(cluster.leader()))
        cluster.wait_healthy(180)
        yield cluster
    finally:
        cluster.close()
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.integration
async def test_reads_through_the_haproxy_replica_port(patroni: PatroniCluster) -> None:
    """The shipped HAProxy configuration's replicas front as the read URL:
    tokened reads are served by Patroni's standbys and see their writes."""
    async with (
        running_server(
            patroni.haproxy_url(),
            read_database_url=patroni.haproxy_replica_url(),
            read_token_wait_seconds=2.0,
        ) as srv,
        Api.connect(srv) as api,
    ):
        routed = standbys_of(srv)
        for _ in range(5):
            specialist_id, token = await create(api)
            assert await get(api, specialist_id, token) is grpc.StatusCode.OK
        assert routed.counters.standby >= 1
        assert all(wait <= 2.0 for wait in routed.counters.token_waits)
        print(f"token waits through HAProxy: {sorted(routed.counters.token_waits)}")


def test_every_rpc_carries_a_token_one_way_or_is_named() -> None:
    """Every write's response has `consistency_token` (the interceptor fills
    it by descriptor), every read a standby may serve takes one in its
    request; an RPC with neither must be named here, so a new RPC cannot
    silently drop out of read-your-writes."""
    from booking.v1 import (
        appointment_pb2,
        auth_pb2,
        calendar_pb2,
        schedule_pb2,
        slot_pb2,
        specialist_pb2,
        user_pb2,
        waitlist_pb2,
        webhook_pb2,
    )

    # WhoAmI reads the caller's own account on the primary (READ_PRIMARY).
    neither = {"booking.v1.AuthService.WhoAmI"}
    writes: set[str] = set()
    reads: set[str] = set()
    other: set[str] = set()
    for module in (
        appointment_pb2,
        auth_pb2,
        calendar_pb2,
        schedule_pb2,
        slot_pb2,
        specialist_pb2,
        user_pb2,
        waitlist_pb2,
        webhook_pb2,
    ):
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                out = "consistency_token" in method.output_type.fields_by_name
                inp = "consistency_token" in method.input_type.fields_by_name
                assert not (out and inp), method.full_name
                (writes if out else reads if inp else other).add(method.full_name)
    assert other == neither
    assert "booking.v1.AppointmentService.HoldSlot" in writes
    assert "booking.v1.AppointmentService.WatchAppointmentEvents" in reads
    assert len(writes) == 28 and len(reads) == 16
