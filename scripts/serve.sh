#!/usr/bin/env bash
# Serves CIRCUS on http://127.0.0.1:8080 with the worker and the DICOM listener
# (127.0.0.1:11112, AE title CIRCUS; CIRCUS_DICOM_* change them) beside gunicorn: this machine
# only, until HOST says otherwise (HOST=0.0.0.0: every interface; the Dockerfile sets it).
# PORT changes the port.
# Data in ./data (CIRCUS_DATA_DIR), SQLite unless DATABASE_URL is set. The first run prints a
# permanent token for the user circus. Ctrl-C or SIGTERM stops all three.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
export CIRCUS_DATA_DIR=${CIRCUS_DATA_DIR:-./data}

flask --app app init-db
first_token="$CIRCUS_DATA_DIR/.first-token-printed"
if [ ! -e "$first_token" ]; then
  flask --app app add-permanent-token circus --description "First token (scripts/serve.sh)"
  touch "$first_token"
fi

flask --app app worker & worker=$!
flask --app app dicom-listener & listener=$!  # DICOM (CIRCUS_DICOM_HOST:CIRCUS_DICOM_PORT)
gunicorn -b "${HOST:-127.0.0.1}:${PORT:-8080}" 'app:create_app()' & server=$!  # reads ./gunicorn.conf.py
stop() { kill -TERM "$server" "$worker" "$listener" 2>/dev/null || true; }
trap stop INT TERM
wait -n "$server" "$worker" "$listener" || true  # the first of them to end, or a signal
stop
wait "$server" "$worker" "$listener" 2>/dev/null || true
