"""The persistent-decode-kernel probe (tools/bench/persistent_decode_probe.cu) stays buildable.

It runs only on an sm_90 GPU (tools/gpu_check.sh with PROBE=1); here nvcc compiles it, so that a
change to the headers it shares with the kernels (kernels-cpp/csrc/tma.cuh) cannot break it
unnoticed.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_probe_compiles(tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not installed")
    done = subprocess.run(
        [nvcc, "-std=c++17", "-O3", "-arch=sm_90a", f"-I{ROOT / 'kernels-cpp' / 'csrc'}",
         str(ROOT / "tools" / "bench" / "persistent_decode_probe.cu"),
         "-o", str(tmp_path / "probe")],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    assert (tmp_path / "probe").is_file()
