"""Build and run the persistent-decode-kernel probe (persistent_decode_probe.cu), record its result.

The probe times the structure a persistent W8A8 decode kernel would have (weights streamed through
a shared-memory ring while the blocks meet between a layer's phases) at the real byte counts of
Mamba 130m / 1.4b / 2.8b; see the header of the .cu file. This script compiles it with nvcc for
sm_90a, runs it (it prints a table), and writes the table with the run's provenance as JSON.

Usage: python3 tools/bench/persistent_decode_probe.py [--json PATH]  (writes
       $OUT/persistent_decode_probe.json with OUT)
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

from bench_kernels import write_result  # noqa: E402


def compile_command(nvcc: str, binary: Path) -> list[str]:
    """nvcc's command line for the probe (sm_90a; tma.cuh comes from kernels-cpp/csrc)."""
    return [nvcc, "-std=c++17", "-O3", "-arch=sm_90a", f"-I{ROOT / 'kernels-cpp' / 'csrc'}",
            str(HERE / "persistent_decode_probe.cu"), "-o", str(binary)]  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None, help="result file (default: $OUT/...)")
    args = parser.parse_args()
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        print("persistent_decode_probe: nvcc not found on PATH (the probe is CUDA source)")
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        binary = Path(tmp) / "persistent_decode_probe"
        result = Path(tmp) / "result.json"
        subprocess.run(compile_command(nvcc, binary), check=True)
        subprocess.run([str(binary), "--json", str(result)], check=True)
        payload = {"kind": "persistent_decode_probe", **json.loads(result.read_text())}
    write_result(payload, "persistent_decode_probe.json", args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
