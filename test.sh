#!/usr/bin/env bash
# ./test.sh [pytest arguments]   install the test tools, lint, run the whole suite.
set -euo pipefail
cd "$(dirname "$0")"
./setup.sh --dev
.venv/bin/ruff check .
.venv/bin/python -m pytest "$@"
