"""The service on a Patroni cluster: etcd, three PostgreSQL nodes in
synchronous mode (tools/cluster, configured from deploy/), the service
connecting with a multi-host DATABASE_URL or through HAProxy.

The cluster installs what it needs (Patroni from PyPI, etcd and HAProxy from
Debian). Faults are real: the primary's postmaster SIGKILLed, its whole node
(PostgreSQL and Patroni) SIGSTOPped past Patroni's TTL. Loops that wait for
a recovery have generous bounds so a failure is a failure, never a hang;
how long recovery took is printed, not asserted.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path

import asyncpg
import grpc
import pytest

from booking.v1 import appointment_pb2 as apb
from chaos import checks
from cluster.patroni import Node, PatroniCluster, haproxy_available
from storage import embedded, errors, hosts
from tests.support import Api, hours_from_now, running_server

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
RECOVERY_BOUND = 90.0  # a bound on waiting, not a goal


@pytest.fixture(scope="module")
def pc() -> Iterator[PatroniCluster]:
    work = Path(tempfile.mkdtemp(prefix="booking-cluster-"))
    cluster = PatroniCluster(work, haproxy=haproxy_available())
    try:
        cluster.start()
        subprocess.run(
            [sys.executable, "-m", "service.cli", "migrate"],
            cwd=ROOT,
            # One node: the multi-host URL is the subject of a test below.
            env={**os.environ, "DATABASE_URL": cluster.node_url(cluster.leader())},
            check=True,
            capture_output=True,
            timeout=120,
        )
        yield cluster
    finally:
        cluster.close()
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture
def healthy(pc: PatroniCluster) -> PatroniCluster:
    pc.wait_healthy(180)
    return pc


async def _hold_until_ok(api: Api, slot_id: str, user_id: str, request_id: str) -> float:
    """HoldSlot with one request_id, retried on UNAVAILABLE/DEADLINE_EXCEEDED
    until it succeeds; returns the seconds it took."""
    started = time.monotonic()
    while True:
        try:
            await api.appointments.HoldSlot(
                apb.HoldSlotRequest(slot_id=slot_id, user_id=user_id, request_id=request_id),
                metadata=api.md,
                timeout=2.0,
            )
            return time.monotonic() - started
        except grpc.aio.AioRpcError as err:
            assert err.code() in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.DEADLINE_EXCEEDED,
            ), err
            if time.monotonic() - started > RECOVERY_BOUND:
                raise
            await asyncio.sleep(0.2)


@pytest.fixture
async def booking(healthy: PatroniCluster) -> AsyncIterator[tuple[Api, str, str]]:
    """A server on the multi-host URL: an admin Api, a specialist id, a client user id."""
    async with running_server(healthy.url()) as server, Api.connect(server) as api:
        specialist = await api.specialist()
        _client, user_id = await api.client()
        yield api, specialist.id, user_id


async def _slot(api: Api, specialist_id: str) -> str:
    """A new one-minute slot at a random time, retried through an outage (an
    attempt answered UNAVAILABLE may have committed: the retry picks
    another time rather than meet its own slot)."""
    while True:
        start = hours_from_now(24 + (uuid.uuid4().int % 10_000)) + timedelta(
            minutes=uuid.uuid4().int % 50
        )
        try:
            return (await api.slot(specialist_id, start, minutes=1)).id
        except grpc.aio.AioRpcError as err:
            if err.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ALREADY_EXISTS):
                raise
            await asyncio.sleep(0.2)


def test_migrate_and_create_admin_accept_a_multi_host_url(healthy: PatroniCluster) -> None:
    # A first host that refuses connections: the scan moves on to the others.
    dead = embedded._free_port()  # noqa: SLF001
    url = healthy.url().replace("@", f"@127.0.0.1:{dead},", 1)
    env = {**os.environ, "DATABASE_URL": url}
    for action in ("apply", "list"):
        migrate = subprocess.run(
            [sys.executable, "-m", "service.cli", "migrate", action],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert migrate.returncode == 0, migrate.stderr
    assert "pending" not in migrate.stdout and "applied" in migrate.stdout
    email = f"admin-{uuid.uuid4().hex[:8]}@example.com"
    admin = subprocess.run(
        [sys.executable, "-m", "service.cli", "create-admin", "--email", email, "--password-stdin"],
        cwd=ROOT,
        env=env,
        input="a long enough admin password 123\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert admin.returncode == 0, admin.stderr
    assert f"created ADMIN {email}" in admin.stdout


async def test_a_killed_primary_is_replaced_without_a_restart(
    healthy: PatroniCluster, booking: tuple[Api, str, str]
) -> None:
    api, specialist_id, user_id = booking
    await _hold_until_ok(api, await _slot(api, specialist_id), user_id, str(uuid.uuid4()))
    old = healthy.kill_primary_postmaster()
    slot_id = await _slot(api, specialist_id)
    took = await _hold_until_ok(api, slot_id, user_id, str(uuid.uuid4()))
    new = healthy.wait_for_leader(60)
    print(f"primary {old.name} killed: first OK hold after {took:.1f}s, on {new.name}")
    conn = await asyncpg.connect(healthy.node_url(new), ssl=False)
    try:
        status = await conn.fetchval(
            "SELECT status::text FROM appointments WHERE time_slot_id = $1", slot_id
        )
    finally:
        await conn.close()
    assert status == "HOLD"


async def test_through_haproxy_a_killed_primary_is_replaced(healthy: PatroniCluster) -> None:
    if not healthy.front_port:
        pytest.fail("HAProxy (Debian haproxy) could not be installed")
    async with running_server(healthy.haproxy_url()) as server, Api.connect(server) as api:
        specialist = await api.specialist()
        _client, user_id = await api.client()
        await _hold_until_ok(api, await _slot(api, specialist.id), user_id, str(uuid.uuid4()))
        old = healthy.kill_primary_postmaster()
        took = await _hold_until_ok(
            api, await _slot(api, specialist.id), user_id, str(uuid.uuid4())
        )
        print(f"through HAProxy, primary {old.name} killed: first OK hold after {took:.1f}s")


async def test_a_hung_primary_does_not_hold_the_service(healthy: PatroniCluster) -> None:
    # A small pool and more callers than connections, each retrying on its
    # deadline: a call that leaves its connection stuck on the hung node
    # (waiting for a cancel request or a rollback the frozen server never
    # answers) takes a pool slot with it, and three of those would starve
    # every later call until the node resumed.
    async with (
        running_server(healthy.url(), pool_max_size=3) as server,
        Api.connect(server) as api,
    ):
        specialist = await api.specialist()
        _client, user_id = await api.client()
        warm = [await _slot(api, specialist.id) for _ in range(3)]
        await asyncio.gather(*(_hold_until_ok(api, s, user_id, str(uuid.uuid4())) for s in warm))
        slots = [await _slot(api, specialist.id) for _ in range(8)]
        old = healthy.leader()
        frozen = healthy.freeze(old, whole_node=True)
        try:
            hung_at = time.monotonic()
            calls = [
                asyncio.create_task(_hold_until_ok(api, slot_id, user_id, str(uuid.uuid4())))
                for slot_id in slots
            ]
            new = await asyncio.to_thread(healthy.wait_for_leader, 60, other_than=old)
            promoted = time.monotonic() - hung_at
            # Every call succeeds while the old primary is still frozen:
            # they reached the new leader instead of waiting for the hung one.
            await asyncio.gather(*calls)
            done = time.monotonic() - hung_at
            print(
                f"{old.name} hung: {new.name} promoted after {promoted:.1f}s,"
                f" every call OK {done - promoted:.1f}s after that"
            )
        finally:
            healthy.thaw(frozen)


async def test_a_demoted_node_that_resumes_takes_no_write(healthy: PatroniCluster) -> None:
    old = healthy.leader()
    frozen = healthy.freeze(old, whole_node=True)
    try:
        new = await asyncio.to_thread(healthy.wait_for_leader, 60, other_than=old)
        # Patroni names the new leader while its PostgreSQL is still
        # finishing the promotion: until then the old node rightly wins.
        await _until_promoted(healthy, new)
        # Resume the old node's PostgreSQL but not its Patroni: it stays a
        # primary on the old timeline, the state a hung node is in for a
        # moment after it resumes, before Patroni demotes it.
        postgres = set(old.postgres_pids())
        healthy.thaw([pid for pid in frozen if pid in postgres])
        conn = await asyncpg.connect(healthy.node_url(old), ssl=False)
        try:
            assert not await conn.fetchval("SELECT pg_is_in_recovery()")
            before = await conn.fetchval("SELECT count(*) FROM appointments")
        finally:
            await conn.close()
        # The old primary listed first, as an operator's URL might.
        others = [n for n in healthy.nodes if n is not old]
        url = healthy.url().replace(
            ",".join(f"127.0.0.1:{n.pg_port}" for n in healthy.nodes),
            ",".join(f"127.0.0.1:{n.pg_port}" for n in [old, *others]),
        )
        # Time enough for every node to answer on a loaded machine: this is
        # about which answer wins, not about timeouts.
        url += "&connect_timeout=10"
        finder = hosts.Finder(url)
        probe = await finder.connect(timeout=30)
        await probe.close()
        assert finder.current == hosts.Host("127.0.0.1", new.pg_port), await _roles(healthy)
        async with running_server(url) as server, Api.connect(server) as api:
            specialist = await api.specialist()
            _client, user_id = await api.client()
            for _ in range(5):
                await _hold_until_ok(
                    api, await _slot(api, specialist.id), user_id, str(uuid.uuid4())
                )
        conn = await asyncpg.connect(healthy.node_url(old), ssl=False)
        try:
            after = await conn.fetchval("SELECT count(*) FROM appointments")
            # A write to a service table is refused at its commit: no
            # synchronous standby has replied to this node since it froze
            # (the standby lease, storage/sql/durability.sql).
            with pytest.raises(asyncpg.PostgresError) as refused:
                await conn.execute(
                    "INSERT INTO login_throttle (email_key) VALUES ($1)", str(uuid.uuid4())
                )
            assert isinstance(errors.translate(refused.value), errors.StandbyLeaseExpired)
            # Now a write of our own reaches the demoted node (committed
            # locally: its synchronous standby follows someone else). The
            # chaos checker must find it in the tail pg_rewind discards.
            async with conn.transaction():
                await conn.execute("SET LOCAL synchronous_commit TO local")
                table = f"demoted_write_{uuid.uuid4().hex}"
                await conn.execute(f"CREATE TABLE {table} (x int)")
                await conn.execute(f"INSERT INTO {table} VALUES (1)")
                xid = await conn.fetchval("SELECT pg_current_xact_id()::text::bigint")
        finally:
            await conn.close()
        assert after == before
    finally:
        healthy.thaw(frozen)
    # The old primary comes back as a standby (pg_rewind).
    healthy.wait_healthy(180)
    roles = {m["name"]: m["role"] for m in healthy.members()}
    assert roles[old.name] in ("replica", "sync_standby")
    # The final check of `chaos --cluster patroni` sees that write, and only
    # it (the resumed node's own autoanalyze commits touch catalogs only).
    healthy.wait_converged(180)
    witnesses = [
        checks.parse_rewind_witness(old.name, p.name, p.read_text())
        for p in sorted(old.rewinds_dir.glob("rewind-*.txt"))
    ]
    violations, stats = checks.check_writes_on_leader(healthy.history(), witnesses)
    seen = f"{[v.detail for v in violations]}, {stats}, xid {xid}"
    assert [v.check for v in violations] == ["writes_only_on_leader"], seen
    assert f"xid {xid & 0xFFFFFFFF} " in violations[0].detail, violations
    assert stats.after_promotion == 1


async def _until_promoted(pc: PatroniCluster, node: Node) -> None:
    """Wait (bounded) until `node`'s PostgreSQL has left recovery."""
    deadline = time.monotonic() + RECOVERY_BOUND
    while True:
        try:
            conn = await asyncpg.connect(pc.node_url(node), ssl=False, timeout=5)
            try:
                if not await conn.fetchval("SELECT pg_is_in_recovery()"):
                    return
            finally:
                await conn.close()
        except (OSError, asyncpg.PostgresError, TimeoutError):
            pass
        assert time.monotonic() < deadline, f"{node.name} still in recovery"
        await asyncio.sleep(0.2)


async def _roles(pc: PatroniCluster) -> str:
    """Each node's answer to the role query, and Patroni's view (for a
    failure message)."""
    lines = []
    for node in pc.nodes:
        try:
            conn = await asyncpg.connect(pc.node_url(node), ssl=False, timeout=5)
            try:
                lines.append(
                    f"{node.name}:{node.pg_port} {tuple(await conn.fetchrow(hosts._ROLE_QUERY))}"
                )  # noqa: SLF001
            finally:
                await conn.close()
        except Exception as exc:  # noqa: BLE001 - a diagnostic
            lines.append(f"{node.name}:{node.pg_port} {type(exc).__name__}")
    members = await asyncio.to_thread(pc.members)
    return "; ".join(lines) + f"; patroni: {[(m['name'], m['role']) for m in members]}"
