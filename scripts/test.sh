#!/usr/bin/env bash
# Set up and run the whole test suite. Needs PostgreSQL on 127.0.0.1:5432 and Redis on
# 127.0.0.1:6379 for the persistence tests; starts the local ones if installed and stopped.
# Usage: bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
bash scripts/ensure_services.sh
export RAY_AUTH_MODE=disabled
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
if [ "$rc" = 5 ]; then
  echo "test: pytest collected no tests; that is a failure" >&2
  exit 1
fi
exit "$rc"
