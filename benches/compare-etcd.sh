#!/usr/bin/env bash
# Side-by-side throughput/latency comparison of MetaStore and etcd on this
# machine, driven by metastore-bench (etcd's `benchmark` command shape).
#
# Both systems are started on fresh data dirs with the same replica count,
# on loopback only, and every workload is run against them alternately
# (etcd, MetaStore, etcd, MetaStore, ...) so that drift of the machine
# (other load, thermal, page cache) hits both alike. Each cell of the table
# is the median over the rounds.
#
# Usage: benches/compare-etcd.sh [--quick] [--rounds N] [--replicas 1|3]
#                                [--count [--count-keys N]]
#                                [--no-build] [--out FILE] [--keep]
#   --quick      smaller totals and one round (under a minute once built)
#   --count      the counting workloads instead: preload N keys (default
#                200000, 256-byte values) under /registry/pods/ into both
#                systems, then count_only over them, a first page of 500
#                with its count, and whole paged lists (pages of 500 at the
#                first page's revision, each counting the rest), as
#                Kubernetes lists
#   --watch      the watch workloads instead: 1, 100 and 10,000 watchers of
#                one key each stream set, events timed from just before
#                their put to their arrival (req/s is events/s, p99 the
#                event latency)
#   --lease      the lease workload instead: keep-alives of one lease per
#                client over a stream each (etcd's `benchmark lease-keepalive`),
#                1 and 100 clients
#   --rounds N   A/B rounds per workload (default 3, quick 1)
#   --replicas N members per system (default 1; 3 = a 3-member etcd vs
#                3 metastore-pd members + 3 nodes with 3 replicas)
#   --no-build   use the binaries already in the target dir
#   --out FILE   also write the Markdown table to FILE
#   --keep       keep the work dir (data dirs, logs, raw JSON results)
#
# Needs: etcd + etcdctl (Debian: etcd-server, etcd-client; installed here if
# missing and running as root), python3, cargo (unless --no-build).
# Environment: CARGO_TARGET_DIR (default $HOME/.cache/metastore-target),
# ETCD_BIN, ETCDCTL_BIN, RUN_TIMEOUT (seconds per bench run, default 300).
set -euo pipefail

QUICK=0
ROUNDS=""
REPLICAS=1
BUILD=1
OUT=""
KEEP=0
COUNT=0
WATCH=0
LEASE=0
COUNT_KEYS=200000
while [[ $# -gt 0 ]]; do
    case "$1" in
        --quick) QUICK=1 ;;
        --rounds) ROUNDS="$2"; shift ;;
        --replicas) REPLICAS="$2"; shift ;;
        --count) COUNT=1 ;;
        --watch) WATCH=1 ;;
        --lease) LEASE=1 ;;
        --count-keys) COUNT_KEYS="$2"; shift ;;
        --no-build) BUILD=0 ;;
        --out) OUT="$2"; shift ;;
        --keep) KEEP=1 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
    shift
done
if [[ -z "$ROUNDS" ]]; then
    if [[ $QUICK == 1 ]]; then ROUNDS=1; else ROUNDS=3; fi
fi
if [[ "$REPLICAS" != 1 && "$REPLICAS" != 3 ]]; then
    echo "--replicas must be 1 or 3" >&2
    exit 2
fi

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/metastore-target}"
BIN_DIR="$CARGO_TARGET_DIR/release"
RUN_TIMEOUT="${RUN_TIMEOUT:-300}"

log() { echo "[compare] $*" >&2; }

# --- prerequisites -----------------------------------------------------------
if ! command -v "${ETCD_BIN:-etcd}" >/dev/null || ! command -v "${ETCDCTL_BIN:-etcdctl}" >/dev/null; then
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
        log "installing Debian's etcd-server and etcd-client"
        apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server etcd-client >&2
    else
        echo "etcd not found: apt-get install etcd-server etcd-client (or set ETCD_BIN/ETCDCTL_BIN)" >&2
        exit 1
    fi
fi
ETCD="$(command -v "${ETCD_BIN:-etcd}")"
ETCDCTL="$(command -v "${ETCDCTL_BIN:-etcdctl}")"
command -v python3 >/dev/null || { echo "python3 is required" >&2; exit 1; }

if [[ $BUILD == 1 ]]; then
    log "building release binaries (cargo build --release -p metastore-bench -p metastore-node -p metastore-pd)"
    (cd "$ROOT" && cargo build --release -p metastore-bench -p metastore-node -p metastore-pd >&2)
fi
BENCH="$BIN_DIR/metastore-bench"
NODE="$BIN_DIR/metastore-node"
PD="$BIN_DIR/metastore-pd"
for b in "$BENCH" "$NODE" "$PD"; do
    [[ -x "$b" ]] || { echo "missing $b (build with cargo build --release -p metastore-bench -p metastore-node -p metastore-pd)" >&2; exit 1; }
done

WORK="$(mktemp -d /tmp/metastore-compare.XXXXXX)"
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    if [[ $KEEP == 1 ]]; then
        log "work dir kept: $WORK"
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# free_ports
source "$ROOT/benches/lib.sh"

# --- start the systems -------------------------------------------------------
# Both set URLS to the comma-separated client URLs of the started members.
# (Not run in $(...): the server PIDs must land in this shell's PIDS.)
start_etcd() {
    local n=$1 i cluster="" peers=() clients=() ports
    read -r -a ports <<<"$(free_ports $((2 * n)))"
    URLS=""
    for ((i = 0; i < n; i++)); do
        peers+=("http://127.0.0.1:${ports[$((2 * i))]}")
        clients+=("http://127.0.0.1:${ports[$((2 * i + 1))]}")
        cluster+="${cluster:+,}etcd$i=${peers[$i]}"
    done
    for ((i = 0; i < n; i++)); do
        "$ETCD" --name "etcd$i" --data-dir "$WORK/etcd$i" \
            --listen-client-urls "${clients[$i]}" --advertise-client-urls "${clients[$i]}" \
            --listen-peer-urls "${peers[$i]}" --initial-advertise-peer-urls "${peers[$i]}" \
            --initial-cluster "$cluster" --initial-cluster-state new \
            --initial-cluster-token "compare-$$" \
            >"$WORK/etcd$i.log" 2>&1 &
        PIDS+=($!)
        URLS+="${URLS:+,}${clients[$i]}"
    done
}

start_metastore() {
    local n=$1 i pd_cluster="" pd_peers=() pd_clients=() peers=() clients=() ports
    URLS=""
    if [[ $n == 1 ]]; then
        # One node with its embedded placement driver (dev mode).
        read -r -a ports <<<"$(free_ports 2)"
        "$NODE" --data-dir "$WORK/ms0" \
            --listen-client-urls "http://127.0.0.1:${ports[1]}" \
            --listen-peer-urls "http://127.0.0.1:${ports[0]}" >"$WORK/ms0.log" 2>&1 &
        PIDS+=($!)
        URLS="http://127.0.0.1:${ports[1]}"
        return
    fi
    # n placement-driver members and n nodes; PD gives the region a replica
    # on every node (max-replicas 3).
    read -r -a ports <<<"$(free_ports $((4 * n)))"
    for ((i = 0; i < n; i++)); do
        pd_peers+=("http://127.0.0.1:${ports[$((4 * i))]}")
        pd_clients+=("http://127.0.0.1:${ports[$((4 * i + 1))]}")
        peers+=("http://127.0.0.1:${ports[$((4 * i + 2))]}")
        clients+=("http://127.0.0.1:${ports[$((4 * i + 3))]}")
        pd_cluster+="${pd_cluster:+,}pd$i=${pd_peers[$i]}"
    done
    local pd_eps
    pd_eps="$(IFS=,; echo "${pd_clients[*]}")"
    for ((i = 0; i < n; i++)); do
        "$PD" --name "pd$i" --data-dir "$WORK/pd$i" \
            --listen-client-urls "${pd_clients[$i]}" --listen-peer-urls "${pd_peers[$i]}" \
            --initial-cluster "$pd_cluster" >"$WORK/pd$i.log" 2>&1 &
        PIDS+=($!)
    done
    for ((i = 0; i < n; i++)); do
        "$NODE" --name "ms$i" --data-dir "$WORK/ms$i" \
            --listen-client-urls "${clients[$i]}" --listen-peer-urls "${peers[$i]}" \
            --pd-endpoints "$pd_eps" >"$WORK/ms$i.log" 2>&1 &
        PIDS+=($!)
        URLS+="${URLS:+,}${clients[$i]}"
        # The first node bootstraps the cluster; the others join it.
        if [[ $i == 0 ]]; then sleep 1; fi
    done
}

# Waits until a write through the endpoints succeeds (a leader exists and
# the KV service answers), then writes the key the read workloads read.
wait_ready() {
    local name=$1 eps=$2 i
    for ((i = 0; i < 600; i++)); do
        if ETCDCTL_API=3 "$ETCDCTL" --endpoints "$eps" --command-timeout=2s \
            put compare-bench-key "$(printf 'v%.0s' {1..256})" >/dev/null 2>&1; then
            log "$name ready at $eps"
            return 0
        fi
        sleep 0.1
    done
    echo "$name did not become ready at $eps; log tail:" >&2
    tail -n 20 "$WORK"/"${name}"*.log >&2 || true
    exit 1
}

log "work dir $WORK; replicas $REPLICAS; rounds $ROUNDS; quick $QUICK"
start_etcd "$REPLICAS"
ETCD_EPS="$URLS"
start_metastore "$REPLICAS"
MS_EPS="$URLS"
wait_ready etcd "$ETCD_EPS"
wait_ready ms "$MS_EPS"
if [[ $REPLICAS -gt 1 ]]; then
    # Measure only once every node holds a caught-up replica: a local
    # (serializable) read of the key written above succeeds on each.
    for ep in ${MS_EPS//,/ }; do
        for ((i = 0; i < 600; i++)); do
            if ETCDCTL_API=3 "$ETCDCTL" --endpoints "$ep" --command-timeout=2s \
                get compare-bench-key --consistency=s --print-value-only 2>/dev/null | grep -q v; then
                break
            fi
            sleep 0.1
        done
    done
    log "ms: every node has a replica"
fi

if [[ $COUNT == 1 ]]; then
    # The same keys in both systems (metastore-bench writes etcd's key
    # format after the prefix), one revision per key.
    for sys in etcd ms; do
        if [[ $sys == etcd ]]; then eps="$ETCD_EPS"; else eps="$MS_EPS"; fi
        log "$sys: preloading $COUNT_KEYS keys under /registry/pods/"
        "$BENCH" --endpoints "$eps" --conns=10 --clients=100 --output json put \
            --key-prefix /registry/pods/ --key-size=8 --val-size=256 --sequential-keys \
            --key-space-size="$COUNT_KEYS" --total="$COUNT_KEYS" >"$WORK/preload.$sys.json" 2>/dev/null
        python3 - "$WORK/preload.$sys.json" >&2 <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"[compare]   {r['succeeded']} puts, {r['requests_per_sec']:.0f}/s, {r['errors']} errors")
EOF
    done
fi

# --- workloads -----------------------------------------------------------------
# name|global flags|subcommand and its flags. The first row is etcd's documented
# write row (op-guide/performance.md: 8-byte keys, 256-byte values, 100 conns,
# 1000 clients) with the total scaled to a 2-core machine.
if [[ $QUICK == 1 ]]; then
    W1000=10000 W1=500 R=10000 R1=200 T=5000
else
    W1000=50000 W1=2000 R=50000 R1=1000 T=20000
fi
WORKLOADS=(
    "put 1000 clients|--conns=100 --clients=1000|put --key-size=8 --val-size=256 --sequential-keys --key-space-size=100000 --total=$W1000"
    "put 1 client|--conns=1 --clients=1|put --key-size=8 --val-size=256 --sequential-keys --key-space-size=100000 --total=$W1"
    "range linearizable 1000 clients|--conns=100 --clients=1000|range compare-bench-key --consistency=l --total=$R"
    "range serializable 1000 clients|--conns=100 --clients=1000|range compare-bench-key --consistency=s --total=$R"
    "range linearizable 1 client|--conns=1 --clients=1|range compare-bench-key --consistency=l --total=$R1"
    "txn-put 1000 clients|--conns=100 --clients=1000|txn-put --key-size=8 --val-size=256 --txn-ops=1 --key-space-size=100000 --total=$T"
)

if [[ $COUNT == 1 ]]; then
    if [[ $QUICK == 1 ]]; then C=10 L=1; else C=50 L=2; fi
    PODS="/registry/pods/ /registry/pods0"
    WORKLOADS=(
        "count_only $COUNT_KEYS keys, 1 client|--conns=1 --clients=1|range $PODS --count-only --total=$C"
        "first page of 500 with count, 1 client|--conns=1 --clients=1|range $PODS --limit=500 --total=$C"
        "paged list of $COUNT_KEYS keys (limit 500), 1 client|--conns=1 --clients=1|list /registry/pods/ --limit=500 --total=$L"
    )
fi

if [[ $WATCH == 1 ]]; then
    if [[ $QUICK == 1 ]]; then P1=500 P100=200 P10K=20; else P1=2000 P100=1000 P10K=100; fi
    WORKLOADS=(
        "watch 1 watcher|--conns=1 --clients=1|watch --streams=1 --watch-per-stream=1 --put-total=$P1"
        "watch 100 watchers|--conns=10 --clients=10|watch --streams=10 --watch-per-stream=10 --put-total=$P100"
        "watch 10000 watchers|--conns=10 --clients=10|watch --streams=100 --watch-per-stream=100 --put-total=$P10K"
    )
fi

if [[ $LEASE == 1 ]]; then
    if [[ $QUICK == 1 ]]; then K1=1000 K100=5000; else K1=5000 K100=50000; fi
    WORKLOADS=(
        "lease-keepalive 1 client|--conns=1 --clients=1|lease-keepalive --total=$K1"
        "lease-keepalive 100 clients|--conns=10 --clients=100|lease-keepalive --total=$K100"
    )
fi

RESULTS="$WORK/results"
mkdir -p "$RESULTS"
run_one() {
    local system=$1 eps=$2 idx=$3 round=$4 global=$5 cmd=$6
    local out="$RESULTS/$idx.$system.$round.json"
    # shellcheck disable=SC2086 # flags are word lists on purpose
    if ! timeout "$RUN_TIMEOUT" "$BENCH" --endpoints "$eps" --output json $global $cmd >"$out" 2>"$out.err"; then
        log "  $system: run failed or timed out (see below)"
        tail -n 5 "$out.err" >&2 || true
        echo '{"failed": true}' >"$out"
        return 0
    fi
    python3 - "$out" "$system" >&2 <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
l = r["latency_ms"]
fmt = lambda v: "-" if v is None else f"{v:.2f}"
errs = f", {r['errors']} errors" if r["errors"] else ""
print(f"[compare]   {sys.argv[2]:>9}: {r['requests_per_sec']:10.0f} req/s, p50 {fmt(l['p50'])} ms, p99 {fmt(l['p99'])} ms{errs}")
EOF
}

for idx in "${!WORKLOADS[@]}"; do
    IFS='|' read -r name global cmd <<<"${WORKLOADS[$idx]}"
    log "workload $((idx + 1))/${#WORKLOADS[@]}: $name ($global $cmd)"
    for ((round = 1; round <= ROUNDS; round++)); do
        run_one etcd "$ETCD_EPS" "$idx" "$round" "$global" "$cmd"
        run_one metastore "$MS_EPS" "$idx" "$round" "$global" "$cmd"
    done
done

# --- table ---------------------------------------------------------------------
ETCD_VERSION="$("$ETCD" --version 2>/dev/null | head -n1 | awk '{print $NF}')"
CPU="$(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -n1)"
REV="$(cd "$ROOT" && git describe --always --dirty 2>/dev/null || echo unknown)"
if [[ $BUILD == 0 ]]; then
    # The binaries may predate the work tree.
    REV+=" (binaries not rebuilt by this run)"
fi
NAMES="$(printf '%s\n' "${WORKLOADS[@]}" | cut -d'|' -f1)"
TABLE="$(python3 - "$RESULTS" "${#WORKLOADS[@]}" "$ROUNDS" <<EOF
import json, os, statistics, sys
res, n, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
names = """$NAMES""".splitlines()

def load(i, system):
    runs = []
    for r in range(1, rounds + 1):
        try:
            j = json.load(open(os.path.join(res, f"{i}.{system}.{r}.json")))
        except (OSError, ValueError):
            continue
        if not j.get("failed"):
            runs.append(j)
    return runs

def med(runs, f):
    vals = [f(r) for r in runs if f(r) is not None]
    return statistics.median(vals) if vals else None

def num(v, d=0):
    return "-" if v is None else f"{v:,.{d}f}"

def ratio(a, b):
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}"

print("| workload | etcd req/s | MetaStore req/s | req/s ratio | etcd p99 ms | MetaStore p99 ms | p99 ratio | errors (etcd/MetaStore) |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
for i in range(n):
    e, m = load(i, "etcd"), load(i, "metastore")
    e_rps = med(e, lambda r: r["requests_per_sec"])
    m_rps = med(m, lambda r: r["requests_per_sec"])
    e_p99 = med(e, lambda r: r["latency_ms"]["p99"])
    m_p99 = med(m, lambda r: r["latency_ms"]["p99"])
    e_err = sum(r["errors"] for r in e) if e else "failed"
    m_err = sum(r["errors"] for r in m) if m else "failed"
    print(f"| {names[i]} | {num(e_rps)} | {num(m_rps)} | {ratio(m_rps, e_rps)} | {num(e_p99, 2)} | {num(m_p99, 2)} | {ratio(m_p99, e_p99)} | {e_err}/{m_err} |")
EOF
)"

REPORT="$(cat <<EOF
### MetaStore vs etcd ($REPLICAS replica(s), median of $ROUNDS A/B round(s))

Machine: $(nproc) cores ($CPU), $(free -g | awk '/^Mem:/{print $2}') GiB RAM, $(uname -sr); etcd $ETCD_VERSION (Debian); MetaStore $REV; $(date -u +%Y-%m-%d).
Servers and benchmark client share the machine. Ratios are MetaStore/etcd: req/s above 1 and p99 below 1 favour MetaStore.

$TABLE
EOF
)"
echo "$REPORT"
if [[ -n "$OUT" ]]; then
    echo "$REPORT" >"$OUT"
    log "table written to $OUT"
fi
