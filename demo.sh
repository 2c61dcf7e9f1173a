#!/usr/bin/env bash
# The main job, end to end, on the embedded default (SPEC section 6): SmolLM2-135M's layer-6
# residual stream over the Python documentation, offline, then a JumpReLU SAE at L0 32.
#   ./demo.sh                     (TARGET_L0=64 STEPS=300 ./demo.sh to change the defaults)
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python}
TARGET_L0=${TARGET_L0:-32}
STEPS=${STEPS:-300}
OUT=${OUT:-runs}

echo "== 1/2 harvest: SmolLM2-135M layer 6 residual stream over the Python docs -> $OUT/acts"
$PY harvest.py --out "$OUT/acts" --tokens 500000 --resume
echo "== 2/2 train: JumpReLU SAE, 8 x 576 latents, target L0 $TARGET_L0, $STEPS steps -> $OUT/sae_l0_$TARGET_L0"
$PY train.py --acts "$OUT/acts" --out "$OUT/sae_l0_$TARGET_L0" --target-l0 "$TARGET_L0" --steps "$STEPS"
