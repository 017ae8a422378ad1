"""``chaos --cluster patroni``: the system under test is a Patroni cluster
(tools/cluster: etcd, three PostgreSQL nodes in synchronous mode) and N
server replicas on its multi-host URL (or on HAProxy with ``--haproxy``).

It offers what chaos.cluster.Cluster offers (url, replicas, pg_freeze, ...)
plus the cluster faults, so the injector and the checks are the same ones.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import sys
import time
from pathlib import Path

from chaos import checks
from chaos.cluster import Replica, ReplicaSettings
from cluster.patroni import Node, PatroniCluster

# Fault kinds only a cluster has.
CLUSTER_KINDS = (
    "primary_kill",  # SIGKILL of the leader's postmaster
    "primary_hang",  # SIGSTOP of the leader's PostgreSQL, longer than the TTL
    "node_hang",  # SIGSTOP of the leader's PostgreSQL and Patroni, longer than the TTL
    "switchover",  # planned, through Patroni's REST API
    "sync_standby_kill",  # SIGKILL of the synchronous standby's postmaster
    "etcd_loss",  # the only etcd member frozen, longer than the TTL
)
# Kinds of the single-database mode that also apply to a cluster (pg_restart_*
# are Patroni's to do: a restart behind its back is primary_kill).
SHARED_KINDS = ("terminate_backend", "kill_replica", "pg_sigstop")
KINDS = CLUSTER_KINDS + SHARED_KINDS


class PatroniChaosCluster:
    def __init__(
        self,
        work_dir: Path,
        replicas: int,
        settings: ReplicaSettings,
        *,
        haproxy: bool = False,
        hang_seconds: float = 25.0,
        standby_reads: bool = True,
    ) -> None:
        self.work_dir = work_dir
        # Whether the replicas read (and stream events) from the standbys.
        self.standby_reads = standby_reads
        self.n_replicas = replicas
        self.settings = settings
        self.pc = PatroniCluster(work_dir / "cluster", haproxy=haproxy)
        self.haproxy = haproxy
        self.hang_seconds = hang_seconds
        self.replicas: list[Replica] = []
        self.database_name = "booking"
        # (fault kind, old leader, new leader) for the report.
        self.leader_changes = 0
        # time.monotonic() when the current fault hit (the signal sent, the
        # switchover requested): recovery is timed from there.
        self.hit_at: float | None = None
        self.leader_writes_stats = checks.LeaderWrites()

    def start(self) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        self.pc.start()
        print(
            f"chaos: Patroni cluster up in {time.monotonic() - started:.1f}s",
            file=sys.stderr,
            flush=True,
        )
        for i in range(self.n_replicas):
            replica = Replica.create(
                i,
                self.service_url,
                self.work_dir / "logs" / f"replica-{i}.log",
                self.settings,
                read_url=self.read_url,
            )
            self.replicas.append(replica)
            replica.start(timeout=120)

    def close(self, *, keep_database: bool = False) -> None:
        del keep_database

        def stop(replica: Replica) -> None:
            try:
                replica.stop()
            except Exception:  # noqa: BLE001 - best effort at shutdown
                replica.kill()

        # All at once: each drains for its grace period.
        with concurrent.futures.ThreadPoolExecutor(max(1, len(self.replicas))) as pool:
            list(pool.map(stop, self.replicas))
        self.pc.close()

    # -- facts ---------------------------------------------------------------------

    @property
    def service_url(self) -> str:
        return self.pc.haproxy_url() if self.haproxy else self.pc.url()

    @property
    def read_url(self) -> str | None:
        """The replicas' --read-database-url: every node by address (the
        service checks each and reads only from those in recovery, so the
        URL stays right across failovers), or HAProxy's replicas front;
        None without standby reads."""
        if not self.standby_reads:
            return None
        if self.haproxy:
            return self.pc.haproxy_replica_url()
        return self.pc.read_url()

    @property
    def url(self) -> str:
        """The multi-host URL (seeding, checks, terminate_backend)."""
        return self.pc.url()

    @property
    def admin_url(self) -> str:
        return self.pc.url("postgres")

    @property
    def targets(self) -> list[str]:
        return [r.target for r in self.replicas]

    def processes(self) -> dict[str, int]:
        """The processes whose sessions the standby observer attributes:
        each running replica, and HAProxy (through it a session's client
        port is HAProxy's, whichever replica sent the read)."""
        out = {
            r.name: r.proc.pid
            for r in self.replicas
            if r.proc is not None and r.proc.poll() is None
        }
        haproxy = self.pc.haproxy_pid()
        if haproxy is not None:
            out["haproxy"] = haproxy
        return out

    def log_paths(self) -> list[Path]:
        return [r.log_path for r in self.replicas]

    def postgres_pids(self) -> list[int]:
        return self.pc.leader().postgres_pids()

    def leader_writes(self) -> tuple[list[checks.Violation], checks.LeaderWrites]:
        """The final check "no write ever reached a node that was not the
        leader": every rewind's witness against Patroni's final history.
        Waits until every node streams from the leader on its timeline (so
        every diverged node has been rewound, and witnessed)."""
        self.pc.wait_converged(240)
        witnesses = [
            checks.parse_rewind_witness(node.name, path.name, path.read_text())
            for node in self.pc.nodes
            for path in sorted(node.rewinds_dir.glob("rewind-*.txt"))
        ]
        return checks.check_writes_on_leader(self.pc.history(), witnesses)

    # -- faults --------------------------------------------------------------------

    def restart_replica(self, replica: Replica) -> None:
        replica.start(timeout=120)

    def pg_restart(self, mode: str) -> None:
        raise ValueError(f"pg_restart_{mode} is not a cluster fault (use primary_kill)")

    def pg_freeze(self, seconds: float) -> int:
        leader = self.pc.leader()
        pids = self.pc.freeze(leader)
        try:
            time.sleep(seconds)
        finally:
            self.pc.thaw(pids)
        return len(pids)

    def prepare(self) -> Node:
        """Before a cluster fault: wait until the cluster is healthy (a
        leader, both standbys streaming, a synchronous standby); the leader."""
        self.pc.wait_healthy(180)
        return self.pc.leader()

    def cluster_fault(self, kind: str, before: Node) -> str:
        """Inject `kind` (`before` is the leader) and return once it is over
        (the hung node resumed, etcd back); a description for the report."""
        pc = self.pc
        if kind == "primary_kill":
            pc.kill_primary_postmaster()
            self.hit_at = time.monotonic()
            detail = f"{before.name}"
        elif kind in ("primary_hang", "node_hang"):
            pids = pc.freeze(before, whole_node=kind == "node_hang")
            self.hit_at = time.monotonic()
            try:
                time.sleep(self.hang_seconds)
            finally:
                pc.thaw(pids)
            detail = f"{before.name} for {self.hang_seconds:.0f}s"
        elif kind == "switchover":
            self.hit_at = time.monotonic()
            old, new = pc.switchover()
            pc.wait_for_leader(60, other_than=old)
            detail = f"{old.name} -> {new.name}"
        elif kind == "sync_standby_kill":
            victim = pc.kill_sync_standby()
            self.hit_at = time.monotonic()
            detail = victim.name if victim else "no synchronous standby"
        elif kind == "etcd_loss":
            pc.stop_etcd()
            self.hit_at = time.monotonic()
            try:
                time.sleep(self.hang_seconds)
            finally:
                pc.start_etcd()
            detail = f"etcd frozen {self.hang_seconds:.0f}s"
        else:
            raise ValueError(f"unknown cluster fault {kind}")
        after: Node | None = None
        with contextlib.suppress(Exception):
            after = pc.wait_for_leader(60)
        if after is not None and after is not before:
            self.leader_changes += 1
            detail += f"; leader {before.name} -> {after.name}"
        return detail
