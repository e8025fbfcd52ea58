#!/usr/bin/env bash
# Builds and runs metastore-node. With no arguments: a single-node dev server
# with an embedded placement driver on http://127.0.0.1:2379, data kept in
# ./default.metastore across restarts. Arguments go to metastore-node.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
"$root/scripts/setup.sh"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/metastore-target}"
# Binaries only; the test script builds every target (a different feature
# resolution for build scripts, so switching between the two rebuilds a few
# crates, not RocksDB).
# Built from the workspace root so .cargo/config.toml (prebuilt RocksDB)
# applies; the server itself runs in the caller's directory.
(cd "$root" && cargo build --workspace --bins)
exec "$CARGO_TARGET_DIR/debug/metastore-node" "$@"
