#!/usr/bin/env bash
# Build every workspace package the way it is published (sdist, then the wheel from that sdist,
# without workspace sources) and install each wheel into a fresh virtual environment that holds
# only what the wheel declares; then import it from there and run a small smoke check.
#
#   tools/check_packages.sh [--keep]     (--keep leaves the work directory for inspection)
#
# Sibling packages come from the wheels built here (--find-links plus a constraint that pins each
# sibling to its local file, so a published copy of the same version can never stand in). Third-
# party versions are constrained to uv.lock, so the installs come from the uv cache and match what
# the tests ran against. The kernels are compiled for one architecture (QUAMBA_CUDA_ARCHS,
# default 90-real) when nvcc is on PATH; without nvcc the kernels wheel is checked as the
# pure-Python package it then is.
set -euo pipefail
shopt -s inherit_errexit # a failure inside $(...) stops the script too
cd "$(dirname "$0")/.."

keep=0
case "${1:-}" in
  --keep) keep=1 ;;
  "") ;;
  *)
    echo "usage: tools/check_packages.sh [--keep]" >&2
    exit 2
    ;;
esac

die() {
  echo "check_packages.sh: $*" >&2
  exit 1
}
command -v uv >/dev/null 2>&1 || die "uv is needed (https://docs.astral.sh/uv/)"

export QUAMBA_CUDA_ARCHS="${QUAMBA_CUDA_ARCHS:-90-real}"
expect_compiled=False
if command -v nvcc >/dev/null 2>&1 && [ "${QUAMBA_KERNELS_BUILD:-1}" != "0" ]; then
  expect_compiled=True
  # With nvcc present the module must build: no silent pure-Python fallback.
  export QUAMBA_KERNELS_REQUIRE_CUDA=ON
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/quamba-packages.XXXXXX")
pure_smoke_pid=""
cleanup() {
  # Stop the background checks of a failed run before removing what they work in.
  if [ -n "$pure_smoke_pid" ]; then kill "$pure_smoke_pid" 2>/dev/null || true; fi
  if [ "$keep" = 1 ]; then echo "work directory kept: $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
dist="$work/dist"
mkdir -p "$dist" "$work/logs" "$work/venvs"
start=$SECONDS
step() { echo "[$((SECONDS - start))s] $*"; }

logged() {
  local name="$1"
  shift
  if ! "$@" >"$work/logs/$name.log" 2>&1; then
    tail -n 80 "$work/logs/$name.log" >&2
    die "step '$name' failed: $*"
  fi
}

# find_python VERSION: see tools/lib.sh
source tools/lib.sh  # the working directory is the repository root (cd above)
py311=$(find_python 3.11) || die "Python 3.11 not found (uv python install 3.11)"
py312=$(find_python 3.12 || true)
py313=$(find_python 3.13 || true)

version_of() { uv version --package "$1" --short; }
stem_of() { echo "${1//-/_}"; }

# --- pure-Python packages: build ----------------------------------------------------------------
pure_packages=(quamba-layers quamba-modes quamba-compat quamba-eval)
for pkg in "${pure_packages[@]}"; do
  logged "build-$pkg" uv build --package "$pkg" --no-sources --python "$py311" --out-dir "$dist"
  stem=$(stem_of "$pkg")
  v=$(version_of "$pkg")
  [ -f "$dist/$stem-$v.tar.gz" ] || die "missing sdist $stem-$v.tar.gz in $dist"
  wheel="$dist/$stem-$v-py3-none-any.whl"
  [ -f "$wheel" ] || die "missing pure-Python wheel $(basename "$wheel")"
  listing=$("$py311" -m zipfile -l "$wheel")
  grep -Eq "^$stem/__init__\.py " <<<"$listing" ||
    die "$(basename "$wheel") does not contain $stem/__init__.py"
done
step "built sdist + wheel of ${pure_packages[*]}"

# --- clean virtual environments: what they install from -----------------------------------------
uv export --frozen --no-hashes --all-packages --no-emit-workspace --no-header --no-annotate \
  --output-file "$work/constraints.txt" >/dev/null 2>&1 || die "uv export from uv.lock failed"
for pkg in "${pure_packages[@]}"; do
  echo "$pkg @ file://$dist/$(stem_of "$pkg")-$(version_of "$pkg")-py3-none-any.whl"
done >"$work/siblings.txt"
# Sibling wheels from here, third-party packages at their uv.lock versions.
with_deps=(--find-links "$dist" --constraints "$work/constraints.txt" --constraints "$work/siblings.txt")

cat >"$work/smoke.py" <<'PY'
"""Import a package from its clean environment and run its smoke check (argv: dist, module, check)."""

import importlib
import importlib.metadata as md
import pkgutil
import sys
from pathlib import Path

dist, module_name, check = sys.argv[1:4]
module = importlib.import_module(module_name)
where = Path(module.__file__).resolve()
if not where.is_relative_to(Path(sys.prefix).resolve()):
    sys.exit(f"{module_name} was imported from {where}, not from the environment {sys.prefix}")
version = md.version(dist)
if getattr(module, "__version__", version) != version:
    sys.exit(f"{module_name}.__version__ is {module.__version__}, the {dist} metadata says {version}")
# Import every submodule: a module-level import of an undeclared dependency fails here.
submodules = [info.name for info in pkgutil.walk_packages(module.__path__, module_name + ".")]
for name in submodules:
    importlib.import_module(name)


def check_kernels(expect_compiled):
    import quamba_kernels

    info = quamba_kernels.build_info()
    assert info["compiled"] is expect_compiled, info
    if expect_compiled:
        assert info["version"] == md.version("quamba-kernels"), info
    return quamba_kernels.available()


def check_reference_quantize():
    """quamba_layers runs on the CPU: the INT8 quantizer against a float64 computation."""
    import torch

    from quamba_layers import reference_ops

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 256, generator=generator) * 5.0
    scale = 0.04
    codes = reference_ops.quantize_int8(x, scale, "half_even")
    expected = torch.clamp(torch.round(x.double() / scale), -128, 127).to(torch.int8)
    assert codes.dtype == torch.int8, codes.dtype
    assert torch.equal(codes, expected), (codes - expected).abs().max()
    assert codes.abs().max() == 127  # the clamp was exercised


expect_compiled = {"True": True, "False": False}[sys.argv[4]] if len(sys.argv) > 4 else None
if check == "kernels":
    usable, reason = check_kernels(expect_compiled)
    assert "torch" not in sys.modules, "importing quamba_kernels must not import torch"
    print(f"  kernels usable here: {usable} {reason}")
elif check == "layers":
    from quamba_layers.quant import kernels_status, select_backend

    import importlib.util

    check_reference_quantize()
    # Without the kernels installed the layers say so and run the PyTorch references.
    assert importlib.util.find_spec("quamba_kernels") is None, "quamba_kernels is installed"
    usable, reason = kernels_status()
    assert not usable and reason, (usable, reason)
    assert select_backend("cpu").name == "reference"
    print(f"  without kernels: {reason}")
elif check == "layers+kernels":
    from quamba_layers.quant import kernels_status, select_backend

    check_reference_quantize()
    # Installed together, the layers report exactly what the kernels report about this machine
    # (usable on a GPU; on a CPU-only machine the reason names the missing device or driver).
    assert kernels_status() == check_kernels(expect_compiled), kernels_status()
    usable, reason = kernels_status()
    backend = select_backend("cuda" if usable else "cpu")
    print(f"  kernels usable here: {usable} {reason}")
    print(f"  backend {backend.name}: {backend.implementations()}")
elif check != "import":
    sys.exit(f"unknown check {check!r}")
print(f"  {dist} {version}: {module_name} and {len(submodules)} submodules import from {sys.prefix}")
PY

smoke() {
  # smoke NAME PYTHON DIST MODULE CHECK INSTALL-ARGS...: fresh venv, install, import, check.
  local name="$1" python="$2" dist_name="$3" module="$4" check="$5"
  shift 5
  local venv="$work/venvs/$name"
  logged "venv-$name" uv venv --python "$python" "$venv"
  logged "install-$name" uv pip install --python "$venv/bin/python" "$@"
  echo "$name:"
  (cd "$work" && "$venv/bin/python" -I smoke.py "$dist_name" "$module" "$check" "$expect_compiled") ||
    die "smoke check '$name' failed"
}

# The pure-Python packages are checked in the background while the kernels compile (the checks
# are mostly one core importing torch; the compile leaves the other core idle at times).
layers_wheel="$dist/quamba_layers-$(version_of quamba-layers)-py3-none-any.whl"
(
  smoke layers "$py311" quamba-layers quamba_layers layers \
    "${with_deps[@]}" "quamba-layers @ file://$layers_wheel"
  for pkg in quamba-modes quamba-compat quamba-eval; do
    smoke "$pkg" "$py311" "$pkg" "$(stem_of "$pkg")" import "${with_deps[@]}" \
      "$pkg @ file://$dist/$(stem_of "$pkg")-$(version_of "$pkg")-py3-none-any.whl"
  done
  # The command-line entry points are installed with their packages.
  for cli in quamba-compat quamba-eval; do
    [ -x "$work/venvs/$cli/bin/$cli" ] || die "$cli did not install its '$cli' command"
  done
) >"$work/logs/pure-smoke.log" 2>&1 &
pure_smoke_pid=$!

# --- quamba-kernels: build -----------------------------------------------------------------------
kernels_version=$(version_of quamba-kernels)
kernels_sdist="$dist/quamba_kernels-$kernels_version.tar.gz"
logged sdist-kernels uv build --package quamba-kernels --no-sources --sdist --python "$py311" \
  --out-dir "$dist"
# The wheels are built from the sdist, as uv build does, but from one unpacked copy and one build
# directory: the CUDA objects do not depend on Python, so the second wheel reuses them (a fresh
# temporary copy per build would change the source paths and recompile every kernel).
mkdir -p "$work/kernels-sdist"
tar -xzf "$kernels_sdist" -C "$work/kernels-sdist"
kernels_src="$work/kernels-sdist/quamba_kernels-$kernels_version"
logged build-kernels uv build --wheel --no-sources --python "$py311" \
  --config-setting build-dir="$work/kernels-build" --out-dir "$dist" "$kernels_src"
step "built quamba-kernels sdist + cp311 wheel (compiled: $expect_compiled, archs $QUAMBA_CUDA_ARCHS)"
if [ -n "$py312" ]; then
  # One abi3 wheel serves every CPython >= 3.12.
  logged build-kernels-abi3 uv build --wheel --no-sources --python "$py312" \
    --config-setting build-dir="$work/kernels-build" --out-dir "$dist" "$kernels_src"
  step "built quamba-kernels abi3 wheel with Python 3.12"
else
  echo "NOTE: no Python 3.12 found: the cp312-abi3 kernels wheel is not checked"
fi

# --- quamba-kernels: archive contents -------------------------------------------------------------
# The kernels sdist must carry the top-level C++/CUDA sources: the wheel is built from it.
sdist_listing=$("$py311" -m tarfile -l "$kernels_sdist")
for needed in kernels-cpp/CMakeLists.txt kernels-cpp/bindings/ kernels-cpp/csrc/ CMakeLists.txt; do
  grep -q "^quamba_kernels-$kernels_version/$needed" <<<"$sdist_listing" ||
    die "$(basename "$kernels_sdist") lacks $needed"
done
grep -q "^quamba_kernels-$kernels_version/kernels-cpp/csrc/.*\.cu" <<<"$sdist_listing" ||
  die "$(basename "$kernels_sdist") carries no kernels-cpp/csrc/*.cu"

check_kernels_wheel() {
  # check_kernels_wheel TAG_PREFIX MODULE_PATTERN: the wheel of that tag holds the compiled module.
  local tag="$1" module="$2" wheel listing modules
  local matches=("$dist/quamba_kernels-$kernels_version-$tag-"*.whl)
  wheel="${matches[0]}"
  [ -f "$wheel" ] || die "no quamba-kernels wheel tagged $tag-* in $dist: $(ls "$dist")"
  listing=$("$py311" -m zipfile -l "$wheel")
  modules=$(grep -Ec "^quamba_kernels/_C\.[^ ]*so " <<<"$listing" || true)
  if [ "$expect_compiled" = True ]; then
    grep -Eq "^quamba_kernels/$module " <<<"$listing" && [ "$modules" = 1 ] ||
      die "$(basename "$wheel") must hold exactly one compiled module, quamba_kernels/$module"
  else
    [ "$modules" = 0 ] || die "$(basename "$wheel") holds a compiled module but nvcc is missing"
  fi
  if "$py311" - "$wheel" <<'PY'; then :; else die "$(basename "$wheel") declares dependencies"; fi
import sys
import zipfile
from email.parser import Parser

with zipfile.ZipFile(sys.argv[1]) as archive:
    (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
    requires = Parser().parsestr(archive.read(name).decode()).get_all("Requires-Dist") or []
# The kernels take tensors through DLPack: no torch (nor anything else) at install time.
sys.exit(1 if requires else 0)
PY
  echo "$wheel"
}
if [ "${QUAMBA_KERNELS_BUILD:-1}" = "0" ]; then
  tag_311=py3-none tag_312=py3-none # no CMake at all: a pure-Python wheel
else
  tag_311=cp311-cp311 tag_312=cp312-abi3
fi
kernels_wheel_311=$(check_kernels_wheel "$tag_311" '_C\.cpython-311-[^ ]*\.so')
kernels_wheel_abi3=""
if [ -n "$py312" ]; then
  kernels_wheel_abi3=$(check_kernels_wheel "$tag_312" '_C\.abi3\.so')
fi
logged twine uvx --quiet twine==7.0.0 check --strict "$dist"/*
step "checked archive contents, wheel tags and metadata (twine check --strict)"

# --- quamba-kernels: clean virtual environments ---------------------------------------------------
# The kernels declare no dependencies: installed with no index at all.
smoke kernels-3.11 "$py311" quamba-kernels quamba_kernels kernels --no-index "$kernels_wheel_311"
if [ -n "$kernels_wheel_abi3" ]; then
  for py in "$py312" "$py313"; do
    [ -n "$py" ] || continue
    smoke "kernels-abi3-$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" "$py" \
      quamba-kernels quamba_kernels kernels --no-index "$kernels_wheel_abi3"
  done
fi
{
  cat "$work/siblings.txt"
  echo "quamba-kernels @ file://$kernels_wheel_311"
} >"$work/siblings-kernels.txt"
smoke layers+kernels "$py311" quamba-layers quamba_layers layers+kernels \
  --find-links "$dist" --constraints "$work/constraints.txt" \
  --constraints "$work/siblings-kernels.txt" "quamba-layers[kernels] @ file://$layers_wheel"

if ! wait "$pure_smoke_pid"; then
  pure_smoke_pid=""
  cat "$work/logs/pure-smoke.log" >&2
  die "the pure-Python package checks failed"
fi
pure_smoke_pid=""
cat "$work/logs/pure-smoke.log"
step "all packages install into clean environments and import"
