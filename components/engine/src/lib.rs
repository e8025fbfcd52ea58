//! The two storage engines of a node.
//!
//! * [`KvEngine`]: one RocksDB instance holding the state machine of every
//!   region on the node (MVCC versions, the revision index, region and apply
//!   state), in the column families listed in [`cf`].
//! * [`RaftLogEngine`]: one raft-engine instance holding the raft logs, hard
//!   states and conf states of every region on the node, keyed by region id.
//! * [`raft_logger`]: raft-rs's slog output routed to `tracing`, for every
//!   raft group in the process (region replicas, PD).
//!
//! Durability contract: a raft log write with `sync = true` is on disk when it
//! returns; RocksDB writes go through its WAL without fsync, because every
//! state-machine change can be re-derived from the raft log above the
//! persisted apply index (see `raftstore`). Raft log GC therefore must not pass
//! an apply index that RocksDB has not synced ([`KvEngine::sync_wal`]).

mod error;
mod kv;
mod raft_log;
mod raft_logger;

pub use error::{Error, Result};
pub use kv::{cf, KvEngine, KvSnapshot, RawIter, WriteBatch};
pub use raft;
pub use raft_log::{RaftLogBatch, RaftLogEngine};
pub use raft_logger::raft_logger;
pub use rocksdb;
