"""Packaging: every package builds and installs on its own; the per-CUDA kernel distributions.

The full check is tools/check_packages.sh (sdist + wheel of all five packages, the kernels compiled
for one architecture when nvcc is present, each wheel installed into a fresh virtual environment
with only its declared dependencies, then imported and smoke-checked). It takes a few minutes on
2 cores, mostly compiling the kernels (once; the cp312-abi3 wheel reuses the cp311 build's objects).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KERNELS_PYPROJECT = ROOT / "packages" / "quamba-kernels" / "pyproject.toml"

needs_uv = pytest.mark.skipif(shutil.which("uv") is None, reason="needs uv on PATH")


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    # The check must not see the workspace environment that pytest runs in.
    env.pop("VIRTUAL_ENV", None)
    return subprocess.run(
        args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


# About 2.5 minutes on 2 idle cores (4-5 when other jobs share them): not marked slow, CI runs it.
@needs_uv
def test_every_package_builds_and_installs_into_a_clean_environment():
    result = _run(["bash", "tools/check_packages.sh"], timeout=1200)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-8000:]
    assert "all packages install into clean environments and import" in result.stdout, output
    # Every package was imported from its own environment, the kernels with and without layers.
    for name in ("kernels-3.11:", "layers:", "layers+kernels:", "quamba-modes:", "quamba-eval:"):
        assert name in result.stdout, output


@pytest.mark.parametrize("cuda_major", ["12", "13"])
def test_staged_kernels_distribution_is_renamed_per_cuda_major(tmp_path, cuda_major):
    before = KERNELS_PYPROJECT.read_bytes()
    stage = tmp_path / "stage"
    result = _run(
        ["bash", "tools/build_wheels.sh", "--stage-only", str(stage), "--cuda-major", cuda_major],
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr

    original = tomllib.loads(before.decode())["project"]
    staged = tomllib.loads((stage / "packages/quamba-kernels/pyproject.toml").read_text())
    assert staged["project"]["name"] == f"quamba-kernels-cu{cuda_major}"
    # Same plain public version (PyPI refuses +cuXY local labels), same import package.
    assert staged["project"]["version"] == original["version"]
    assert "+" not in staged["project"]["version"]
    assert staged["project"]["dependencies"] == original["dependencies"] == []
    assert f"CUDA {cuda_major}.x" in staged["project"]["description"]
    assert staged["tool"]["scikit-build"]["wheel"]["packages"] == ["src/quamba_kernels"]
    # The staged copy keeps the layout the relative force-include expects, without build trees.
    assert (stage / "kernels-cpp/CMakeLists.txt").is_file()
    assert list((stage / "kernels-cpp/csrc").glob("*.cu"))
    assert (stage / "packages/quamba-kernels/src/quamba_kernels/__init__.py").is_file()
    assert not (stage / "packages/quamba-kernels/build").exists()
    # The checkout itself is untouched.
    assert KERNELS_PYPROJECT.read_bytes() == before


@pytest.mark.parametrize("bad_major", ["11", "14", "cu13"])
def test_build_wheels_rejects_an_unknown_cuda_major(tmp_path, bad_major):
    result = _run(
        ["bash", "tools/build_wheels.sh", "--stage-only", str(tmp_path), "--cuda-major", bad_major],
        timeout=60,
    )
    assert result.returncode != 0
    assert "--cuda-major must be 12 or 13" in result.stderr


def test_stage_only_refuses_a_directory_that_holds_files(tmp_path):
    keep = tmp_path / "precious.txt"
    keep.write_text("not to be deleted")
    result = _run(
        ["bash", "tools/build_wheels.sh", "--stage-only", str(tmp_path), "--cuda-major", "13"],
        timeout=60,
    )
    assert result.returncode != 0
    assert "needs a new or empty directory" in result.stderr
    assert keep.read_text() == "not to be deleted"
