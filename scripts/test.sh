#!/usr/bin/env bash
# Runs the whole test suite: formatting and lints, unit tests,
# process-level tests against real metastore-node processes with etcdctl and
# the etcd-client crate, the differential test against a real etcd, the
# crash test, and the history checker under faults (in-process and real
# processes, MetaStore and a real 3-member etcd as calibration).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
"$root/scripts/setup.sh"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/metastore-target}"
# --all-targets resolves features exactly as `cargo test` does, so the
# second step reuses this build instead of relinking everything.
cargo fmt --all -- --check
cargo build --workspace --all-targets
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace --no-fail-fast -- --test-threads=2
