#!/usr/bin/env bash
# Train the `fill` ControlNet of the embedded tiny Flux-layout base with `controlnet train` on the locked
# src/controlnet/assets/tiny-flux (the trainer picks the flow-matching objective for a Flux base; the training size
# is the base's native 128 px, the prompts its T5 tokenizer's 16 tokens). The result is WORK_DIR/run/controlnet;
# only with --ship is it copied (fp16, diffusers layout) over the tracked
# src/controlnet/assets/tiny-flux/controlnets/fill/. `controlnet train` shows a progress bar.
#
#   OMP_NUM_THREADS=2 scripts/train_fill_controlnet_flux.sh [--ship] [WORK_DIR] [MAX_STEPS]
#
# Recipe (scripts/train_embedded_flux.py's ControlNet stage): a copy of the base's first 2 double blocks and no
# single block (--controlnet-layers 2 --controlnet-single-layers 0), AdamW, batch 32, lr 1e-3, weight decay 0, no
# empty prompts (the tiny base has no guidance to learn an unconditional branch for), fp32, validation IoU on 8
# fixed conditions every 50 steps (16 Euler steps) to see the sudden convergence.
set -euo pipefail
cd "$(dirname "$0")/.."
SHIP=0
if [ "${1:-}" = --ship ]; then SHIP=1; shift; fi
WORK=${1:-outputs/train_fill_flux}
STEPS=${2:-1000}
PY=${PYTHON:-.venv/bin/python}
BASE=src/controlnet/assets/tiny-flux
SHIPPED=$BASE/controlnets/fill
DATA=${DATA:-$WORK/fill-data}
if [ ! -f "$DATA/prompt.json" ]; then
  "$PY" -m controlnet data fill "$DATA" --n ${N:-4000} --size 128 --seed 1
fi
RESUME=()
if ls "$WORK"/${RUN:-run}/checkpoints/* >/dev/null 2>&1; then RESUME=(--resume latest); fi
"$PY" -m controlnet train --base "$BASE" --data "$DATA" --out "$WORK/${RUN:-run}" \
  --max-steps "$STEPS" --batch-size 32 --lr ${LR:-1e-3} --weight-decay 0 --empty-prompt-prob 0 \
  --mixed-precision no --controlnet-layers 2 --controlnet-single-layers 0 --seed 0 --checkpoint-every 100 --keep 2 \
  --validate-every ${VALIDATE_EVERY:-50} --validation-count 8 --validation-steps 16 --score fill \
  ${CACHE:+--cache-dir "$CACHE"} "${RESUME[@]}"
if [ "$SHIP" != 1 ]; then
  echo "trained $WORK/${RUN:-run}/controlnet (rerun with --ship to copy it over $SHIPPED)"
  exit 0
fi
"$PY" - "$WORK/${RUN:-run}/controlnet" "$BASE" "$SHIPPED" <<'EOF'
import sys, torch
from controlnet.transformer_formats import load_transformer_controlnet, save_transformer_controlnet
from controlnet.transformer_pipeline import TransformerPipeline
trained, base, shipped = sys.argv[1:]
cn = load_transformer_controlnet(trained, base=TransformerPipeline.from_pretrained(base).transformer)
save_transformer_controlnet(cn, shipped, dtype=torch.float16)
print(f"shipped {shipped}")
EOF
chmod -R a+rX "$SHIPPED"  # package data must be readable by every user
