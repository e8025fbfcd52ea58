//! Region replicas of a node: raft-rs groups over the shared raft-engine log
//! and the shared RocksDB state machine.
//!
//! [`Store`] opens a node's engines and drives every hosted region's
//! replica ([`peer`]) on a few threads (`poller`: one raft-engine write per
//! round for all the replicas with work in it); [`RegionHandle`] (contract in `region_handle.rs`) is how the layers above
//! propose commands and take linearizable read barriers. Commands carry
//! mutations computed by the leader (see the `mvcc` crate's `exec`), so
//! applying is deterministic and never reads. [`storage`] implements
//! raft-rs's `Storage` on raft-engine, including region snapshots (encoded
//! by the `snapshot` module) for replicas behind the log GC. [`Transport`]
//! carries raft messages between nodes.
//!
//! Inside, the replica loop (`peer`) delegates each job to a module with
//! its own contract: `msg` (the mailbox protocol), `message` (checking and
//! addressing raft messages), `apply` (committed entries to a write batch
//! and an outcome), `membership` (conf changes and the region meta),
//! `snapshot` (encoding, generating off the replica's thread, carrying as
//! files and installing region snapshots), `log_gc`,
//! `compaction` (physical MVCC clean-up), `consistency` (the replicas'
//! consistency check), `proposals` (pending proposals
//! and what each answer claims: did not apply, or outcome unknown),
//! `read_queue` (readers waiting for an index), `status` (what a replica
//! publishes), `txn` (transaction locks and decisions, for writes over
//! several regions) and `merge` (what the merge commands make of regions).

mod apply;
mod compaction;
mod consistency;
mod error;
pub mod feed;
mod keys;
pub mod lease;
mod log_gc;
mod membership;
mod merge;
mod message;
mod msg;
pub mod peer;
mod poller;
mod proposals;
mod read_queue;
mod region_handle;
mod snapshot;
mod split;
mod status;
pub mod storage;
mod store;
pub mod transport;
pub mod txn;

pub use consistency::{Inconsistency, DEFAULT_CONSISTENCY_CHECK_INTERVAL};
pub use error::{Error, Result};
pub use msg::{Applied, ProposeCallback};
pub use peer::PeerStatus;
pub use region_handle::{ReadState, RegionHandle};
pub use snapshot::SnapshotSink;
pub use store::{NodeIdent, Store, StoreOptions, DEFAULT_POLLERS};
pub use transport::{DropTransport, SnapshotDone, Transport};

/// The kinds of membership change `RegionHandle::change_peers` takes.
pub use raft::eraftpb::ConfChangeType;
