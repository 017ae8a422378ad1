"""gen/ must be exactly what scripts/gen_protos.py produces from protos/.

If this fails, run `.venv/bin/python scripts/gen_protos.py` and commit gen/.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
GEN_DIR = REPO_ROOT / "gen"
GEN_SCRIPT = REPO_ROOT / "scripts" / "gen_protos.py"


def _tree(root: Path) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    for path in sorted(root.rglob("*")):
        if not path.is_file() or "__pycache__" in path.parts or path.suffix == ".pyc":
            continue
        files[path.relative_to(root).as_posix()] = path.read_bytes()
    return files


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    out = tmp_path / "gen"
    result = subprocess.run(
        [sys.executable, str(GEN_SCRIPT), str(out)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, (
        f"scripts/gen_protos.py failed (exit {result.returncode}):\n"
        f"{result.stdout}\n{result.stderr}"
    )

    committed = _tree(GEN_DIR)
    fresh = _tree(out)
    assert fresh, "scripts/gen_protos.py generated no files"

    missing = sorted(set(fresh) - set(committed))
    stale = sorted(set(committed) - set(fresh))
    differing = sorted(n for n in set(fresh) & set(committed) if fresh[n] != committed[n])
    problems = [
        *(f"  missing from gen/: {name}" for name in missing),
        *(f"  stale in gen/ (not generated any more): {name}" for name in stale),
        *(f"  differs: gen/{name}" for name in differing),
    ]
    assert not problems, (
        "gen/ is out of date with protos/ — run `.venv/bin/python scripts/gen_protos.py` "
        "and commit gen/:\n" + "\n".join(problems)
    )
