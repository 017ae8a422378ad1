"""Package layout for booking-service (all other metadata lives in pyproject.toml).

- ``booking`` (generated gRPC/protobuf code) lives in ``gen/booking`` and is mapped
  with package_dir, so ``import booking.v1.x_pb2`` works in editable and regular installs.
- ``service`` and ``storage`` (and their subpackages) are found at the repository
  root. The benchmark and the fault-injection suite are not part of this wheel: they
  are the separate ``booking-service-tools`` distribution in ``tools/``.
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
        "booking.v1": ["descriptor_set.binpb"],
        "storage": ["sql/*.sql"],
        "storage.migrations": ["*.sql"],
    },
)
