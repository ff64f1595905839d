"""The persistent-decode-kernel probe (tools/bench/persistent_decode_probe.cu) stays buildable.

It runs only on an sm_90 GPU (tools/gpu_check.sh with PROBE=1); here nvcc compiles it, so that a
change to the headers it shares with the kernels (kernels-cpp/csrc/tma.cuh) cannot break it
unnoticed.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools" / "bench"))

from persistent_decode_probe import compile_command


@pytest.mark.slow
def test_probe_compiles(tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not installed")
    done = subprocess.run(
        compile_command(nvcc, tmp_path / "probe"),
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    assert (tmp_path / "probe").is_file()
