"""protos/ must pass `buf lint` and be `buf format`-clean (buf comes from `npm ci`)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
BUF = REPO_ROOT / "node_modules" / ".bin" / "buf"


def _run_buf(*args: str) -> subprocess.CompletedProcess[str]:
    if not BUF.exists():
        pytest.fail(
            f"buf not found at {BUF}: run `npm ci` in {REPO_ROOT} (./scripts/test does it)",
            pytrace=False,
        )
    return subprocess.run(
        [str(BUF), *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
    )


def test_buf_lint() -> None:
    result = _run_buf("lint")
    assert result.returncode == 0, (
        f"`buf lint` failed (exit {result.returncode}):\n{result.stdout}{result.stderr}"
    )


def test_buf_format() -> None:
    result = _run_buf("format", "-d", "--exit-code")
    assert result.returncode == 0, (
        f"`buf format -d --exit-code` reported changes (exit {result.returncode}); "
        f"fix with `node_modules/.bin/buf format -w`:\n{result.stdout}{result.stderr}"
    )
