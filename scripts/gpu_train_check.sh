#!/usr/bin/env bash
# Short CUDA training run for the prepared GPU check: published crops (320/240) and schedule (3 x 4),
# synthetic duck samples; prints the GPU, the loss of the first and last steps and steps per second.
# Usage: bash scripts/gpu_train_check.sh [STEPS] [RUN_DIR]   (run from the repository root, venv active)
set -euo pipefail
STEPS="${1:-60}"
RUN_DIR="${2:-$(mktemp -d)/train_check}"
export PYTHONPATH="${PYTHONPATH:-$PWD}"
export PYOPENGL_PLATFORM="${PYOPENGL_PLATFORM:-egl}"
python -c "import torch; print('gpu:', torch.cuda.get_device_name(0), 'torch', torch.__version__)"
python -m rnnpose_ros.tools.train --classes duck --run-dir "$RUN_DIR" --device cuda --steps "$STEPS" \
    --log-every 1 --checkpoint-every "$STEPS" --lr-max 3e-4 --no-progress
python - "$RUN_DIR/log.jsonl" <<'PY'
import json
import sys

records = [json.loads(line) for line in open(sys.argv[1])]
first, last = records[0], records[-1]
steps = last["step"] - first["step"]
rate = steps / max(last["seconds"] - first["seconds"], 1e-9)
print(f"train check: steps {last['step']}, loss {first['loss/total']:.3f} -> {last['loss/total']:.3f}, "
      f"flow EPE {first['metric/epe_last']:.2f} -> {last['metric/epe_last']:.2f} px, {rate:.2f} steps/s")
PY
