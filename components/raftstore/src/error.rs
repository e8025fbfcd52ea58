use proto::metapb;

/// Errors of region operations.
///
/// For a proposal, every error says which of two things happened:
/// * it **did not apply** and never will ([`Error::is_retryable`]): refused
///   before it reached the log (not leader, epoch or term changed, replica
///   stopped), or its log slot was committed with another entry, or apply
///   rejected it on every replica (stale epoch, term or revision). A router
///   refreshes its view of the region and retries;
/// * its **outcome is unknown** ([`Error::OutcomeUnknown`]): it reached the
///   log, and the replica can no longer tell whether it commits (the
///   replica stopped, a snapshot replaced the log past it, or a new leader
///   truncated it here while other replicas may still hold it). It may
///   apply later; it must not be retried as if it had not.
///
/// The remaining variants are failures of this node.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("region {region_id} has no leader here (leader: {leader:?})")]
    NotLeader {
        region_id: u64,
        leader: Option<metapb::Peer>,
    },
    #[error("region {0} not found on this node")]
    RegionNotFound(u64),
    #[error("region {region_id} epoch does not match (current: {current:?})")]
    EpochNotMatch {
        region_id: u64,
        current: metapb::Region,
    },
    /// A membership change that cannot apply to the region as it is (a peer
    /// that is not there, a second peer on one node, ...).
    #[error("invalid membership change: {0}")]
    InvalidConfChange(String),
    /// The command did not apply and will not (see above).
    #[error("stale command: {0}")]
    StaleCommand(String),
    /// The region is frozen for a merge: it takes no write and answers no
    /// linearizable read until the merge is decided (then its range is
    /// another region's, or it is unfrozen).
    #[error("region {0} is being merged")]
    Merging(u64),
    /// A merge step's answer: the merge is refused, for good (see
    /// `merge`).
    #[error("merge refused: {0}")]
    MergeRefused(String),
    /// The replica stopped before it took the request.
    #[error("region {0} is shutting down")]
    Stopped(u64),
    /// The replica is replacing its data by a region snapshot: it answers
    /// no read until that is done.
    #[error("region {0} is installing a snapshot")]
    Installing(u64),
    /// The command may or may not apply (see above).
    #[error("outcome unknown: {0}")]
    OutcomeUnknown(String),
    #[error("engine: {0}")]
    Engine(#[from] engine::Error),
    #[error("mvcc: {0}")]
    Mvcc(#[from] mvcc::Error),
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
    #[error("corrupted state: {0}")]
    Corrupted(String),
    #[error("snapshot file: {0}")]
    Io(#[from] std::io::Error),
}

impl Error {
    /// Whether the request certainly had no effect and retrying (after
    /// refreshing the region view) may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Error::NotLeader { .. }
                | Error::EpochNotMatch { .. }
                | Error::StaleCommand(_)
                | Error::Merging(_)
                | Error::RegionNotFound(_)
                | Error::Stopped(_)
                | Error::Installing(_)
        )
    }
}

impl From<prost::DecodeError> for Error {
    fn from(e: prost::DecodeError) -> Self {
        Error::Corrupted(e.to_string())
    }
}

pub type Result<T> = std::result::Result<T, Error>;
