#!/usr/bin/env bash
# Train the bundled `tile` ControlNet with `controlnet train --annotator tile` on the locked embedded tiny base.
# The result is WORK_DIR/run/controlnet; only with --ship is it copied (fp16, diffusers layout) over the tracked
# src/controlnet/assets/controlnets/tile/. `controlnet train` shows a progress bar.
#
#   OMP_NUM_THREADS=2 nice scripts/train_tile_controlnet.sh [--ship] [WORK_DIR] [MAX_STEPS]
#
# Recipe: 2,000 fill samples at 128 px (seed 2, not the held-out seeds); the condition is the `tile` annotator of
# the target with factor 4 (shrunk 4 times, enlarged again: what a 4x Lanczos upscale looks like, the case
# `controlnet upscale --scale 4` meets, whose condition is the tile annotator with factor = scale); AdamW, batch 16,
# lr 1e-3 (the fill ControlNet's, which needed it to converge within a CPU budget), 50% empty prompts (the
# paper's; `controlnet upscale` runs with an empty prompt by default), fp32, a checkpoint every 50 steps so a
# stopped run resumes (rerun the same command). Measure it with scripts/evaluate_tile.py.
set -euo pipefail
cd "$(dirname "$0")/.."
SHIP=0
if [ "${1:-}" = --ship ]; then SHIP=1; shift; fi
WORK=${1:-outputs/tile}
STEPS=${2:-500}
PY=${PYTHON:-.venv/bin/python}
DATA=${DATA:-$WORK/data}
if [ ! -f "$DATA/prompt.json" ]; then
  "$PY" -m controlnet data fill "$DATA" --n ${N:-2000} --size 128 --seed 2
fi
RESUME=()
if ls "$WORK"/run/checkpoints/* >/dev/null 2>&1; then RESUME=(--resume latest); fi
"$PY" -m controlnet train --base src/controlnet/assets/tiny-sd --data "$DATA" --out "$WORK/run" \
  --annotator tile --annotator-param factor=4 --max-steps "$STEPS" --batch-size 16 --lr ${LR:-1e-3} \
  --weight-decay 0 --empty-prompt-prob 0.5 --mixed-precision no --seed 0 --checkpoint-every 50 --keep 2 \
  --validate-every 0 --no-tensorboard "${RESUME[@]}"
if [ "$SHIP" != 1 ]; then
  echo "trained $WORK/run/controlnet (rerun with --ship to copy it over src/controlnet/assets/controlnets/tile)"
  exit 0
fi
"$PY" - "$WORK/run/controlnet" <<'EOF'
import sys, torch
from controlnet.checkpoints import load_controlnet, save_controlnet
cn = load_controlnet(sys.argv[1])
save_controlnet(cn, "src/controlnet/assets/controlnets/tile", format="diffusers", dtype=torch.float16)
print("shipped src/controlnet/assets/controlnets/tile")
EOF
