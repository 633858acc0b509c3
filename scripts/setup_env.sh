#!/usr/bin/env bash
# Set up everything the project needs, from nothing, into ./.venv — idempotently.
#
#   1. headless GL (Debian packages, only if missing) and cmake
#   2. .venv with Python 3.11 (the ROS 2 Kilted wheels are cp311 only)
#   3. pinned requirements (requirements/*.txt, resolved with requirements/constraints.txt)
#   4. vision_msgs, tf2_msgs and rnnpose_ros_interfaces generated from interfaces/ into the venv
#   5. this package installed in editable mode (console script refine_node)
#   6. `source .venv/bin/activate` also sets the ROS and DDS-safety environment
#
# Each step records a stamp (hash of its inputs) in .venv/.stamps and is skipped while the stamp
# matches, so a second run with nothing to do takes seconds.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PYTHON="${PYTHON:-python3.11}"
STAMPS="$VENV/.stamps"

say() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }

stamp_ok() { [[ -f "$STAMPS/$1" && "$(cat "$STAMPS/$1")" == "$2" ]]; }
stamp_set() { mkdir -p "$STAMPS" && printf '%s' "$2" > "$STAMPS/$1"; }
hash_of() { cat "$@" | sha256sum | cut -d' ' -f1; }

# --- 1. system prerequisites -------------------------------------------------------------------
need_apt=()
command -v cmake >/dev/null 2>&1 || need_apt+=(cmake)
ldconfig -p 2>/dev/null | grep -q 'libEGL.so.1' || need_apt+=(libegl1 libgl1-mesa-dri libglu1-mesa)
ldconfig -p 2>/dev/null | grep -q 'libOSMesa.so' || need_apt+=(libosmesa6)
if ((${#need_apt[@]})); then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
        say "installing Debian packages: ${need_apt[*]}"
        apt-get update -qq || die "apt-get update failed: no network to the Debian mirrors?"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null \
            || die "apt-get install ${need_apt[*]} failed"
    else
        die "missing system packages: ${need_apt[*]} — install them (sudo apt-get install ${need_apt[*]}) and re-run"
    fi
fi

# --- 2. virtual environment --------------------------------------------------------------------
command -v "$PYTHON" >/dev/null 2>&1 \
    || die "$PYTHON not found: the ROS 2 Kilted wheels need CPython 3.11 (set PYTHON=/path/to/python3.11)"
py_version=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
[[ "$py_version" == "3.11" ]] || die "$PYTHON is Python $py_version; the ROS 2 Kilted wheels need 3.11"
if [[ -x "$VENV/bin/python" ]] && ! "$VENV/bin/python" -c 'import sys; assert sys.version_info[:2] == (3, 11)' 2>/dev/null; then
    die "$VENV exists but is not a Python 3.11 venv: remove it and re-run"
fi
if [[ ! -x "$VENV/bin/python" ]]; then
    say "creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

# --- 3. pinned requirements --------------------------------------------------------------------
req_files=("$ROOT"/requirements/ros.txt "$ROOT"/requirements/core.txt "$ROOT"/requirements/dev.txt)
torch_req="${RNNPOSE_TORCH_REQUIREMENTS:-$ROOT/requirements/torch-cpu.txt}"
req_hash=$(hash_of "${req_files[@]}" "$torch_req" "$ROOT/requirements/constraints.txt")
if ! stamp_ok requirements "$req_hash"; then
    say "installing pinned requirements (first run: a few minutes)"
    "${PIP[@]}" install -q --upgrade pip setuptools wheel \
        || die "pip could not reach the package registry (PyPI)"
    "${PIP[@]}" install -q -r "$torch_req" \
        || die "torch install failed (see requirements/torch-cpu.txt; README 'GPU install' for CUDA)"
    args=()
    for f in "${req_files[@]}"; do args+=(-r "$f"); done
    "${PIP[@]}" install -q "${args[@]}" -c "$ROOT/requirements/constraints.txt" \
        || die "pip install of requirements/*.txt failed"
    stamp_set requirements "$req_hash"
fi

# The ROS wheels' exported CMake files name the wheel build machine's Python and NumPy include
# directories; point them at this venv's (ENVIRONMENT.md, fix 2).
py_inc=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
np_inc=$("$VENV/bin/python" -c 'import numpy; print(numpy.get_include())')
{ grep -rlZ --include='*.cmake' -e '/opt/python/cp311-cp311' "$VENV/share" 2>/dev/null || true; } \
    | xargs -0 -r sed -i \
        -e "s#/opt/python/cp311-cp311/lib/python3.11/site-packages/numpy/_core/include#$np_inc#g" \
        -e "s#/opt/python/cp311-cp311/include/python3.11#$py_inc#g"

# --- 4. generated interface packages -----------------------------------------------------------
export AMENT_PREFIX_PATH="$VENV"
# In dependency order: rnnpose_ros_interfaces uses vision_msgs.
for pkg in tf2_msgs vision_msgs rnnpose_ros_interfaces; do
    src="$ROOT/interfaces/$pkg"
    pkg_hash=$(shopt -s nullglob && hash_of "$src/package.xml" "$src/CMakeLists.txt" "$src"/msg/*.msg "$src"/srv/*.srv)
    if stamp_ok "iface-$pkg" "$pkg_hash" && "$VENV/bin/python" -c "import $pkg.msg" 2>/dev/null; then
        continue
    fi
    say "generating $pkg into the venv (about a minute)"
    build="$ROOT/build/interfaces/$pkg"
    rm -rf "$build" && mkdir -p "$build"
    {
        cmake -S "$src" -B "$build" -DCMAKE_INSTALL_PREFIX="$VENV" -DCMAKE_PREFIX_PATH="$VENV" \
            -DPython3_EXECUTABLE="$VENV/bin/python" -DBUILD_TESTING=OFF \
            && cmake --build "$build" -j "$(nproc)" \
            && cmake --install "$build"
    } >"$ROOT/build/interfaces/$pkg.log" 2>&1 || die "generating $pkg failed: see build/interfaces/$pkg.log"
    "$VENV/bin/python" -c "import $pkg.msg" || die "$pkg was generated but does not import"
    stamp_set "iface-$pkg" "$pkg_hash"
done

# --- 5. this package ---------------------------------------------------------------------------
pkg_hash=$(hash_of "$ROOT/setup.py" "$ROOT/setup.cfg")
if ! stamp_ok package "$pkg_hash" || ! "$VENV/bin/python" -c 'import rnnpose_ros' 2>/dev/null; then
    say "installing rnnpose_ros (editable)"
    "${PIP[@]}" install -q --no-deps --no-build-isolation -e "$ROOT" >"$VENV/.stamps/package.log" 2>&1 \
        || die "pip install -e . failed: see $VENV/.stamps/package.log"
    stamp_set package "$pkg_hash"
fi

# --- 6. environment for `source .venv/bin/activate` --------------------------------------------
env_file="$VENV/bin/rnnpose_env.sh"
cat >"$env_file" <<EOF
# Written by scripts/setup_env.sh: ROS 2 from wheels in this venv, with the DDS-safety settings.
export AMENT_PREFIX_PATH="$VENV"
export RMW_IMPLEMENTATION=rmw_fastrtps_cpp
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
export FASTDDS_DEFAULT_PROFILES_FILE="$ROOT/config/fastdds_localhost.xml"
# A domain of this shell's own unless one is set (tests pick a fresh one per run).
export ROS_DOMAIN_ID="\${ROS_DOMAIN_ID:-\$(( (\$\$ % 100) + 100 ))}"
export PYOPENGL_PLATFORM="\${PYOPENGL_PLATFORM:-egl}"
EOF
marker='# rnnpose_ros environment'
grep -qF "$marker" "$VENV/bin/activate" || printf '\n%s\n. "%s"\n' "$marker" "$env_file" >>"$VENV/bin/activate"

say "ready: source .venv/bin/activate"
