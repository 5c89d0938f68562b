#!/usr/bin/env bash
# A multi-node Ray cluster on this one machine, for trying multi-node behaviour:
#
#   cluster/local_cluster.sh start [WORKER_NODES]   # head + WORKER_NODES worker nodes (default 2)
#   cluster/local_cluster.sh start 0                # a head alone (give it CPUs: HEAD_CPUS=2)
#   cluster/local_cluster.sh address                # the Jobs API address for `ray job submit`
#   cluster/local_cluster.sh add [WORKER_NODES]     # more worker nodes (default 1), numbered on
#   cluster/local_cluster.sh kill worker-N          # every process of one node SIGKILLed at once,
#                                                   # as a spot reclaim or a dead machine does
#   cluster/local_cluster.sh node-id worker-N       # that node's Ray node ID (for `ray drain-node`)
#   cluster/local_cluster.sh stop                   # stops exactly this cluster's processes
#
# By default the head takes no CPUs (it runs drivers and Ray's own actors) and each worker node
# offers WORKER_CPUS (default 1), so a 2-worker training run spans two nodes. Token authentication
# stays on, with the user's token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token) or else
# a new one in ~/.ray/auth_token; the file is made readable by its owner only. Clients need
# RAY_AUTH_MODE=token. Every node listens on 127.0.0.1 only, the dashboard and Jobs
# API too. Ray's commands that take the GCS address (`ray status --address 127.0.0.1:6380`,
# `ray drain-node`) reach it with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: without it Ray 2.60
# swaps 127.0.0.1 for the machine's LAN address, where nothing listens.
#
# Settings (environment): RAY_PORT (6380), DASHBOARD_PORT (8266), HEAD_CPUS (0), WORKER_CPUS (1),
# AGENT_PORT (52400: the head's dashboard agent, worker node i's at AGENT_PORT + i), CLUSTER_STATE (/tmp/digits-local-cluster: logs and the process sessions to stop), RAY (the
# ray command; default .venv/bin/ray).
set -euo pipefail
cd "$(dirname "$0")/.."
RAY=${RAY:-$PWD/.venv/bin/ray}
PYTHON=$(dirname "$RAY")/python
STATE=${CLUSTER_STATE:-/tmp/digits-local-cluster}
RAY_PORT=${RAY_PORT:-6380}
DASHBOARD_PORT=${DASHBOARD_PORT:-8266}
HEAD_CPUS=${HEAD_CPUS:-0}
WORKER_CPUS=${WORKER_CPUS:-1}
# Every node's dashboard agent needs a port of its own: Ray's default (52365) is taken by any
# other Ray on the machine, and a node without its agent cannot run submitted jobs.
AGENT_PORT=${AGENT_PORT:-52400}
export RAY_AUTH_MODE=token RAY_USAGE_STATS_ENABLED=0
# The token file and the cluster's state: for this user's eyes only.
umask 077
TOKEN_FILE=${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}

# Each node starts in a session of its own; stopping kills those sessions' processes and
# nothing else (`ray stop` would stop every Ray on the machine).
# Each node gets a temp dir of its own too: nodes sharing one would race to build the same
# runtime environments (pip virtualenvs) in the same place.
start_node() {  # name, then the `ray start` command and its arguments
    local name=$1
    shift
    mkdir -p "$STATE/$name"
    setsid bash -c 'echo $$ >> "$0/sessions"; echo $$ > "$0/$1.session"; shift; exec "$@"' \
        "$STATE" "$name" "$@" --temp-dir "$STATE/$name" --disable-usage-stats \
        > "$STATE/$name.log" 2>&1 \
        || { echo "$name failed to start; see $STATE/$name.log" >&2; return 1; }
}

# Ray 2.60 swaps an address of 127.0.0.1 (a node's own, or the head's that a node joins) for the
# machine's LAN address unless multi-node clusters are switched off: a node's processes then
# listen on every interface, and nothing answers a worker node at the head's LAN address. The
# head is started with them switched off. `ray start --address` refuses to start a worker node
# so, hence this `ray start`, which keeps the head's 127.0.0.1 as it is; the worker node then
# takes 127.0.0.1, the address from which it reaches the head, as its own.
RAY_START_ON_LOOPBACK='import sys
from ray._private import services
from ray.scripts.scripts import main
services.resolve_ip_for_localhost = lambda host: host
sys.argv[0] = "ray"
main()'

start_workers() {  # count: worker nodes numbered after every one started so far (killed ones too)
    local first=1 i
    while [ -e "$STATE/worker-$first.log" ]; do first=$((first + 1)); done
    for i in $(seq "$first" $((first + $1 - 1))); do
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1 start_node "worker-$i" \
            "$PYTHON" -c "$RAY_START_ON_LOOPBACK" start \
            --address "127.0.0.1:$RAY_PORT" --num-cpus "$WORKER_CPUS" \
            --dashboard-agent-listen-port $((AGENT_PORT + i)) --resources "{\"worker-$i\": 1}"
    done
}

start() {
    local workers=${1:-2}
    if [ -s "$STATE/sessions" ]; then
        echo "a local cluster is already running (state in $STATE); stop it first" >&2
        exit 1
    fi
    mkdir -p "$STATE"
    # `ray start` refuses to start without a token; an earlier Ray may have left one readable by
    # everyone.
    "$RAY" get-auth-token --generate > /dev/null 2>&1 \
        || { echo "no Ray token, and \`$RAY get-auth-token --generate\` failed" >&2; exit 1; }
    if [ -e "$TOKEN_FILE" ]; then chmod 600 "$TOKEN_FILE"; fi
    # Its processes keep the switch, and so do the job drivers they start: a driver's
    # `ray.init()` then joins at 127.0.0.1 too. The GCS checks on every node each second (Ray's
    # default: every 3), so a node that dies is counted out after 5 failed checks, 5 s, and
    # training goes on without it that much sooner: every node is on this machine, over
    # loopback, where a check that is refused means the node has gone.
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_health_check_period_ms=1000 start_node head "$RAY" start --head \
        --node-ip-address 127.0.0.1 --port "$RAY_PORT" --num-cpus "$HEAD_CPUS" \
        --dashboard-host 127.0.0.1 --dashboard-port "$DASHBOARD_PORT" \
        --dashboard-agent-listen-port "$AGENT_PORT"
    start_workers "$workers"
    echo "local Ray cluster: head + $workers worker node(s); submit jobs to $(address)"
}

add() {
    [ -s "$STATE/sessions" ] || { echo "no local cluster running (state in $STATE)" >&2; exit 1; }
    start_workers "${1:-1}"
}

kill_node() {  # a node's session, every process at once; the node is left for dead (no `ray stop`)
    local file="$STATE/$1.session" pids
    [ -s "$file" ] || { echo "no node $1 (state in $STATE)" >&2; exit 1; }
    pids=$(pgrep -s "$(cat "$file")") || true
    [ -z "$pids" ] || kill -KILL $pids 2>/dev/null || true
    rm -f "$file"
    echo "killed node $1"
}

node_id() {  # a worker node's ID, found by the custom resource named after it
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 "$PYTHON" -c '
import sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
found = [node["NodeID"] for node in ray.nodes() if node["Alive"] and sys.argv[2] in node["Resources"]]
print(found[0]) if found else sys.exit(f"no live node {sys.argv[2]}")
' "127.0.0.1:$RAY_PORT" "$1"
}

address() {
    echo "http://127.0.0.1:$DASHBOARD_PORT"
}

# PIDs of this cluster's processes; with an argument, only those whose name is (or is not: !NAME)
# that argument.
cluster_pids() {
    local sid pid name
    for sid in $(cat "$STATE/sessions"); do
        for pid in $(pgrep -s "$sid"); do
            name=$(cat "/proc/$pid/comm" 2>/dev/null) || continue
            case "${1:-}" in
                "") ;;
                !*) [ "$name" != "${1#!}" ] || continue ;;
                *) [ "$name" = "$1" ] || continue ;;
            esac
            echo "$pid"
        done
    done
}

terminate() {  # SIGTERM, then up to 10 s for a graceful exit
    local pids
    pids=$(cluster_pids "$@")
    [ -n "$pids" ] || return 0
    kill -TERM $pids 2>/dev/null || true
    for _ in $(seq 1 50); do
        [ -n "$(cluster_pids "$@")" ] || return 0
        sleep 0.2
    done
}

stop() {
    [ -s "$STATE/sessions" ] || { echo "no local cluster running (state in $STATE)"; return 0; }
    # The GCS last: stopped together with the raylets it holds on for a minute or more, and the
    # raylets with it (measured); stopped after them, every process is gone within seconds.
    terminate '!gcs_server'
    terminate
    local left
    left=$(cluster_pids)
    [ -z "$left" ] || kill -KILL $left 2>/dev/null || true
    rm -f "$STATE/sessions" "$STATE"/*.session
    # `ray start --head` names this cluster as the machine's default for `ray.init()`; forget it.
    if grep -qs ":$RAY_PORT\$" /tmp/ray/ray_current_cluster; then rm -f /tmp/ray/ray_current_cluster; fi
    echo "local Ray cluster stopped"
}

case "${1:-}" in
    start) shift; start "$@" ;;
    stop) stop ;;
    address) address ;;
    add) shift; add "$@" ;;
    kill) kill_node "$2" ;;
    node-id) node_id "$2" ;;
    *) echo "usage: $0 start [WORKER_NODES] | add [WORKER_NODES] | kill worker-N | node-id worker-N | address | stop" >&2; exit 2 ;;
esac
