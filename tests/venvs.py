"""Clean virtual environments for packaging tests.

Nothing from the test process leaks in: no site-packages of the project's own
.venv, no PYTHONPATH, and commands run outside the repository so that the
current directory cannot make ``service`` or ``storage`` importable. pip may
download from the package index; its cache is used, so a second run is quick.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def clean_env(**extra: str) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in {"PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "DATABASE_URL"}
        and not key.startswith("BOOKING_")
    }
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONDONTWRITEBYTECODE="1", **extra)
    return env


def make_venv(path: Path) -> Path:
    """Create a virtual environment at `path`; returns its python."""
    # The base interpreter, not this .venv's: a venv made from a venv is still clean,
    # but this keeps the chain short.
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(path)], check=True, cwd=path.parent)
    return path / "bin" / "python"


def pip(python: Path, *args: str, cwd: Path) -> None:
    result = subprocess.run(
        [str(python), "-m", "pip", "install", "--progress-bar", "off", "-q", *args],
        cwd=cwd,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"pip install {' '.join(args)} failed:\n{result.stderr}"


def importable(python: Path, module: str, cwd: Path) -> bool:
    result = subprocess.run(
        [str(python), "-c", f"import {module}"], cwd=cwd, env=clean_env(), capture_output=True
    )
    return result.returncode == 0
