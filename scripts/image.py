"""Build the booking-service image with podman, from a base image made of
Debian's packages (no registry needed).

    python scripts/image.py base     # the base image only (cached by its recipe)
    python scripts/image.py build    # base + the project's Dockerfile
    scripts/image-test               # build, then run it against PostgreSQL
                                     # (tests/container/test_image_container.py)

Run as root (CI is): podman, buildah and debootstrap are installed from
Debian when missing. The base is `debootstrap --variant=minbase bookworm`
with python3, python3-venv, python3-pip, python-is-python3 and
ca-certificates, plus the host's locally added CA certificates (package
downloads may pass a proxy with its own CA), imported with `podman import`
and tagged with a hash of that recipe: a second run reuses it. The project
image is built with `--format docker` (the OCI format drops HEALTHCHECK)
and `--network host`, with the Dockerfile's PYTHON_IMAGE set to that base.

podman reads the containers.conf written by `containers_env()`: this
machine's sandbox needs runc, cgroupfs, a file events logger and explicit
ulimits (docs/operations.md, "The image").
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# Run as `python scripts/image.py` too: the repository's root makes `scripts` importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from scripts import debian  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
BASE_PACKAGES = ("python3", "python3-venv", "python3-pip", "python-is-python3", "ca-certificates")
HOST_PACKAGES = {
    "podman": "podman",
    "buildah": "buildah",
    "debootstrap": "debootstrap",
    "runc": "runc",
}
LOCAL_CA_DIR = Path("/usr/local/share/ca-certificates")
BASE_NAME = "localhost/booking-base"
# Not compose's booking-service:local: podman-compose builds that one in the OCI
# format, without the HEALTHCHECK.
IMAGE = "localhost/booking-service:debian"
ENV_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Bump when the recipe below changes in a way its inputs do not show.
RECIPE_VERSION = 1

CONTAINERS_CONF = """\
# Written by scripts/image.py. This sandbox: crun refuses the hybrid cgroup
# setup, there is no systemd (so no journald events, no scheduled health
# checks) and podman's default rlimits cannot be set.
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"""


def log(message: str) -> None:
    print(f"image: {message}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    path = Path(base) / "booking-service" / "image"
    path.mkdir(parents=True, exist_ok=True)
    return path


def ensure_tools() -> None:
    """podman, buildah, debootstrap and runc from Debian, when missing."""
    debian.ensure(HOST_PACKAGES)


def containers_env() -> dict[str, str]:
    """The environment podman runs in: CONTAINERS_CONF pointing at this
    sandbox's settings."""
    conf = cache_dir() / "containers.conf"
    if not conf.exists() or conf.read_text() != CONTAINERS_CONF:
        conf.write_text(CONTAINERS_CONF)
    return {**os.environ, "CONTAINERS_CONF": str(conf)}


def podman(*args: str, check: bool = True, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # type: ignore[call-overload, no-any-return]
        ["podman", *args], env=containers_env(), text=True, check=check, **kwargs
    )


def _local_cas() -> list[Path]:
    if not LOCAL_CA_DIR.is_dir():
        return []
    return sorted(p for p in LOCAL_CA_DIR.rglob("*.crt") if p.is_file())


def base_recipe() -> dict[str, object]:
    """Everything the base image is made of; its hash is the image's tag."""
    return {
        "version": RECIPE_VERSION,
        "suite": SUITE,
        "variant": "minbase",
        "mirror": MIRROR,
        "packages": list(BASE_PACKAGES),
        "env": {"PATH": ENV_PATH, "LANG": "C.UTF-8"},
        "ca": {
            str(p.relative_to(LOCAL_CA_DIR)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in _local_cas()
        },
    }


def base_tag(recipe: dict[str, object] | None = None) -> str:
    text = json.dumps(recipe if recipe is not None else base_recipe(), sort_keys=True)
    return f"{BASE_NAME}:{SUITE}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def image_exists(name: str) -> bool:
    return podman("image", "exists", name, check=False).returncode == 0


def image_size(name: str) -> int:
    out = podman("image", "inspect", "--format", "{{.Size}}", name, capture_output=True).stdout
    return int(out.strip())


@dataclass
class Base:
    tag: str
    seconds: float
    cached: bool


def ensure_base() -> Base:
    """The base image for the current recipe: reused, or made from Debian's packages."""
    ensure_tools()
    tag = base_tag()
    if image_exists(tag):
        log(f"base {tag} (cached)")
        return Base(tag, 0.0, True)
    log(f"making base {tag} with debootstrap ({SUITE}, minbase)")
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="booking-base-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        subprocess.run(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(BASE_PACKAGES)}",
                SUITE,
                str(rootfs),
                MIRROR,
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        target = rootfs / LOCAL_CA_DIR.relative_to("/")
        target.mkdir(parents=True, exist_ok=True)
        for ca in _local_cas():
            destination = target / ca.relative_to(LOCAL_CA_DIR)
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ca, destination)
        subprocess.run(
            ["chroot", str(rootfs), "update-ca-certificates"], check=True, stdout=subprocess.DEVNULL
        )
        # Downloaded packages and lists are not needed in the image.
        for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for item in (rootfs / leftover).glob("*"):
                if item.is_file():
                    item.unlink()
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        try:
            podman(
                "import",
                "--quiet",
                "--change",
                f"ENV PATH={ENV_PATH}",
                "--change",
                "ENV LANG=C.UTF-8",
                "-",
                tag,
                stdin=tar.stdout,
                stdout=subprocess.DEVNULL,
            )
        finally:
            assert tar.stdout is not None
            tar.stdout.close()
            if tar.wait() != 0:
                raise RuntimeError("tar of the base rootfs failed")
    seconds = time.monotonic() - start
    log(f"base {tag} made in {seconds:.1f} s")
    return Base(tag, seconds, False)


@dataclass
class Built:
    image: str
    base: Base
    seconds: float
    size: int


def build(image: str = IMAGE) -> Built:
    """The project's Dockerfile, built on the local base."""
    base = ensure_base()
    log(f"building {image} from {ROOT / 'Dockerfile'}")
    start = time.monotonic()
    podman(
        "build",
        "--format",
        "docker",
        "--network",
        "host",
        "--build-arg",
        f"PYTHON_IMAGE={base.tag}",
        "--tag",
        image,
        str(ROOT),
        stdout=subprocess.DEVNULL if not os.environ.get("IMAGE_VERBOSE") else None,
    )
    seconds = time.monotonic() - start
    size = image_size(image)
    log(f"built {image}: {size / 1e6:.0f} MB in {seconds:.1f} s")
    return Built(image, base, seconds, size)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["base", "build", "recipe"])
    args = parser.parse_args(argv)
    if args.what == "recipe":
        print(json.dumps(base_recipe(), indent=2, sort_keys=True))
        print(base_tag())
    elif args.what == "base":
        print(ensure_base().tag)
    else:
        built = build()
        print(
            f"{built.image} {built.size} bytes, built in {built.seconds:.1f} s on {built.base.tag}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
