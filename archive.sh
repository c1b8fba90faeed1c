#!/usr/bin/env bash
# Build, from each shipped state dict, skin-<arch>.mar (model "skin": plain predictions, batched) and
# skin-explain-<arch>.mar (model "skin-explain": explanations), both of version <arch>.
# WEIGHTS_DIR (default model_store) holds <arch>.pt; MODEL_STORE (default model_store) gets the archives;
# MODEL_CONFIG (default serving/model-config.yaml) and EXPLAIN_CONFIG (default serving/explain-config.yaml)
# are the two models' per-version TorchServe settings.
set -euo pipefail
cd "$(dirname "$0")"
ARCHIVER=${ARCHIVER:-.venv/bin/torch-model-archiver}
WEIGHTS_DIR=${WEIGHTS_DIR:-model_store}
MODEL_STORE=${MODEL_STORE:-model_store}
MODEL_CONFIG=${MODEL_CONFIG:-serving/model-config.yaml}
EXPLAIN_CONFIG=${EXPLAIN_CONFIG:-serving/explain-config.yaml}
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
# --extra-files copies a folder's contents, so the packages are staged one level down: the core, and the serving
# code the handler imports (its TorchServe and nginx settings stay out: they are not code).
mkdir -p "$stage/extra/serving" "$stage/out" "$MODEL_STORE"
cp -r skinlesion "$stage/extra/skinlesion"
cp serving/*.py "$stage/extra/serving/"
find "$stage/extra" -name __pycache__ -prune -exec rm -rf {} +
for arch in resnet18 resnet34; do
  weights=$WEIGHTS_DIR/$arch.pt
  [ -f "$weights" ] || { echo "archive.sh: missing $weights" >&2; exit 1; }
  for model in skin skin-explain; do
    config=$MODEL_CONFIG
    [ "$model" = skin-explain ] && config=$EXPLAIN_CONFIG
    # The archiver assembles in $TMPDIR/<model name>: in a shared /tmp, two builds at once would collide there.
    TMPDIR="$stage" "$ARCHIVER" --force --model-name "$model" --version "$arch" \
      --model-file skinlesion/model.py --serialized-file "$weights" \
      --handler serving/skin_handler.py --extra-files "$stage/extra" \
      --config-file "$config" --export-path "$stage/out"
    mv "$stage/out/$model.mar" "$MODEL_STORE/$model-$arch.mar"
    echo "built $MODEL_STORE/$model-$arch.mar"
  done
done
