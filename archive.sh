#!/usr/bin/env bash
# Build skin-<arch>.mar (model "skin", version <arch>) from each shipped state dict.
# WEIGHTS_DIR (default model_store) holds <arch>.pt; MODEL_STORE (default model_store) gets the archives;
# MODEL_CONFIG (default handler/model-config.yaml) is each version's TorchServe settings.
set -euo pipefail
cd "$(dirname "$0")"
ARCHIVER=${ARCHIVER:-.venv/bin/torch-model-archiver}
WEIGHTS_DIR=${WEIGHTS_DIR:-model_store}
MODEL_STORE=${MODEL_STORE:-model_store}
MODEL_CONFIG=${MODEL_CONFIG:-handler/model-config.yaml}
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
# --extra-files copies a folder's contents, so the core package is staged one level down.
mkdir -p "$stage/extra" "$stage/out" "$MODEL_STORE"
cp -r skinlesion "$stage/extra/skinlesion"
find "$stage/extra" -name __pycache__ -prune -exec rm -rf {} +
for arch in resnet18 resnet34; do
  weights=$WEIGHTS_DIR/$arch.pt
  [ -f "$weights" ] || { echo "archive.sh: missing $weights" >&2; exit 1; }
  "$ARCHIVER" --force --model-name skin --version "$arch" \
    --model-file skinlesion/model.py --serialized-file "$weights" \
    --handler handler/skin_handler.py --extra-files "$stage/extra" \
    --config-file "$MODEL_CONFIG" --export-path "$stage/out"
  mv "$stage/out/skin.mar" "$MODEL_STORE/skin-$arch.mar"
  echo "built $MODEL_STORE/skin-$arch.mar"
done
