use proto::metapb;

/// Errors of region operations. The region errors (not leader, epoch not
/// match, key not in region, stale command) tell a router to refresh its view
/// and retry; the others are failures of this node.
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
    #[error("stale command: {0}")]
    StaleCommand(String),
    #[error("region {0} is shutting down")]
    Stopped(u64),
    #[error("engine: {0}")]
    Engine(#[from] engine::Error),
    #[error("mvcc: {0}")]
    Mvcc(#[from] mvcc::Error),
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
    #[error("corrupted state: {0}")]
    Corrupted(String),
}

impl Error {
    /// Whether retrying (after refreshing the region view) may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Error::NotLeader { .. }
                | Error::EpochNotMatch { .. }
                | Error::StaleCommand(_)
                | Error::RegionNotFound(_)
        )
    }
}

impl From<prost::DecodeError> for Error {
    fn from(e: prost::DecodeError) -> Self {
        Error::Corrupted(e.to_string())
    }
}

pub type Result<T> = std::result::Result<T, Error>;
