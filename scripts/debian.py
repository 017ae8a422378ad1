"""Install Debian packages for tools the checks need, when missing.

    python scripts/debian.py promtool=prometheus podman=podman

Used by scripts/image.py (podman, buildah, debootstrap, runc) and
tests/test_monitoring.py (promtool, from the `prometheus` package). Needs
root, as CI has; apt-get update runs first.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping


def ensure(tools: Mapping[str, str]) -> None:
    """Make every command of `tools` (command -> Debian package) available."""
    missing = sorted({pkg for tool, pkg in tools.items() if shutil.which(tool) is None})
    if not missing:
        return
    if os.geteuid() != 0:
        raise RuntimeError(f"missing {' '.join(missing)}: apt-get install them, or run as root")
    print(f"debian: installing {' '.join(missing)}", file=sys.stderr, flush=True)
    apt = ["apt-get", "-q", "-o", "DPkg::Lock::Timeout=600"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for args in (["update"], ["install", "-y", "--no-install-recommends", *missing]):
        done = subprocess.run([*apt, *args], env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"apt-get {args[0]} failed:\n{done.stdout}{done.stderr}")
    still = [tool for tool in tools if shutil.which(tool) is None]
    if still:
        raise RuntimeError(f"installed {' '.join(missing)}, still missing {' '.join(still)}")


if __name__ == "__main__":
    ensure(dict(arg.split("=", 1) for arg in sys.argv[1:]))
