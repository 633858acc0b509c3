#!/usr/bin/env bash
# GPU check (about 5 minutes on one GPU; every step has its own time limit so the whole stays < 8 min):
#   1. CUDA parity of the learned path against ../shared/golden (tools/cuda_parity: fp32, the product's
#      fp16 mixed precision, and bf16 + channels-last for the 2D net), looser documented tolerances;
#   2. the benchmark on CUDA at B = 1, 4, 8 (per-instance time, ops per refinement, host syncs per
#      render iteration, ratio to the FLOP floor);
#   3. the demo (real node over loopback DDS) with device:=cuda;
# then one table of the figures. Usage:
#   bash scripts/gpu_check.sh [--device cuda|cpu] [--out DIR] [--golden DIR]
# --device cpu is a dry run of the same steps on the CPU (smaller: B = 1, one repeat, 2 demo frames),
# to check the script itself where there is no GPU.
set -euo pipefail
cd "$(dirname "$0")/.."

device=cuda
out=gpu_check_output
golden=../shared/golden
while [[ $# -gt 0 ]]; do
    case "$1" in
        --device) device="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        --golden) golden="$2"; shift 2 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done

if [[ -z "${VIRTUAL_ENV:-}" && -f .venv/bin/activate ]]; then
    # shellcheck disable=SC1091
    . .venv/bin/activate
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"

if [[ "$device" == cuda ]]; then
    if ! python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
        echo "gpu_check: torch sees no CUDA device (use --device cpu for a dry run)" >&2
        exit 2
    fi
    batches=(1 4 8); repeats=3; frames=12
else
    batches=(1); repeats=1; frames=2
fi
mkdir -p "$out"
status=0

echo "== 1/3 parity on $device"
timeout 150 python -m rnnpose_ros.tools.cuda_parity "$golden" --device "$device" --json "$out/parity.json" \
    | tee "$out/parity.log" || status=1

echo "== 2/3 benchmark on $device"
timeout 270 python -m rnnpose_ros.tools.bench --device "$device" --batch "${batches[@]}" --repeats "$repeats" \
    --skip-nets --json "$out/bench.json" | tee "$out/bench.log" || status=1

echo "== 3/3 demo on $device"
timeout 120 python -m rnnpose_ros.tools.demo --frames "$frames" --output "$out/demo" \
    --node-param "device:=$device" | tail -n 20 | tee "$out/demo.log" || status=1

echo "== table"
python - "$out" <<'PY'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
def load(name):
    path = out / name
    return json.loads(path.read_text()) if path.exists() else {}

parity, bench, demo = load("parity.json"), load("bench.json"), load("demo/summary.json")
rows = [("device", bench.get("device", parity.get("device", "?")))]
for variant, passed in parity.get("variants", {}).items():
    rows.append((f"parity {variant}", "PASS" if passed else "FAIL"))
for backend, times in bench.get("seconds_per_instance", {}).items():
    for batch, seconds in times.items():
        ratio = bench.get("flop_floor_ratio", {}).get(backend, {}).get(batch)
        floor = f", {ratio:.1f}x the FLOP floor" if ratio else ""
        rows.append((f"{backend} B={batch}", f"{1e3 * seconds:.2f} ms / instance{floor}"))
for backend, ops in bench.get("ops_per_refinement", {}).items():
    syncs = bench.get("host_syncs_per_render_iteration", {}).get(backend, {})
    rows.append((f"{backend} ops / refinement", f"{ops} ({bench['kernel_ops_per_refinement'][backend]} not views)"))
    rows.append((f"{backend} host syncs / render", f"{syncs.get('total')} ({syncs.get('outside_renderer')} outside the renderer)"))
if demo:
    rows.append(("demo frames answered", f"{demo['frames_answered']} / {demo['frames_published']}"))
    rows.append(("demo latency median", f"{demo['latency_ms'].get('median')} ms"))
width = max(len(name) for name, _ in rows)
print("\n".join(f"| {name:<{width}} | {value} |" for name, value in rows))
PY
exit "$status"
