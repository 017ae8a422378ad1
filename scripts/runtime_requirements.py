"""Print the runtime requirements of pyproject.toml, one per line.

The image installs these first (a cached layer until pyproject.toml changes),
then the project itself with ``pip install --no-deps .``; tests/test_image.py
installs a virtual environment the same way. Extras (``embedded``, ``dev``, ...)
are left out on purpose: the image runs against an external PostgreSQL.

Usage: python runtime_requirements.py [path/to/pyproject.toml] > requirements.txt
"""

from __future__ import annotations

import sys
import tomllib


def runtime_requirements(pyproject: str) -> list[str]:
    with open(pyproject, "rb") as f:
        project = tomllib.load(f)["project"]
    return [str(req) for req in project["dependencies"]]


if __name__ == "__main__":
    print("\n".join(runtime_requirements(sys.argv[1] if len(sys.argv) > 1 else "pyproject.toml")))
