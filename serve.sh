#!/usr/bin/env bash
# ./serve.sh start   install what is missing, build the archives, start TorchServe + nginx on :8089
# ./serve.sh stop    stop both
# Environment: MODEL (resnet34|resnet18, default resnet34), PORT (default 8089), MODEL_CONFIG (archive.sh;
# serving/model-config-gpu.yaml on GPU hosts). Logs: logs/.
set -euo pipefail
cd "$(dirname "$0")"
case "${1:-start}" in
  start)
    ./setup.sh
    ./archive.sh >/dev/null
    .venv/bin/python serve.py start --port "${PORT:-8089}" --model "${MODEL:-resnet34}"
    ;;
  stop)
    .venv/bin/python serve.py stop
    ;;
  *)
    echo "usage: ./serve.sh start|stop" >&2
    exit 2
    ;;
esac
