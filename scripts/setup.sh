#!/usr/bin/env bash
# Installs what building and testing MetaStore needs on a Debian machine
# with a Rust toolchain: libclang for RocksDB's bindgen, and etcd's own
# server and etcdctl for the compatibility tests.
set -euo pipefail
need=()
dpkg -s libclang-dev >/dev/null 2>&1 || need+=(libclang-dev)
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
command -v etcdctl >/dev/null 2>&1 || need+=(etcd-client)
command -v curl >/dev/null 2>&1 || need+=(curl)
# The etcd-client crate (used by the tests) compiles its protos with protoc.
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}"
fi
# The test command checks formatting and lints.
if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
  rustup component add rustfmt clippy
fi

# RocksDB, built once per machine outside the workspace (see
# .cargo/config.toml for why) and linked into the workspace as ./.rocksdb.
root="$(cd "$(dirname "$0")/.." && pwd)"
version=$(grep -A1 '^name = "librocksdb-sys"' "$root/Cargo.lock" | sed -n 's/^version = "\(.*\)"/\1/p')
lib_dir="$HOME/.cache/metastore-rocksdb/$version"
if [ ! -f "$lib_dir/librocksdb.a" ]; then
  echo "building RocksDB $version once for this machine (takes a while)..." >&2
  builder="$HOME/.cache/metastore-rocksdb/builder-$version"
  mkdir -p "$builder/src" "$lib_dir"
  cat > "$builder/Cargo.toml" <<TOML
[package]
name = "rocksdb-builder"
version = "0.0.0"
edition = "2021"

[dependencies]
librocksdb-sys = { version = "=${version%%+*}", default-features = false, features = ["lz4", "static"] }

[profile.release]
debug = false
TOML
  : > "$builder/src/lib.rs"
  (cd "$builder" && env -u ROCKSDB_LIB_DIR -u ROCKSDB_STATIC CARGO_TARGET_DIR="$builder/target" cargo build --release)
  built=$(ls -t "$builder"/target/release/build/librocksdb-sys-*/out/librocksdb.a | head -1)
  cp "$built" "$lib_dir/librocksdb.a.tmp"
  mv "$lib_dir/librocksdb.a.tmp" "$lib_dir/librocksdb.a"
  rm -rf "$builder/target"
fi
ln -sfn "$lib_dir" "$root/.rocksdb"

# Debian's etcd-server starts a system etcd on 2379; the tests and the dev
# server need that port for themselves.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet etcd 2>/dev/null; then
  systemctl stop etcd || true
fi
