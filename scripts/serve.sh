#!/usr/bin/env bash
# Set up and start the service on the embedded defaults: local Ray, CPU, packaged tiny.en,
# SQLite, in-process rate limits. Ctrl-C stops the service and the Ray it started.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"
exec .venv/bin/python -m serve "$@"
