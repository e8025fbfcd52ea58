//! Errors of the router, classified by what a caller may do next.
//!
//! Every failure of a request falls in exactly one class:
//! * **request errors** ([`Error::Mvcc`]): etcd rejected the request (bad
//!   argument, compacted or future revision, ...); passed to the client
//!   with etcd's code and text, never retried;
//! * **not applied** ([`Error::is_retryable`]): region errors (not leader,
//!   epoch changed, region not here, a proposal refused before or at apply),
//!   a node that was never reached, a placement driver that failed before a
//!   revision was used. The request certainly had no effect; the router
//!   locates the region again and retries until its deadline;
//! * **outcome unknown** ([`Error::OutcomeUnknown`]): the request ran out of
//!   time, or the replica, node or connection carrying it went away after it
//!   may have been carried out. A write may or may not have applied, so it
//!   is never retried; the client gets etcd's "request timed out";
//! * failures of this node or of the cluster that retrying does not cure
//!   ([`Error::Pd`] when not transient, [`Error::Internal`],
//!   [`Error::CrossRegion`]).
//!
//! `server::errors` turns each into etcd's gRPC status; the forwarding wire
//! ([`crate::forward::wire`]) carries each class across nodes unchanged.

use pd::PdError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An etcd request error, with etcd's meaning.
    #[error(transparent)]
    Mvcc(#[from] mvcc::Error),
    /// The region is not served as the request expected (see
    /// [`raftstore::Error::is_retryable`]); never an outcome-unknown or
    /// etcd error, which are converted to their own variants.
    #[error(transparent)]
    Region(raftstore::Error),
    /// The placement driver failed, here or on the node the request was
    /// forwarded to.
    #[error("placement driver: {0}")]
    Pd(#[from] PdError),
    #[error("no region serves key {0:?}")]
    NoRegion(Vec<u8>),
    /// The request's keys are not in one region (any more): the caller takes
    /// the multi-region path, or the regions afresh.
    #[error("the request's keys span several regions")]
    CrossRegion,
    /// The node believed to hold the leader could not be reached; the
    /// request was not sent.
    #[error("node {node_id} unreachable: {reason}")]
    Unreachable { node_id: u64, reason: String },
    /// The request may have been carried out, or ran out of time: for a
    /// write, whether it applied is unknown.
    #[error("outcome unknown: {0}")]
    OutcomeUnknown(String),
    /// A failure of a node's storage or an invariant, here or remote.
    #[error("internal: {0}")]
    Internal(String),
}

impl From<raftstore::Error> for Error {
    fn from(e: raftstore::Error) -> Self {
        match e {
            raftstore::Error::Mvcc(m) => Error::Mvcc(m),
            raftstore::Error::OutcomeUnknown(why) => Error::OutcomeUnknown(why),
            e @ (raftstore::Error::Engine(_)
            | raftstore::Error::Raft(_)
            | raftstore::Error::Corrupted(_)) => Error::Internal(e.to_string()),
            e => Error::Region(e),
        }
    }
}

impl Error {
    /// Whether the request certainly had no effect and trying again, after
    /// locating the region's leader afresh, may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Region(e) => e.is_retryable(),
            // A put waiting for its lease's revoke.
            Error::Mvcc(mvcc::Error::LeaseRevoking) => true,
            Error::NoRegion(_) | Error::Unreachable { .. } => true,
            Error::Pd(e) => matches!(e, PdError::NotLeader(_) | PdError::Unavailable(_)),
            Error::Mvcc(_) | Error::CrossRegion | Error::OutcomeUnknown(_) | Error::Internal(_) => {
                false
            }
        }
    }

    /// Whether the regions changed under a request that took the
    /// keyspace's pieces before: a piece now spans regions, or its region
    /// split or merged away. Taking the pieces again may succeed.
    pub(crate) fn layout_changed(&self) -> bool {
        matches!(
            self,
            Error::CrossRegion
                | Error::Region(
                    raftstore::Error::EpochNotMatch { .. } | raftstore::Error::RegionNotFound(_)
                )
        )
    }

    /// Ran out of `what` without knowing the outcome.
    pub(crate) fn timed_out(what: &str) -> Error {
        Error::OutcomeUnknown(format!("{what} timed out"))
    }
}

pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcome_unknown_is_never_retried() {
        let unknown: Error = raftstore::Error::OutcomeUnknown("snapshot".into()).into();
        assert!(matches!(unknown, Error::OutcomeUnknown(_)));
        assert!(!unknown.is_retryable());
        let stale: Error = raftstore::Error::StaleCommand("overwritten".into()).into();
        assert!(stale.is_retryable());
        let etcd: Error = raftstore::Error::Mvcc(mvcc::Error::Compacted).into();
        assert!(matches!(etcd, Error::Mvcc(mvcc::Error::Compacted)));
    }
}
