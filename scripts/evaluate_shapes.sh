#!/usr/bin/env bash
# Measure the shapes world's ControlNets with `controlnet evaluate` (ControlNet++'s protocol at the CLI defaults:
# 20 UniPC steps, CFG 7.5) on 64 held-out images (seed 20260, which no training set uses): each ControlNet against
# the base alone, K images per example. Writes OUT/<type>/ (two sub-folders and comparison.json each); with
# --ship the comparison tables are copied to the tracked docs/runs/shapes_<type>.json.
#
#   OMP_NUM_THREADS=2 scripts/evaluate_shapes.sh [--ship] [OUT] [K]
#   CONTROLNET_DIR=outputs/train_shapes_segmentation/n1000/controlnet TYPES=segmentation scripts/evaluate_shapes.sh out/n1000
set -euo pipefail
cd "$(dirname "$0")/.."
SHIP=0
if [ "${1:-}" = --ship ]; then SHIP=1; shift; fi
OUT=${1:-outputs/eval-shapes}
K=${2:-2}
PY=${PYTHON:-.venv/bin/python}
HELDOUT=${HELDOUT:-outputs/shapes-heldout}
if [ ! -f "$HELDOUT/prompt.json" ]; then
  "$PY" -m controlnet data shapes "$HELDOUT" --n 64 --size 128 --seed 20260
fi
for TYPE in ${TYPES:-canny segmentation softedge}; do
  case "$TYPE" in
    canny) ANNOTATOR=canny ;;
    segmentation) ANNOTATOR=shapes ;;
    softedge) ANNOTATOR=softedge ;;
    *) echo "unknown condition type $TYPE; use canny, segmentation or softedge" >&2; exit 2 ;;
  esac
  "$PY" -m controlnet evaluate --data "$HELDOUT" --base tiny-shapes --annotator "$ANNOTATOR" -k "$K" \
    --controlnet "${CONTROLNET_DIR:-shapes-$TYPE}" --controlnet none --out "$OUT/$TYPE" ${EXTRA:-}
  if [ "$SHIP" = 1 ]; then cp "$OUT/$TYPE/comparison.json" "docs/runs/shapes_$TYPE.json"; fi
done
