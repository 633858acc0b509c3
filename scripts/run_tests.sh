#!/usr/bin/env bash
# Run the pytest suite with the DDS-safety environment, inside a private network namespace where
# one can be made (root + unshare), so no ROS traffic can leave the machine. Arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck disable=SC1091
source "$ROOT/.venv/bin/activate"
# A fresh DDS domain for this run, so concurrent runs on one machine never see each other.
export ROS_DOMAIN_ID=$(( (RANDOM % 100) + 100 ))
export PYTHONDONTWRITEBYTECODE=1

if [[ $(id -u) -eq 0 ]] && unshare -n true 2>/dev/null; then
    echo "[test] private network namespace (loopback only), ROS_DOMAIN_ID=$ROS_DOMAIN_ID"
    exec unshare -n sh -c 'ip link set lo up && exec "$@"' sh python -m pytest "$@"
fi
echo "[test] no network namespace available (not root): DDS restricted to localhost by profile, ROS_DOMAIN_ID=$ROS_DOMAIN_ID"
exec python -m pytest "$@"
