#!/usr/bin/env bash
# Runs the whole test suite on SQLite (set DATABASE_URL for PostgreSQL); arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
CIRCUS_DEV=1 source scripts/venv.sh
exec python -m pytest "$@"
