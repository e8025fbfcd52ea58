#!/usr/bin/env bash
# Runs the whole test suite: unit tests, process-level tests against real
# metastore-node processes with etcdctl and the etcd-client crate, the
# differential test against a real etcd, and the crash test.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
"$root/scripts/setup.sh"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/metastore-target}"
# --all-targets resolves features exactly as `cargo test` does, so the
# second step reuses this build instead of relinking everything.
cargo build --workspace --all-targets
cargo test --workspace --no-fail-fast -- --test-threads=2
