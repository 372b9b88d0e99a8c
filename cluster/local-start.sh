#!/usr/bin/env bash
# Start a local multi-process Ray cluster on this machine: one head and N worker nodes (each its own
# raylet), with Ray token authentication on. Try the cluster path (`ray job submit`) without a cloud.
#
#   cluster/local-start.sh                      # head (0 CPUs) + 2 workers x 1 CPU
#   FTRAY_WORKERS=3 FTRAY_WORKER_CPUS=2 cluster/local-start.sh
#   source /tmp/ftray-cluster-6380/env.sh       # then: ray job submit ... (see the last lines printed)
#   cluster/local-stop.sh
#
# Settings (environment variables, defaults in brackets):
#   FTRAY_RAY_PORT [6380]        GCS port of the head (not Ray's default 6379, to leave that one free)
#   FTRAY_DASHBOARD_PORT [8266]  dashboard / job API port (not 8265, the default of `ray.init()`)
#   FTRAY_CLIENT_PORT [20001]    Ray Client server port (default 10001; keep it outside 10002-19999, the worker ports)
#   FTRAY_HEAD_CPUS [0]          CPUs of the head node; 0 keeps work off it, as on a real cluster
#   FTRAY_WORKERS [2]            worker nodes
#   FTRAY_WORKER_CPUS [1]        CPUs per worker node
#   FTRAY_OBJECT_STORE_BYTES [500000000]  object store per node
#   FTRAY_CLUSTER_DIR [/tmp/ftray-cluster-$FTRAY_RAY_PORT]  pids, logs, env.sh and Ray's temp dir
#   FTRAY_RAY [ray]              the `ray` executable; its directory goes first on the cluster's PATH
#
# Token auth: RAY_AUTH_MODE=token is set for every process started here. The token is read from
# RAY_AUTH_TOKEN if set, else from the file RAY_AUTH_TOKEN_PATH [~/.ray/auth_token], which is created
# (random 256-bit hex, mode 600) when missing. Clients (`ray job submit`, `ray status`) need the same
# RAY_AUTH_MODE and token: `source $FTRAY_CLUSTER_DIR/env.sh` sets both, plus the cluster's addresses.
set -euo pipefail

PORT=${FTRAY_RAY_PORT:-6380}
DASHBOARD_PORT=${FTRAY_DASHBOARD_PORT:-8266}
CLIENT_PORT=${FTRAY_CLIENT_PORT:-20001}
HEAD_CPUS=${FTRAY_HEAD_CPUS:-0}
WORKERS=${FTRAY_WORKERS:-2}
WORKER_CPUS=${FTRAY_WORKER_CPUS:-1}
OBJECT_STORE=${FTRAY_OBJECT_STORE_BYTES:-500000000}
DIR=${FTRAY_CLUSTER_DIR:-/tmp/ftray-cluster-$PORT}
RAY=${FTRAY_RAY:-ray}
HOST=127.0.0.1  # the dashboard / job API listens here only; the GCS port is guarded by the token

HERE=$(cd "$(dirname "$0")" && pwd)
die() { echo "local-start: $*" >&2; exit 1; }
# A start that fails half-way stops the nodes it already started.
trap 'if [[ -n ${started:-} && -z ${ready:-} ]]; then
          env -u FTRAY_LOCAL_CLUSTER FTRAY_CLUSTER_DIR="$DIR" "$HERE/local-stop.sh" >&2 || true; fi' EXIT

RAY=$(command -v "$RAY") || die "no '${FTRAY_RAY:-ray}' on PATH: activate the venv (source .venv/bin/activate) or set FTRAY_RAY"
# Job drivers inherit the raylet's environment: with the venv's bin first, `ftray` and `python`
# in an entrypoint are the ones installed next to this `ray`.
export PATH="$(dirname "$RAY"):$PATH"

for pidfile in "$DIR"/*.pid; do
    [[ -e $pidfile ]] || continue
    if kill -0 "$(cat "$pidfile")" 2>/dev/null; then
        die "a cluster is already running from $DIR (pid $(cat "$pidfile")); stop it with FTRAY_CLUSTER_DIR=$DIR cluster/local-stop.sh"
    fi
    rm -f "$pidfile"
done
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
# Every process of this cluster (raylets, GCS, workers, job drivers) inherits this marker, so
# local-stop.sh can find stragglers of this cluster, and only of this one.
export FTRAY_LOCAL_CLUSTER=$DIR

# --- token authentication -------------------------------------------------------------------------
export RAY_AUTH_MODE=token
unset RAY_ADDRESS  # `ray start --head` must start a new cluster, not join one named in the caller's env
if [[ -n ${RAY_AUTH_TOKEN:-} ]]; then
    token_env="export RAY_AUTH_TOKEN='$RAY_AUTH_TOKEN'"
else
    export RAY_AUTH_TOKEN_PATH=${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}
    if [[ ! -s $RAY_AUTH_TOKEN_PATH ]]; then
        mkdir -p "$(dirname "$RAY_AUTH_TOKEN_PATH")"
        # Same shape as `ray get-auth-token --generate` (which only writes ~/.ray/auth_token).
        (umask 077 && od -An -tx1 -N32 /dev/urandom | tr -d ' \n' >"$RAY_AUTH_TOKEN_PATH")
        echo "local-start: generated a new Ray auth token in $RAY_AUTH_TOKEN_PATH"
    fi
    token_env="export RAY_AUTH_TOKEN_PATH='$RAY_AUTH_TOKEN_PATH'"
fi

# On SIGTERM a node first drains for up to 30 s (so Serve on Kubernetes can move traffic); a local
# cluster has nowhere to move it to: 0 = shut down at once.
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-0}

# What the nodes would otherwise share on one machine: the dashboard agent's HTTP port (default 52365,
# here 0 = any free port) and the temp dir (one per node, else every node's log monitor streams every
# node's logs and each driver line is printed once per node).
common=(--block --num-gpus=0 --object-store-memory="$OBJECT_STORE" --dashboard-agent-listen-port=0
        --disable-usage-stats)

start_node() {  # name, ray start args...: background `ray start --block`, its pid in $DIR/<name>.pid
    local name=$1; shift
    nohup "$RAY" start "${common[@]}" --temp-dir="$DIR/$name" "$@" >"$DIR/$name.log" 2>&1 &
    echo $! >"$DIR/$name.pid"
    started=1
}

wait_until() {  # seconds, description, command...: poll the command until it succeeds
    local deadline=$((SECONDS + $1)) what=$2; shift 2
    until "$@" >/dev/null 2>&1; do
        for pidfile in "$DIR"/*.pid; do
            kill -0 "$(cat "$pidfile")" 2>/dev/null || { tail -n 30 "${pidfile%.pid}.log" >&2; die "$(basename "${pidfile%.pid}") exited while waiting for $what"; }
        done
        ((SECONDS < deadline)) || die "timed out waiting for $what (logs in $DIR)"
        sleep 1
    done
}

alive_nodes() { "$RAY" status --address="$HOST:$PORT" 2>/dev/null | grep -cE '^ +1 node_' || true; }
nodes_up() { [[ $(alive_nodes) -ge $1 ]]; }

start_node head --head --port="$PORT" --dashboard-host="$HOST" --dashboard-port="$DASHBOARD_PORT" \
    --ray-client-server-port="$CLIENT_PORT" --num-cpus="$HEAD_CPUS"
# The job API answering an authenticated request means the dashboard is up and the token matches.
wait_until 90 "the head node's job API on port $DASHBOARD_PORT" \
    "$RAY" job list --address="http://$HOST:$DASHBOARD_PORT"

for ((i = 1; i <= WORKERS; i++)); do
    start_node "worker-$i" --address="$HOST:$PORT" --num-cpus="$WORKER_CPUS"
done
wait_until 90 "$((WORKERS + 1)) nodes" nodes_up $((WORKERS + 1))

(umask 077 && cat >"$DIR/env.sh") <<EOF
# Written by cluster/local-start.sh: \`source\` it to talk to this cluster.
export RAY_AUTH_MODE=token
$token_env
export RAY_API_SERVER_ADDRESS=http://$HOST:$DASHBOARD_PORT  # ray job submit/status/logs
export RAY_ADDRESS=$HOST:$PORT                               # ray status, ray.init() in a script
EOF

ready=1
cat <<EOF
Ray cluster up: head + $WORKERS worker node(s), $((HEAD_CPUS + WORKERS * WORKER_CPUS)) CPUs, token auth on.
  GCS address:  $HOST:$PORT
  dashboard:    http://$HOST:$DASHBOARD_PORT  (the browser asks for the token: ray get-auth-token)
  logs, pids:   $DIR
Submit a job (from the repository root):
  source $DIR/env.sh
  ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \\
      ftray train quickstart --set scaling.num_workers=$WORKERS --set output.dir=\$PWD/runs
Stop it:
  FTRAY_CLUSTER_DIR=$DIR cluster/local-stop.sh
EOF
