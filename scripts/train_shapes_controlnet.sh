#!/usr/bin/env bash
# Train one ControlNet of the shapes world with `controlnet train` on the locked embedded tiny-shapes base. The
# condition is made from each image by the type's annotator (canny -> canny, segmentation -> shapes,
# softedge -> softedge). The result is WORK_DIR/run/controlnet; only with --ship is it copied (fp16, diffusers
# layout) over the tracked src/controlnet/assets/controlnets/shapes-TYPE/.
#
#   OMP_NUM_THREADS=2 scripts/train_shapes_controlnet.sh [--ship] TYPE [WORK_DIR] [MAX_STEPS]
#   N=1000 RUN=n1000 scripts/train_shapes_controlnet.sh segmentation outputs/train_shapes_seg 1000   # data size
#   EMPTY=0 RUN=empty0 scripts/train_shapes_controlnet.sh segmentation outputs/train_shapes_seg 1000  # 0% empty prompts
#
# Recipe: the fill ControlNet's (scripts/train_fill_controlnet.sh): AdamW, batch 32, lr 1e-3, 50% empty prompts
# (the paper), fp32, validation on 16 fixed held-out images every 100 steps (10 DDIM steps, guidance 5) scored by
# re-detecting the condition (--score auto: edge F1, mIoU or SSIM) to see the sudden convergence.
set -euo pipefail
cd "$(dirname "$0")/.."
SHIP=0
if [ "${1:-}" = --ship ]; then SHIP=1; shift; fi
TYPE=${1:?usage: train_shapes_controlnet.sh [--ship] canny|segmentation|softedge [WORK_DIR] [MAX_STEPS]}
case "$TYPE" in
  canny) ANNOTATOR=canny ;;
  segmentation) ANNOTATOR=shapes ;;
  softedge) ANNOTATOR=softedge ;;
  *) echo "unknown condition type $TYPE; use canny, segmentation or softedge" >&2; exit 2 ;;
esac
WORK=${2:-outputs/train_shapes_$TYPE}
STEPS=${3:-1000}
PY=${PYTHON:-.venv/bin/python}
BASE=${BASE:-src/controlnet/assets/tiny-shapes}
DATA=${DATA:-outputs/shapes-data-${N:-4000}}
if [ ! -f "$DATA/prompt.json" ]; then
  "$PY" -m controlnet data shapes "$DATA" --n ${N:-4000} --size 128 --seed 1
fi
RESUME=()
if ls "$WORK"/${RUN:-run}/checkpoints/* >/dev/null 2>&1; then RESUME=(--resume latest); fi
"$PY" -m controlnet train --base "$BASE" --data "$DATA" --annotator "$ANNOTATOR" --out "$WORK/${RUN:-run}" \
  --max-steps "$STEPS" --batch-size 32 --lr ${LR:-1e-3} --weight-decay 0 --empty-prompt-prob ${EMPTY:-0.5} \
  --mixed-precision no --seed 0 --checkpoint-every 100 --keep 2 \
  --validate-every ${VALIDATE_EVERY:-100} --validation-count 16 --validation-steps 10 --validation-guidance 5 \
  --score auto ${CACHE:+--cache-dir "$CACHE"} "${RESUME[@]}"
if [ "$SHIP" != 1 ]; then
  echo "trained $WORK/${RUN:-run}/controlnet (rerun with --ship to copy it over src/controlnet/assets/controlnets/shapes-$TYPE)"
  exit 0
fi
"$PY" - "$WORK/${RUN:-run}/controlnet" "src/controlnet/assets/controlnets/shapes-$TYPE" <<'PYEOF'
import sys, torch
from controlnet.checkpoints import load_controlnet, save_controlnet
save_controlnet(load_controlnet(sys.argv[1]), sys.argv[2], format="diffusers", dtype=torch.float16)
print("shipped", sys.argv[2])
PYEOF
