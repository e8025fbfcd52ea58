#!/usr/bin/env bash
# Memory per watcher, MetaStore against etcd: one etcd member and one
# MetaStore dev node on fresh data dirs, side by side; for each, the
# server's RSS is sampled every 100 ms while `metastore-bench watch` holds
# 10,000 watchers of one key (100 streams × 100), first nearly idle (5
# puts at 1/s), then under load (50 puts at 10/s), each load on fresh
# servers. Prints the RSS growth and the growth per watcher.
#
# Usage: benches/watch-memory.sh [--no-build]
# Needs: etcd (Debian: etcd-server), python3, cargo (unless --no-build).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/metastore-target}"
BIN_DIR="$CARGO_TARGET_DIR/release"
ETCD="$(command -v "${ETCD_BIN:-etcd}")"
WATCHERS=10000

if [[ "${1:-}" != "--no-build" ]]; then
    (cd "$ROOT" && cargo build --release -p metastore-bench -p metastore-node >&2)
fi

WORK="$(mktemp -d /tmp/metastore-watch-memory.XXXXXX)"
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

# free_ports
source "$ROOT/benches/lib.sh"

rss_kb() { awk '/VmRSS/ { print $2 }' "/proc/$1/status"; }

wait_ready() {
    local ep=$1 deadline=$((SECONDS + 30))
    until "$BIN_DIR/metastore-bench" put --endpoints "$ep" --total 1 >/dev/null 2>&1; do
        ((SECONDS < deadline)) || { echo "$ep never answered" >&2; exit 1; }
        sleep 0.2
    done
}

# measure NAME PID ENDPOINT PUTS RATE
measure() {
    local name=$1 pid=$2 ep=$3 puts=$4 rate=$5 base max=0 r bench
    wait_ready "$ep"
    sleep 1
    base=$(rss_kb "$pid")
    "$BIN_DIR/metastore-bench" watch --endpoints "$ep" --streams 100 --watch-per-stream 100 \
        --conns 10 --clients 10 --put-total "$puts" --put-rate "$rate" --event-timeout 60s \
        >"$WORK/$name.out" 2>&1 &
    bench=$!
    while kill -0 "$bench" 2>/dev/null; do
        r=$(rss_kb "$pid")
        ((r > max)) && max=$r
        sleep 0.1
    done
    wait "$bench" || { echo "$name: benchmark failed" >&2; cat "$WORK/$name.out" >&2; }
    printf '%-8s %-22s RSS growth %4d MB, %5d B per watcher\n' "$name" "$puts puts at $rate/s" \
        $(((max - base) / 1024)) $(((max - base) * 1024 / WATCHERS))
}

for load in "5 1" "50 10"; do
    read -r puts rate <<<"$load"
    read -r -a ports <<<"$(free_ports 4)"
    "$ETCD" --data-dir "$WORK/etcd-$puts" \
        --listen-client-urls "http://127.0.0.1:${ports[0]}" \
        --advertise-client-urls "http://127.0.0.1:${ports[0]}" \
        --listen-peer-urls "http://127.0.0.1:${ports[1]}" >"$WORK/etcd-$puts.log" 2>&1 &
    etcd_pid=$!
    PIDS+=("$etcd_pid")
    "$BIN_DIR/metastore-node" --data-dir "$WORK/ms-$puts" \
        --listen-client-urls "http://127.0.0.1:${ports[2]}" \
        --listen-peer-urls "http://127.0.0.1:${ports[3]}" >"$WORK/ms-$puts.log" 2>&1 &
    ms_pid=$!
    PIDS+=("$ms_pid")
    measure etcd "$etcd_pid" "127.0.0.1:${ports[0]}" "$puts" "$rate"
    measure metastore "$ms_pid" "127.0.0.1:${ports[2]}" "$puts" "$rate"
    kill "$etcd_pid" "$ms_pid"
done
