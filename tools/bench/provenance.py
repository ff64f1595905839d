"""What produced a benchmark result: the source tree, the machine, the versions.

The benchmarks run on GPU machines from a copy of the working tree, without its .git or laid
over an older clone (whose commit git then reports, "with changes"): so besides the git commit,
every result carries a digest of the sources that were run (kernels-cpp/, the packages' sources
and build files, tools/bench/), which is what identifies them. Printing the digest of a checkout
matches a result to the commit it came from:

    python tools/bench/provenance.py            # digest (and commit) of this tree
    python tools/bench/provenance.py RESULT.json  # does RESULT.json come from this tree?
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
try:  # the atomic writer of quamba-layers (installed, or beside this tree)
    from quamba_layers.io_utils import atomic_write_json
except ImportError:
    sys.path.append(str(ROOT / "packages" / "quamba-layers" / "src"))
    from quamba_layers.io_utils import atomic_write_json

# What a benchmark's numbers depend on: device code, bindings, the Python that launches it, the
# benchmark scripts. Documentation and tests are left out (editing them changes no number).
SOURCE_SUFFIXES = (".py", ".cu", ".cuh", ".h", ".cpp", ".toml", ".txt")
SOURCE_ROOTS = ("kernels-cpp", "packages", "tools/bench")


def _source_files(root: Path) -> list[Path]:
    files = []
    for top in SOURCE_ROOTS:
        base = root / top
        if not base.is_dir():
            continue
        for path in base.rglob("*"):
            rel = path.relative_to(root).parts
            if not path.is_file() or path.suffix not in SOURCE_SUFFIXES:
                continue
            if "__pycache__" in rel or "tests" in rel or "build" in rel:
                continue
            files.append(path)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def source_digest(root: Path = ROOT) -> str:
    """sha256 over the relative paths and contents of the benchmarked sources under ``root``."""
    digest = hashlib.sha256()
    for path in _source_files(root):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def git_state(root: Path = ROOT) -> tuple[str | None, bool | None]:
    """(commit, whether the benchmarked sources differ from it), or (None, None) without git."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", *args], cwd=root, capture_output=True, text=True, timeout=20, check=False
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return None, None
    changes = git("status", "--porcelain", "--", *SOURCE_ROOTS)
    return commit, (None if changes is None else bool(changes))


def provenance() -> dict:
    """Everything a benchmark result should record about what produced it."""
    commit, dirty = git_state()
    record = {
        "source_digest": source_digest(),
        "git_commit": commit,
        "git_dirty": dirty,
        "created_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "host": platform.node(),
        "python": platform.python_version(),
    }
    try:
        import torch

        record["torch"] = torch.__version__
        record["torch_cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            record["device"] = torch.cuda.get_device_name()
    except ImportError:
        pass
    return record


def write_result(payload: dict, path: str | Path) -> None:
    """``payload`` with its provenance, as JSON at ``path`` (atomically: never half-written)."""
    atomic_write_json(path, {**payload, "provenance": provenance()})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="*", type=Path, help="result JSON files to check")
    args = parser.parse_args()
    digest = source_digest()
    commit, dirty = git_state()
    state = "" if commit is None else f" (commit {commit}{', with changes' if dirty else ''})"
    print(f"this tree: source digest {digest}{state}")
    status = 0
    for path in args.results:
        recorded = json.loads(path.read_text()).get("provenance", {})
        theirs = recorded.get("source_digest")
        if theirs is None:
            print(f"{path}: no provenance recorded")
            status = 1
        elif theirs == digest:
            print(f"{path}: produced by these sources")
        else:
            print(f"{path}: other sources (digest {theirs}, commit {recorded.get('git_commit')})")
            status = 1
    return status


if __name__ == "__main__":
    raise SystemExit(main())
