# Shell helpers shared by tools/build_wheels.sh and tools/check_packages.sh (sourced, not run).

# find_python VERSION: a Python interpreter of that version: what uv finds (managed or on PATH,
# never a virtual environment), else a pyenv install that is not on PATH (pyenv shims of versions
# that are not selected make uv's search fail).
find_python() {
  local want="$1" found
  if found=$(uv python find --system --no-python-downloads "$want" 2>/dev/null); then
    echo "$found"
    return 0
  fi
  if command -v pyenv >/dev/null 2>&1; then
    for found in "$(pyenv root)/versions/$want".*/bin/python"$want"; do
      if [ -x "$found" ]; then
        echo "$found"
        return 0
      fi
    done
  fi
  return 1
}
