#!/usr/bin/env bash
# The renderer's part of the GPU check (scripts/gpu_check.sh calls it; it runs alone as well):
#   1. the Warp renderer's tests, including CUDA against CPU with host synchronisations made errors;
#   2. the renderer benchmark on CUDA (OpenGL on the host vs Warp on the device, B = 1, 4, 8) with
#      Warp's agreement with OpenGL; figures also in $OUT/render_cuda.json when OUT is set.
# Needs a CUDA device and `make setup`; about a minute (the first run compiles the Warp kernel).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck disable=SC1091
source "$ROOT/.venv/bin/activate"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if ! python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "[gpu_check_render] no CUDA device visible to torch: nothing to check" >&2
    exit 1
fi
echo "== renderer tests (CUDA) =="
bash scripts/run_tests.sh -q -p no:cacheprovider -rs test/test_render_warp.py
echo "== renderer benchmark (CUDA) =="
json_args=()
if [[ -n "${OUT:-}" ]]; then json_args=(--json "$OUT/render_cuda.json"); fi
python -m rnnpose_ros.tools.bench_render --device cuda --batch 1 4 8 --threads 1 "${json_args[@]}"
