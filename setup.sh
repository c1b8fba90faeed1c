#!/usr/bin/env bash
# Install what this project needs on a fresh Debian machine (idempotent, quick when done already):
# a virtual environment with the pinned requirements and this project (editable), Java 17 and nginx; with
# --dev, the test tools too.
set -euo pipefail
cd "$(dirname "$0")"
requirements=requirements.txt
if [ "${1:-}" = "--dev" ]; then
  requirements=requirements-dev.txt
fi

missing=()
command -v java >/dev/null || missing+=(openjdk-17-jre-headless)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx-light)
[ "${1:-}" = "--dev" ] && ! command -v chromium >/dev/null && missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "setup: apt-get install ${missing[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "setup: please install ${missing[*]} (sudo apt-get install ${missing[*]}), then run this again" >&2
    exit 1
  fi
fi

stamp=.venv/.installed-$(cat "$requirements" requirements.txt pyproject.toml | sha1sum | cut -c1-12)
if [ ! -f "$stamp" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check -r "$requirements"
  # The project itself, editable: skinlesion, serving, training, bench, client and serve import from anywhere.
  .venv/bin/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
  touch "$stamp"
fi
