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
    """Create an empty virtual environment at `path`; returns its python."""
    # Without pip: seeding pip into a venv takes longer than the installs themselves.
    # This process's pip installs into it instead (`pip --python`), with the same result.
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--without-pip", str(path)], check=True, cwd=path.parent)
    return path / "bin" / "python"


def pip(python: Path, *args: str, cwd: Path) -> None:
    """pip install `args` into the venv of `python`."""
    command = [sys.executable, "-m", "pip", "--python", str(python), "install"]
    result = subprocess.run(
        [*command, "--progress-bar", "off", "-q", *args],
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
