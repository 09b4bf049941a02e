#!/usr/bin/env bash
# Start the MLflow UI and tracking server on the toolkit's embedded SQLite store.
#
#   tools/mlflow_ui.sh                       # http://127.0.0.1:5000, store ./mlflow.db
#   tools/mlflow_ui.sh --port 5001 --store sqlite:////data/runs/mlflow.db --artifacts /data/runs/mlartifacts
#   tools/mlflow_ui.sh --host 0.0.0.0 --allowed-hosts 'mlflow.lab.org'   # see docs/tracking.md first
#
# Options: --host (default 127.0.0.1: this machine only), --port (5000), --store (backend store URI,
# default sqlite:///$PWD/mlflow.db, the jobs' default), --artifacts (where runs logged THROUGH the
# server keep their files, default $PWD/mlartifacts, the jobs' default), --workers (1). Any other
# option is passed to `mlflow server` as it is. Run it with the toolkit's environment active.
# Jobs then log to it with tracking.uri=http://127.0.0.1:5000 (or keep writing the SQLite file).
set -euo pipefail

host=127.0.0.1
port=5000
store="sqlite:///$PWD/mlflow.db"
artifacts="$PWD/mlartifacts"
workers=1
extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --host) host="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --store) store="$2"; shift 2 ;;
    --artifacts) artifacts="$2"; shift 2 ;;
    --workers) workers="$2"; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) extra+=("$1"); shift ;;
  esac
done

# The server's job runner (prompt optimisation and the like) is not used here; without it the
# server starts 2 processes instead of 10.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
export MLFLOW_DISABLE_TELEMETRY=true
echo "MLflow UI on http://$host:$port (store $store, artifacts $artifacts)"
exec mlflow server --backend-store-uri "$store" --artifacts-destination "$artifacts" \
  --host "$host" --port "$port" --workers "$workers" ${extra[@]+"${extra[@]}"}
