//! The contract between nodes and PD. Nodes depend on [`PdClient`] only, so
//! an embedded PD ([`crate::LocalPdClient`]) and a remote one
//! ([`crate::RpcPdClient`]) are interchangeable.

use proto::{metapb, pdpb};

/// Errors of PD operations. `Clone` because one batched RPC answers many
/// callers with the same outcome.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PdError {
    #[error("cluster is not bootstrapped")]
    NotBootstrapped,
    #[error("cluster is already bootstrapped")]
    AlreadyBootstrapped,
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("cluster id mismatch: expected {expected}, PD has {actual}")]
    ClusterIdMismatch { expected: u64, actual: u64 },
    /// The PD storage failed; the operation may or may not have taken effect.
    #[error("PD storage error: {0}")]
    Storage(String),
    /// The id or revision space is used up (practically unreachable, but it
    /// must not wrap around).
    #[error("{0} space exhausted")]
    Exhausted(&'static str),
    /// This PD instance was closed; no further values are handed out by it.
    #[error("PD is closed")]
    Closed,
    /// This PD member is not the leader (or its lease lapsed); the message
    /// names the leader when known. [`crate::RpcPdClient`] follows the
    /// leader by itself and returns this only once its deadline passed.
    #[error("PD not leader: {0}")]
    NotLeader(String),
    /// No PD endpoint could be reached, or the connection broke mid-call.
    #[error("PD unavailable: {0}")]
    Unavailable(String),
    /// Any other error reported by a remote PD or by the RPC layer.
    #[error("PD error: {0}")]
    Other(String),
}

pub type Result<T> = std::result::Result<T, PdError>;

/// A fresh cluster's current revision; etcd starts at 1 as well.
pub const INITIAL_REVISION: i64 = 1;

impl PdError {
    /// The wire form, for PD's own responses and for nodes passing a PD
    /// failure on to the node that forwarded a request to them.
    pub fn to_proto(&self) -> pdpb::Error {
        use pdpb::ErrorType as T;
        let (t, message) = match self {
            PdError::NotBootstrapped => (T::NotBootstrapped, String::new()),
            PdError::AlreadyBootstrapped => (T::AlreadyBootstrapped, String::new()),
            PdError::InvalidArgument(m) => (T::InvalidArgument, m.clone()),
            e @ PdError::ClusterIdMismatch { .. } => (T::ClusterIdMismatch, e.to_string()),
            PdError::Storage(m) => (T::Storage, m.clone()),
            PdError::Exhausted(what) => (T::Exhausted, (*what).to_owned()),
            PdError::Closed => (T::Closed, String::new()),
            PdError::NotLeader(m) => (T::NotLeader, m.clone()),
            PdError::Unavailable(m) => (T::Unavailable, m.clone()),
            PdError::Other(m) => (T::Unknown, m.clone()),
        };
        pdpb::Error {
            r#type: t as i32,
            message,
        }
    }

    /// The error `e` stands for. A cluster id mismatch comes back as
    /// [`PdError::Other`] with its text (the ids are only in the message);
    /// callers that know the ids build it themselves.
    pub fn from_proto(e: &pdpb::Error) -> PdError {
        use pdpb::ErrorType as T;
        let m = e.message.clone();
        match T::try_from(e.r#type).unwrap_or(T::Unknown) {
            T::NotBootstrapped => PdError::NotBootstrapped,
            T::AlreadyBootstrapped => PdError::AlreadyBootstrapped,
            T::InvalidArgument => PdError::InvalidArgument(m),
            T::NotLeader => PdError::NotLeader(m),
            T::Unavailable => PdError::Unavailable(m),
            T::Storage => PdError::Storage(m),
            T::Exhausted if m == "id" => PdError::Exhausted("id"),
            T::Exhausted => PdError::Exhausted("revision"),
            T::Closed => PdError::Closed,
            T::Ok | T::Unknown | T::RegionNotFound | T::NodeNotFound | T::ClusterIdMismatch => {
                PdError::Other(m)
            }
        }
    }
}

/// A region and its leader, if PD knows it.
pub type RegionWithLeader = (metapb::Region, Option<metapb::Peer>);

/// What a region's leader reports about its region.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RegionHeartbeat {
    pub region: metapb::Region,
    pub leader: metapb::Peer,
    /// Peers whose log is well behind the commit index (still catching up).
    pub pending_peers: Vec<metapb::Peer>,
    /// Peers the leader has not heard from for a while.
    pub down_peers: Vec<metapb::Peer>,
}

/// The next membership or leadership step PD wants a region's leader to
/// take. It was decided against the epoch of the heartbeat that returned it;
/// the leader drops it if its region has changed since.
#[derive(Debug, Clone, PartialEq)]
pub enum RegionOperator {
    /// Add a replica on `peer.node_id` as a learner (it catches up by
    /// snapshot without counting for quorum).
    AddLearner(metapb::Peer),
    /// Make a caught-up learner a voter.
    PromoteLearner(metapb::Peer),
    RemovePeer(metapb::Peer),
    TransferLeader(metapb::Peer),
}

#[async_trait::async_trait]
pub trait PdClient: Send + Sync {
    /// The cluster id. It is fixed when the PD cluster is created (derived
    /// from the initial member list, or drawn at random for a single
    /// member) and never changes afterwards, so it is known even before
    /// bootstrap.
    async fn cluster_id(&self) -> Result<u64>;

    async fn is_bootstrapped(&self) -> Result<bool>;

    /// Creates the cluster with its first node and first region.
    /// The region must cover the whole keyspace (empty start and end key) and
    /// the ids must be non-zero; otherwise `Err(InvalidArgument)`.
    /// `Err(AlreadyBootstrapped)` if done before, even with identical
    /// arguments: a caller that lost the reply of its own successful bootstrap
    /// sees this error on retry and should read the state back instead.
    async fn bootstrap(&self, node: metapb::Node, region: metapb::Region) -> Result<()>;

    /// A unique id, > 0, never reused, also across PD restarts and crashes.
    /// Works before bootstrap (the bootstrap ids come from here). Ids are
    /// increasing but not consecutive: a restart skips the unused window.
    async fn alloc_id(&self) -> Result<u64>;

    /// Adds or replaces a node. `Err(NotBootstrapped)` before bootstrap,
    /// `Err(InvalidArgument)` for id 0 or for reviving a tombstoned node.
    async fn put_node(&self, node: metapb::Node) -> Result<()>;

    /// `Ok(None)` for an unknown id. `Err(NotBootstrapped)` before bootstrap.
    async fn get_node(&self, id: u64) -> Result<Option<metapb::Node>>;

    /// All nodes, tombstones included, ordered by id.
    /// `Err(NotBootstrapped)` before bootstrap.
    async fn get_all_nodes(&self) -> Result<Vec<metapb::Node>>;

    /// The region containing `key` (start <= key < end, empty end = +inf) and
    /// its leader if known. `Ok(None)` when no region covers the key, which
    /// happens briefly after a split while PD has heard from only one side.
    /// `Err(NotBootstrapped)` before bootstrap.
    async fn get_region(&self, key: &[u8]) -> Result<Option<RegionWithLeader>>;

    /// `Ok(None)` for an unknown id (also for a region merged away).
    /// `Err(NotBootstrapped)` before bootstrap.
    async fn get_region_by_id(&self, id: u64) -> Result<Option<RegionWithLeader>>;

    /// Every region overlapping `[start, end)` in key order (the first one may
    /// start before `start`); `end` empty = +inf; `limit` 0 = no limit.
    /// Holes in the keyspace are skipped silently. `Err(NotBootstrapped)`
    /// before bootstrap.
    async fn scan_regions(
        &self,
        start: &[u8],
        end: &[u8],
        limit: usize,
    ) -> Result<Vec<RegionWithLeader>>;

    /// Reports the region's current meta and leader, and returns the next
    /// step the scheduler wants taken (replica placement, see
    /// [`crate::schedule`]), if any. A heartbeat with an older epoch than PD
    /// knows (for this region, or for a region it overlaps) is ignored and
    /// returns `Ok(None)`. Overlapped regions with an older version are
    /// dropped (the split/merge made them obsolete).
    /// `Err(InvalidArgument)` for id 0, a missing epoch, an empty range, or a
    /// leader that is not one of the region's peers.
    /// `Err(NotBootstrapped)` before bootstrap.
    async fn region_heartbeat(&self, hb: RegionHeartbeat) -> Result<Option<RegionOperator>>;

    /// Revision oracle: hands out `count` (>=1, else `Err(InvalidArgument)`)
    /// consecutive revisions and returns the first. Every value is greater
    /// than every revision handed out before, also across PD restarts and
    /// crashes. A fresh cluster's current revision is 1, so the first
    /// allocation returns 2. Works before bootstrap.
    async fn alloc_revisions(&self, count: u32) -> Result<i64>;

    /// The highest revision handed out so far (1 on a fresh cluster). Never
    /// decreases, also across restarts. Linearizable: the value is at least
    /// every revision handed out before this call started.
    async fn current_revision(&self) -> Result<i64>;
}

/// Fills the operator fields of a heartbeat response.
pub(crate) fn operator_to_proto(op: &RegionOperator, resp: &mut pdpb::RegionHeartbeatResponse) {
    use pdpb::ChangePeerType as T;
    let change = |t: T, peer: &metapb::Peer| {
        Some(pdpb::ChangePeer {
            change_type: t as i32,
            peer: Some(*peer),
        })
    };
    match op {
        RegionOperator::AddLearner(p) => resp.change_peer = change(T::AddLearner, p),
        RegionOperator::PromoteLearner(p) => resp.change_peer = change(T::PromoteLearner, p),
        RegionOperator::RemovePeer(p) => resp.change_peer = change(T::RemovePeer, p),
        RegionOperator::TransferLeader(p) => {
            resp.transfer_leader = Some(pdpb::TransferLeader { peer: Some(*p) })
        }
    }
}

/// The operator of a heartbeat response; `None` if it has none or one this
/// client does not understand (a newer PD), which is safe to skip.
pub(crate) fn operator_from_proto(resp: &pdpb::RegionHeartbeatResponse) -> Option<RegionOperator> {
    use pdpb::ChangePeerType as T;
    if let Some(t) = &resp.transfer_leader {
        return t.peer.map(RegionOperator::TransferLeader);
    }
    let c = resp.change_peer.as_ref()?;
    let peer = c.peer?;
    match T::try_from(c.change_type).ok()? {
        T::AddLearner => Some(RegionOperator::AddLearner(peer)),
        T::PromoteLearner => Some(RegionOperator::PromoteLearner(peer)),
        T::RemovePeer => Some(RegionOperator::RemovePeer(peer)),
    }
}
