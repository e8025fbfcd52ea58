#!/usr/bin/env bash
# A long soak of the history checker, for humans (CI runs the same tests
# with short workloads): the in-process router cluster under raft faults,
# and real processes (a dev node; 3 PD members + 3 nodes under the nemesis;
# a real 3-member etcd under the same faults, as calibration). Each round
# draws fresh seeds and runs every workload for SECONDS; the soak stops at
# the first failure, whose seeds are in the log (METASTORE_SEED=... and
# NEMESIS_SEED=... replay it), or after MINUTES.
#
# Usage: scripts/soak.sh [MINUTES (default 60)] [SECONDS per workload (default 120)]
set -euo pipefail
minutes="${1:-60}"
secs="${2:-120}"
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
"$root/scripts/setup.sh"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/metastore-target}"
cargo build --workspace --all-targets
log="$(mktemp -d)/soak.log"
echo "soak: ${minutes} min, ${secs} s per workload; log in $log" >&2
end=$((SECONDS + minutes * 60))
round=0
while [ "$SECONDS" -lt "$end" ]; do
  round=$((round + 1))
  echo "=== round $round" | tee -a "$log" >&2
  if ! METASTORE_HISTORY_SECS="$secs" cargo test -p router -p integration-tests --test history \
      -- --test-threads=1 --nocapture >>"$log" 2>&1; then
    echo "soak: round $round failed; seeds and violations in $log" >&2
    grep -E "seed|VIOLATION|violation|panicked" "$log" | tail -20 >&2
    exit 1
  fi
done
echo "soak: $round rounds passed" >&2
