#!/usr/bin/env bash
# The main job, end to end, on the embedded default (docs/maths.md section 6): SmolLM2-135M's layer-6
# residual stream over the Python documentation, offline; a JumpReLU SAE at L0 32; its held-out
# evaluation with delta LM loss; and its ONNX export, verified in onnxruntime.
#   ./demo.sh                      (TARGET_L0=64 STEPS=600 ./demo.sh to change the defaults)
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python}
TARGET_L0=${TARGET_L0:-32}
STEPS=${STEPS:-600}
OUT=${OUT:-runs}
SAE="$OUT/sae_l0_$TARGET_L0"

echo "== 1/4 harvest: SmolLM2-135M layer-6 residual stream over the Python docs -> $OUT/acts"
$PY harvest.py --out "$OUT/acts" --tokens 500000 --resume
echo "== 2/4 train: JumpReLU SAE, 8 x 576 latents, target L0 $TARGET_L0, $STEPS steps -> $SAE"
$PY train.py --acts "$OUT/acts" --out "$SAE" --target-l0 "$TARGET_L0" --steps "$STEPS"
echo "== 3/4 evaluate on held-out tokens, with the reconstruction spliced into the model -> $OUT/eval_l0_$TARGET_L0.json"
$PY evaluate.py "$SAE" --acts "$OUT/acts" --lm --json "$OUT/eval_l0_$TARGET_L0.json" --plot "$OUT/plots"
echo "== 4/4 export the encoder to ONNX and check it against PyTorch -> $SAE/encoder.onnx"
$PY export.py "$SAE" --out "$SAE/encoder.onnx"
echo "done: the SAE is in $SAE (config.json, sae.safetensors, log.jsonl), its ONNX encoder in $SAE/encoder.onnx"
