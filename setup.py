"""Package layout for booking-service (all other metadata lives in pyproject.toml).

- ``booking`` (generated gRPC/protobuf code) lives in ``gen/booking`` and is mapped
  with package_dir, so ``import booking.v1.x_pb2`` works in editable and regular installs.
- ``service``, ``storage`` and ``bench`` (the benchmark harness behind
  ``booking-service bench``), ``chaos`` (the fault-injection suite behind
  ``booking-service chaos``; and any subpackages with an ``__init__.py``) are found
  automatically at the repository root.
- ``migrations/*.sql`` is shipped inside the wheel as ``storage/migrations/*.sql``
  (virtual package ``storage.migrations`` mapped to ``migrations/``). In a checkout /
  editable install the files stay at ``<repo>/migrations``.
"""

from setuptools import find_packages, setup

packages = (
    find_packages(where="gen", include=["booking", "booking.*"])
    + find_packages(
        where=".",
        include=[
            "service",
            "service.*",
            "storage",
            "storage.*",
            "bench",
            "bench.*",
            "chaos",
            "chaos.*",
        ],
    )
    + ["storage.migrations"]
)

setup(
    packages=packages,
    package_dir={
        "booking": "gen/booking",
        "storage.migrations": "migrations",
    },
    package_data={
        "": ["py.typed", "*.pyi"],
        "storage": ["sql/*.sql"],
        "storage.migrations": ["*.sql"],
    },
)
