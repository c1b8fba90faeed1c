#!/usr/bin/env bash
# ./test.sh [pytest arguments]         install the test tools, lint, run the whole suite (CI runs this).
# ./test.sh quick [pytest arguments]   the same without the tests that start real servers, train, or explain or score
#                                      hundreds of photos (tests/conftest.py SLOW_MODULES, SLOW_FIXTURES, marked slow).
set -euo pipefail
cd "$(dirname "$0")"
./setup.sh --dev
.venv/bin/ruff check .
if [ "${1:-}" = quick ]; then
  shift
  set -- -m "not slow" "$@"
fi
.venv/bin/python -m pytest "$@"
