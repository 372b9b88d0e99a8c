#!/usr/bin/env bash
# Stop the local cluster that cluster/local-start.sh started, and only that one.
#
#   cluster/local-stop.sh                                    # the default cluster (port 6380)
#   FTRAY_CLUSTER_DIR=/tmp/ftray-cluster-6390 cluster/local-stop.sh
#
# Not `ray stop`: that kills every Ray process of this user on the machine, including other
# clusters and the local Ray of any running `ftray train`. This sends SIGTERM to the `ray start
# --block` processes recorded in $FTRAY_CLUSTER_DIR/*.pid (workers first), which shut down their own
# raylet, GCS and dashboard; anything of this cluster still alive after the grace period (a process
# whose environment carries FTRAY_LOCAL_CLUSTER=<this cluster's dir>) is killed by pid.
set -euo pipefail

PORT=${FTRAY_RAY_PORT:-6380}
DIR=${FTRAY_CLUSTER_DIR:-/tmp/ftray-cluster-$PORT}
GRACE=${FTRAY_STOP_GRACE_S:-30}  # per group (workers, then head)

[[ -d $DIR ]] || { echo "local-stop: no cluster dir $DIR (nothing to stop)"; exit 0; }
DIR=$(cd "$DIR" && pwd)  # as local-start.sh recorded it

leftovers() {  # this cluster's processes still alive: local-start.sh marked their environment
    local p
    for p in /proc/[0-9]*; do
        [[ ${p#/proc/} == "$$" ]] && continue  # this script, should its caller carry the marker
        grep -qzxF -- "FTRAY_LOCAL_CLUSTER=$DIR" "$p/environ" 2>/dev/null && echo "${p#/proc/}"
    done
    return 0
}

stop_nodes() {  # pid files: SIGTERM each node, then wait for all of them to exit
    local pidfile pid deadline=$((SECONDS + GRACE)) live=()
    for pidfile in "$@"; do
        [[ -e $pidfile ]] || continue
        pid=$(cat "$pidfile")
        kill -TERM "$pid" 2>/dev/null && live+=("$pid")
        rm -f "$pidfile"
    done
    for pid in "${live[@]}"; do
        while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.5; done
    done
    stopped=$((stopped + ${#live[@]}))
}

stopped=0
stop_nodes "$DIR"/worker-*.pid  # workers first: the head's GCS outlives its nodes
stop_nodes "$DIR"/head.pid
deadline=$((SECONDS + 10))  # raylets reap their workers on the way out
while [[ -n $(leftovers) ]] && ((SECONDS < deadline)); do sleep 0.5; done
left=$(leftovers)
if [[ -n $left ]]; then
    echo "local-stop: killing processes of this cluster still alive: $(echo $left)"
    kill -KILL $left 2>/dev/null || true
fi
echo "local-stop: stopped the cluster in $DIR (${stopped} node(s)); logs kept in $DIR"
