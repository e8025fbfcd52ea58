#!/usr/bin/env bash
# A local MetaStore cluster on one machine: 3 placement-driver members and 3
# nodes on 127.0.0.1, data and logs under ./local-cluster (kept across
# restarts).
#
#   scripts/cluster.sh start          build, then start whatever is not running
#   scripts/cluster.sh status         which processes run (and their pids)
#   scripts/cluster.sh kill NAME      kill -9 one of pd1 pd2 pd3 n1 n2 n3
#   scripts/cluster.sh restart NAME   start it again with its data
#   scripts/cluster.sh stop           SIGTERM everything
#   scripts/cluster.sh clean          stop and delete ./local-cluster
#
# METASTORE_NODE_ARGS adds flags to every node, e.g. small split limits:
#   METASTORE_NODE_ARGS="--region-max-keys 1000 --split-check-interval 1s" scripts/cluster.sh start
# METASTORE_RELEASE=1 builds and runs the release binaries (benchmarks).
#
# Ports (etcd's convention for local clusters):
#   nodes  n1 2379/2380  n2 22379/22380  n3 32379/32380   (client/peer)
#   PD     pd1 2479/2480 pd2 22479/22480 pd3 32479/32480  (client/peer)
# etcdctl: --endpoints=127.0.0.1:2379,127.0.0.1:22379,127.0.0.1:32379
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/metastore-target}"
profile=debug
[[ -n "${METASTORE_RELEASE:-}" ]] && profile=release
bin="$CARGO_TARGET_DIR/$profile"
base="${METASTORE_CLUSTER_DIR:-$PWD/local-cluster}"

pd_port() { case "$1" in pd1) echo 2479 ;; pd2) echo 22479 ;; pd3) echo 32479 ;; esac; }
node_port() { case "$1" in n1) echo 2379 ;; n2) echo 22379 ;; n3) echo 32379 ;; esac; }
initial_cluster="pd1=http://127.0.0.1:2480,pd2=http://127.0.0.1:22480,pd3=http://127.0.0.1:32480"
pd_endpoints="http://127.0.0.1:2479,http://127.0.0.1:22479,http://127.0.0.1:32479"

pid_of() {
    local f="$base/$1.pid"
    [[ -f "$f" ]] && kill -0 "$(cat "$f")" 2>/dev/null && cat "$f"
}

launch() {
    local name="$1"
    if pid_of "$name" >/dev/null; then
        echo "$name already running (pid $(pid_of "$name"))"
        return
    fi
    mkdir -p "$base"
    case "$name" in
        pd*)
            local p; p="$(pd_port "$name")"
            "$bin/metastore-pd" --name "$name" --data-dir "$base/$name" \
                --listen-client-urls "http://127.0.0.1:$p" \
                --listen-peer-urls "http://127.0.0.1:$((p + 1))" \
                --initial-cluster "$initial_cluster" \
                >>"$base/$name.log" 2>&1 &
            ;;
        n*)
            local p; p="$(node_port "$name")"
            "$bin/metastore-node" --name "$name" --data-dir "$base/$name" \
                --listen-client-urls "http://127.0.0.1:$p" \
                --listen-peer-urls "http://127.0.0.1:$((p + 1))" \
                --pd-endpoints "$pd_endpoints" \
                ${METASTORE_NODE_ARGS:-} \
                >>"$base/$name.log" 2>&1 &
            ;;
        *) echo "unknown member $name (pd1 pd2 pd3 n1 n2 n3)" >&2; exit 2 ;;
    esac
    echo $! >"$base/$name.pid"
    echo "started $name (pid $!, log $base/$name.log)"
}

wait_port() {
    local port="$1"
    for _ in $(seq 1 100); do
        (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "nothing listens on $port; see the logs in $base" >&2
    return 1
}

case "${1:-}" in
    start)
        "$root/scripts/setup.sh"
        if [[ "$profile" == release ]]; then
            (cd "$root" && cargo build --release --workspace --bins)
        else
            (cd "$root" && cargo build --workspace --bins)
        fi
        for m in pd1 pd2 pd3; do launch "$m"; done
        for m in pd1 pd2 pd3; do wait_port "$(pd_port "$m")"; done
        # The first node bootstraps the cluster; the others join it and PD
        # gives every region a replica on each of them.
        for m in n1 n2 n3; do launch "$m"; wait_port "$(node_port "$m")"; done
        echo "endpoints: 127.0.0.1:2379,127.0.0.1:22379,127.0.0.1:32379"
        ;;
    status)
        for m in pd1 pd2 pd3 n1 n2 n3; do
            if pid="$(pid_of "$m")"; then echo "$m running (pid $pid)"; else echo "$m stopped"; fi
        done
        ;;
    kill)
        pid="$(pid_of "${2:?name}")" || { echo "${2} is not running" >&2; exit 1; }
        kill -9 "$pid"
        while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
        echo "killed $2 (pid $pid)"
        ;;
    restart)
        launch "${2:?name}"
        ;;
    stop | clean)
        for m in n3 n2 n1 pd3 pd2 pd1; do
            if pid="$(pid_of "$m")"; then kill -TERM "$pid" && echo "stopping $m"; fi
        done
        for m in n3 n2 n1 pd3 pd2 pd1; do
            while pid_of "$m" >/dev/null; do sleep 0.1; done
        done
        if [[ "$1" == clean ]]; then rm -rf "$base" && echo "removed $base"; fi
        ;;
    *)
        sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'
        exit 2
        ;;
esac
