#!/usr/bin/env bash
# The shared MLflow tracking server for a Ray cluster.
#
# Train workers on other nodes cannot write to a SQLite file on the driver's machine, so on a
# cluster every run logs to this server: a real database holds runs and the registry, an artifact
# store holds models and checkpoints, and the server proxies artifact uploads (workers need no
# bucket credentials, only the server's URL).
#
# Settings come from the environment, never the command line (a database URL carries its password
# and a command line is visible to every user of the node in `ps`):
#   MLFLOW_BACKEND_STORE_URI      required: postgresql://user:password@host:5432/mlflow
#                                 (sqlite:////abs/path.db only for a one-machine try-out)
#   MLFLOW_ARTIFACTS_DESTINATION  required: s3://bucket/prefix, gs://..., or a directory
#   MLFLOW_HOST                   default 127.0.0.1: loopback only. A cluster sets the address
#                                 its nodes reach (0.0.0.0 in a pod, the private IP on a VM).
#   MLFLOW_PORT                   default 5000
#   MLFLOW_WORKERS                default 2 (1 with SQLite: one writer avoids "database is locked")
#   MLFLOW_SERVER_ALLOWED_HOSTS   Host headers accepted (MLflow's DNS-rebinding guard); needed when
#                                 clients use a service name, e.g. memlab-mlflow*,localhost*
# Then on every node: MLFLOW_TRACKING_URI=http://<host>:<port>
set -euo pipefail

: "${MLFLOW_BACKEND_STORE_URI:?set MLFLOW_BACKEND_STORE_URI, e.g. postgresql://mlflow:<password>@db:5432/mlflow}"
: "${MLFLOW_ARTIFACTS_DESTINATION:?set MLFLOW_ARTIFACTS_DESTINATION, e.g. s3://my-bucket/mlflow}"
host="${MLFLOW_HOST:-127.0.0.1}"
port="${MLFLOW_PORT:-5000}"

case "$MLFLOW_BACKEND_STORE_URI" in
  sqlite:*)
    workers="${MLFLOW_WORKERS:-1}"
    echo "mlflow-server: SQLite backend: fine on one machine, use PostgreSQL for a cluster" >&2
    ;;
  file:* | /* | ./*)
    echo "mlflow-server: a file store cannot back a shared server; use PostgreSQL" >&2
    exit 2
    ;;
  *) workers="${MLFLOW_WORKERS:-2}" ;;
esac

if [ "$host" != "127.0.0.1" ] && [ "$host" != "localhost" ]; then
  echo "mlflow-server: listening on $host:$port; MLflow has no login of its own, so keep this" \
    "port inside the cluster network (the manifest's NetworkPolicy does)" >&2
fi

# No usage reporting from a server that may sit on a private network.
export MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true
# MLflow's server-side job runner (GenAI evaluation jobs) is unused by memlab and costs eight
# processes; turn it back on with MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
# The two store settings reach `mlflow server` through its MLFLOW_BACKEND_STORE_URI and
# MLFLOW_ARTIFACTS_DESTINATION environment variables, not as arguments.
exec mlflow server --serve-artifacts --host "$host" --port "$port" --workers "$workers"
