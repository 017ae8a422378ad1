"""Package layout for booking-client (all other metadata lives in pyproject.toml).

- ``booking_client`` (helpers) lives in ``src/``.
- ``booking`` (the generated ``booking.v1`` modules) is the repository's
  ``gen/booking``, the same files the server uses. setuptools cannot map a
  package to a directory outside the project, so each build copies it into
  ``_stubs/`` (ignored by git) first. An sdist carries ``_stubs/``, so a wheel
  built from the sdist, away from the repository, still has the stubs.
"""

import shutil
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent
GENERATED = HERE.parent.parent / "gen" / "booking"
STUBS = HERE / "_stubs" / "booking"

if GENERATED.is_dir():
    shutil.rmtree(STUBS, ignore_errors=True)
    shutil.copytree(GENERATED, STUBS, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
elif not (STUBS / "v1").is_dir():
    raise SystemExit(
        "booking-client: no generated stubs: build from the booking-service repository "
        "(clients/python) or from an sdist"
    )

setup(
    packages=["booking", "booking.v1", "booking_client"],
    package_dir={"booking": "_stubs/booking", "booking_client": "src/booking_client"},
    package_data={
        "booking": ["py.typed", "*.pyi"],
        "booking.v1": ["*.pyi", "descriptor_set.binpb"],
        "booking_client": ["py.typed", "service_config.json"],
    },
)
