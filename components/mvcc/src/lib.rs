//! etcd's multi-version key-value model on the node's RocksDB.
//!
//! * [`codec`]: key and version encodings of the MVCC and revision column
//!   families.
//! * [`MvccStore`] (`store.rs`, the layer's contract): reads at any revision,
//!   change listing for watch replay; physical compaction and stable
//!   hashing of a key range (`compact.rs`).
//! * `index.rs`: the key index (the MVCC CF's keys without values) that
//!   counts are answered from, and the walk every range read uses.
//! * [`check`]: etcd's request validation (empty keys, txn limits, put/delete
//!   overlaps), in etcd's order.
//! * [`ReadView`] (`view.rs`): what evaluation reads — a node's snapshot, or
//!   the keys a transaction over several regions fetched from them.
//! * [`lease`]: where a lease lives in the keyspace, and [`lease::LeaseView`],
//!   what evaluation knows of leases.
//! * [`exec`]: etcd's request semantics (Range options, Put flags, DeleteRange,
//!   nested Txn with compares) evaluated into mutations a raft entry carries.
//!
//! The store holds no "current revision": revisions come from the placement
//! driver's oracle, and the region's apply state tracks what was applied and
//! compacted.

pub mod check;
pub mod codec;
mod compact;
pub mod exec;
mod index;
pub mod lease;
mod store;
mod view;

pub use compact::{CompactStats, RangeHash};
pub use store::{KeyRange, MvccSnapshot, MvccStore, RangeResult, SizeStats};
pub use view::{AtRevision, FetchedView, ReadView};

/// Errors of the MVCC layer. The etcd-visible ones carry etcd's meaning; the
/// server maps them to etcd's gRPC codes and texts.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum Error {
    #[error("key is not provided")]
    EmptyKey,
    #[error("key not found")]
    KeyNotFound,
    #[error("value is provided")]
    ValueProvided,
    #[error("lease is provided")]
    LeaseProvided,
    #[error("invalid sort option")]
    InvalidSortOption,
    #[error("too many operations in txn request")]
    TooManyOps,
    #[error("duplicate key given in txn request")]
    DuplicateKey,
    #[error("requested lease not found")]
    LeaseNotFound,
    #[error("lease already exists")]
    LeaseExists,
    /// A revoke found keys attached to the lease that it was not given
    /// (attached since they were listed): list them again and retry.
    #[error("the keys attached to the lease changed")]
    LeaseKeysChanged,
    /// The revoke of an expired lease found it not expired on its leader's
    /// clock (renewed, or promoted by a new leader).
    #[error("the lease has not expired")]
    LeaseNotExpired,
    /// A put with a lease whose revoke is under way: retried until the
    /// revoke is done (then "requested lease not found").
    #[error("the lease is being revoked")]
    LeaseRevoking,
    #[error("required revision has been compacted")]
    Compacted,
    #[error("required revision is a future revision")]
    FutureRev,
    #[error("corrupted mvcc data: {0}")]
    Corrupted(String),
    #[error("storage: {0}")]
    Storage(String),
}

impl From<engine::Error> for Error {
    fn from(e: engine::Error) -> Self {
        Error::Storage(e.to_string())
    }
}

impl From<engine::rocksdb::Error> for Error {
    fn from(e: engine::rocksdb::Error) -> Self {
        Error::Storage(e.to_string())
    }
}

pub type Result<T> = std::result::Result<T, Error>;
