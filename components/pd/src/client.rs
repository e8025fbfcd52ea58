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
    /// No region covers the key or has the id asked about (calls that can
    /// answer "none" return `Ok(None)` instead).
    #[error("region not found: {0}")]
    RegionNotFound(String),
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
            PdError::RegionNotFound(m) => (T::RegionNotFound, m.clone()),
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
            T::RegionNotFound => PdError::RegionNotFound(m),
            T::NotLeader => PdError::NotLeader(m),
            T::Unavailable => PdError::Unavailable(m),
            T::Storage => PdError::Storage(m),
            T::Exhausted if m == "id" => PdError::Exhausted("id"),
            T::Exhausted => PdError::Exhausted("revision"),
            T::Closed => PdError::Closed,
            T::Ok | T::Unknown | T::NodeNotFound | T::ClusterIdMismatch => PdError::Other(m),
        }
    }
}

/// A region with what PD learned about it from its leader's heartbeats
/// (kept in memory on the PD leader only, refreshed by every heartbeat).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RegionWithLeader {
    pub region: metapb::Region,
    /// `None` until PD heard from the region's leader.
    pub leader: Option<metapb::Peer>,
    /// The region's data in bytes, as its leader estimated it (0 until a
    /// heartbeat reported it).
    pub approximate_size: u64,
    /// The region's number of keys, likewise.
    pub approximate_keys: u64,
}

impl RegionWithLeader {
    /// A region PD knows nothing more about.
    pub fn new(region: metapb::Region) -> Self {
        RegionWithLeader {
            region,
            ..Default::default()
        }
    }

    pub fn to_proto(&self) -> pdpb::RegionWithLeader {
        pdpb::RegionWithLeader {
            region: Some(self.region.clone()),
            leader: self.leader,
            approximate_size: self.approximate_size,
            approximate_keys: self.approximate_keys,
        }
    }

    /// `None` if the message carries no region.
    pub fn from_proto(r: pdpb::RegionWithLeader) -> Option<Self> {
        Some(RegionWithLeader {
            region: r.region?,
            leader: r.leader,
            approximate_size: r.approximate_size,
            approximate_keys: r.approximate_keys,
        })
    }
}

/// What a region's leader reports about its region.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RegionHeartbeat {
    pub region: metapb::Region,
    pub leader: metapb::Peer,
    /// Peers whose log is well behind the commit index (still catching up).
    pub pending_peers: Vec<metapb::Peer>,
    /// Peers the leader has not heard from for a while.
    pub down_peers: Vec<metapb::Peer>,
    /// The region's data in bytes, as the leader estimates it.
    pub approximate_size: u64,
    /// The region's number of keys, as the leader estimates it.
    pub approximate_keys: u64,
}

/// PD's answer to one heartbeat of a batch
/// ([`PdClient::region_heartbeats`]): the step for the region, if any, or
/// why this heartbeat was rejected.
pub type HeartbeatOutcome = Result<Option<RegionOperator>>;

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
    /// Split the region at `key`, which lies strictly inside it; the new
    /// region starts at `key`. Requested by an operator
    /// ([`PdClient::split_region`]).
    Split {
        key: Vec<u8>,
    },
    /// Merge this region (the source) into `target`, its right neighbour
    /// (`source.end_key == target.start_key`) with replicas on the same
    /// nodes; `target` is PD's latest meta of it, which the node may find
    /// outdated (then it refuses, and PD decides again later). Requested by
    /// an operator ([`PdClient::merge_regions`]) or decided by the merge
    /// checker ([`crate::schedule`]).
    Merge {
        target: metapb::Region,
    },
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

    /// Reports many regions at once, as a node does for all the regions it
    /// leads whose heartbeat is due: one call, and the meta changes of the
    /// whole batch cost PD one raft proposal. Returns one outcome per
    /// heartbeat, in order, each what [`Self::region_heartbeat`] would
    /// return for it alone (`Ok(None)` for a stale one,
    /// `Err(InvalidArgument)` for a malformed one, which does not affect
    /// the others); scheduling sees the heartbeats in order, so a step
    /// handed to an earlier region counts in the loads a later one's
    /// decision sees. The regions must not repeat (a repeated region is
    /// processed as often as it appears, its operator decided on the last
    /// report's meta). An empty batch answers `Ok(vec![])` without asking
    /// PD.
    /// `Err` for the call as a whole (then nothing is known about any of
    /// them: some meta may have been recorded): `NotBootstrapped` before
    /// bootstrap, `NotLeader` / `Unavailable` / `Closed` as for any call,
    /// `Other` if a remote PD answered a different number of outcomes.
    async fn region_heartbeats(&self, hbs: Vec<RegionHeartbeat>) -> Result<Vec<HeartbeatOutcome>>;

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

    /// Asks PD to split the region containing `key` at `key`: PD hands
    /// [`RegionOperator::Split`] to the region's leader with a later
    /// heartbeat response (replica placement steps go first), until the
    /// region no longer has `key` strictly inside it or the request is
    /// [`crate::schedule::ScheduleConfig::split_timeout`] old. The request
    /// lives in memory on the PD leader (lost when leadership moves); a
    /// second request for the same region replaces the first. Returns the
    /// region containing `key`.
    /// `Err(InvalidArgument)` for an empty key or one that starts its
    /// region (nothing to split), `Err(RegionNotFound)` when no region
    /// covers it, `Err(NotBootstrapped)` before bootstrap.
    async fn split_region(&self, key: &[u8]) -> Result<RegionWithLeader>;

    /// Asks PD to merge two adjacent regions: the left one (the source)
    /// into its right neighbour (the target). The ids may come in either
    /// order: when `target_id` names the LEFT neighbour of `source_id`
    /// (`target.end_key == source.start_key`) the two are swapped, so the
    /// answer is always `(source, target)` with `source.end_key ==
    /// target.start_key`. PD hands [`RegionOperator::Merge`] (with its
    /// latest meta of the target) to the source region's leader with later
    /// heartbeat responses (replica placement steps go first), until the
    /// source region is gone from PD's map or its range changed, the target
    /// is no longer its right neighbour, or the request is
    /// [`crate::schedule::ScheduleConfig::merge_timeout`] old. The request
    /// lives in memory on the PD leader (lost when leadership moves); a
    /// second request for the same source replaces the first.
    /// `Err(RegionNotFound)` for an unknown id, `Err(InvalidArgument)` for
    /// the same id twice, regions that are not adjacent, or regions whose
    /// replicas are not on the same set of nodes (roles are not checked
    /// here: the source's leader refuses while a learner is present),
    /// `Err(NotBootstrapped)` before bootstrap.
    async fn merge_regions(
        &self,
        source_id: u64,
        target_id: u64,
    ) -> Result<(RegionWithLeader, RegionWithLeader)>;

    /// Records `revision` as the cluster's compaction revision (etcd's
    /// Compact, before the router applies it to every region): durable and
    /// replicated once `Recorded` is answered, and only ever raised, also
    /// across PD restarts and leader changes. A revision at or below the
    /// recorded one answers `Compacted`, one above the oracle's current
    /// revision `Future`; neither changes anything. Both checks and the
    /// record are made on the serving leader, one compaction at a time; a
    /// retry of a call whose answer was lost answers `Compacted`. Works
    /// before bootstrap.
    async fn compact(&self, revision: i64) -> Result<CompactOutcome>;

    /// The cluster's compaction revision (0 before the first compaction),
    /// as a linearizable read: at least every revision a `compact` that
    /// answered `Recorded` before this call started recorded. Regions
    /// compare theirs with it to catch up.
    async fn compaction_revision(&self) -> Result<i64>;

    /// etcd's `Maintenance.Alarm` over the cluster's alarm list, kept in
    /// PD's replicated state: `Get` lists the active alarms of type
    /// `alarm` (every one for `None`; `member_id` is ignored), `Activate`
    /// records (`member_id`, `alarm`) and answers it (`None` does
    /// nothing), `Deactivate` removes it and answers it, or nothing if it
    /// was not active. A change is durable once answered.
    async fn alarm(
        &self,
        action: pdpb::alarm_request::AlarmAction,
        member_id: u64,
        alarm: pdpb::AlarmType,
    ) -> Result<Vec<pdpb::AlarmMember>>;
}

/// What [`PdClient::compact`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompactOutcome {
    pub status: CompactStatus,
    /// The cluster's compaction revision after the call.
    pub compaction_revision: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompactStatus {
    /// The revision asked for is now the cluster's compaction revision.
    Recorded,
    /// It is at or below the cluster's compaction revision: nothing changed
    /// (etcd's "required revision has been compacted").
    Compacted,
    /// It is above the oracle's current revision: nothing changed (etcd's
    /// "required revision is a future revision").
    Future,
}

impl CompactOutcome {
    pub fn to_proto(self, header: Option<pdpb::ResponseHeader>) -> pdpb::CompactResponse {
        let status = match self.status {
            CompactStatus::Recorded => pdpb::CompactStatus::Recorded,
            CompactStatus::Compacted => pdpb::CompactStatus::Compacted,
            CompactStatus::Future => pdpb::CompactStatus::Future,
        };
        pdpb::CompactResponse {
            header,
            status: status as i32,
            compaction_revision: self.compaction_revision,
        }
    }

    /// `None` for a status this version does not know.
    pub fn from_proto(resp: &pdpb::CompactResponse) -> Option<CompactOutcome> {
        let status = match pdpb::CompactStatus::try_from(resp.status).ok()? {
            pdpb::CompactStatus::Recorded => CompactStatus::Recorded,
            pdpb::CompactStatus::Compacted => CompactStatus::Compacted,
            pdpb::CompactStatus::Future => CompactStatus::Future,
        };
        Some(CompactOutcome {
            status,
            compaction_revision: resp.compaction_revision,
        })
    }
}

/// An operator's wire fields, shared by heartbeat responses and
/// GetOperators' `Operator`: at most one is set.
#[derive(Debug, Default)]
pub(crate) struct OperatorFields {
    pub change_peer: Option<pdpb::ChangePeer>,
    pub transfer_leader: Option<pdpb::TransferLeader>,
    pub split_region: Option<pdpb::SplitRegion>,
    pub merge_region: Option<pdpb::MergeRegion>,
}

impl OperatorFields {
    pub fn from_operator(op: &RegionOperator) -> Self {
        use pdpb::ChangePeerType as T;
        let change = |t: T, peer: &metapb::Peer| OperatorFields {
            change_peer: Some(pdpb::ChangePeer {
                change_type: t as i32,
                peer: Some(*peer),
            }),
            ..Default::default()
        };
        match op {
            RegionOperator::AddLearner(p) => change(T::AddLearner, p),
            RegionOperator::PromoteLearner(p) => change(T::PromoteLearner, p),
            RegionOperator::RemovePeer(p) => change(T::RemovePeer, p),
            RegionOperator::TransferLeader(p) => OperatorFields {
                transfer_leader: Some(pdpb::TransferLeader { peer: Some(*p) }),
                ..Default::default()
            },
            RegionOperator::Split { key } => OperatorFields {
                split_region: Some(pdpb::SplitRegion {
                    split_key: key.clone(),
                }),
                ..Default::default()
            },
            RegionOperator::Merge { target } => OperatorFields {
                merge_region: Some(pdpb::MergeRegion {
                    target: Some(target.clone()),
                }),
                ..Default::default()
            },
        }
    }

    /// `None` if no field is set or the one set is not understood (sent by
    /// a newer PD), which is safe to skip.
    pub fn into_operator(self) -> Option<RegionOperator> {
        use pdpb::ChangePeerType as T;
        if let Some(t) = self.transfer_leader {
            return t.peer.map(RegionOperator::TransferLeader);
        }
        if let Some(c) = self.change_peer {
            let peer = c.peer?;
            return match T::try_from(c.change_type).ok()? {
                T::AddLearner => Some(RegionOperator::AddLearner(peer)),
                T::PromoteLearner => Some(RegionOperator::PromoteLearner(peer)),
                T::RemovePeer => Some(RegionOperator::RemovePeer(peer)),
            };
        }
        if let Some(m) = self.merge_region {
            return m.target.map(|target| RegionOperator::Merge { target });
        }
        let key = self.split_region?.split_key;
        // An empty key cannot lie strictly inside a region.
        (!key.is_empty()).then_some(RegionOperator::Split { key })
    }
}

/// Fills the operator fields of a heartbeat response.
pub(crate) fn operator_to_proto(op: &RegionOperator, resp: &mut pdpb::RegionHeartbeatResponse) {
    let f = OperatorFields::from_operator(op);
    resp.change_peer = f.change_peer;
    resp.transfer_leader = f.transfer_leader;
    resp.split_region = f.split_region;
    resp.merge_region = f.merge_region;
}

/// The operator of a heartbeat response; `None` if it has none or one this
/// client does not understand (a newer PD), which is safe to skip.
pub(crate) fn operator_from_proto(resp: &pdpb::RegionHeartbeatResponse) -> Option<RegionOperator> {
    OperatorFields {
        change_peer: resp.change_peer,
        transfer_leader: resp.transfer_leader,
        split_region: resp.split_region.clone(),
        merge_region: resp.merge_region.clone(),
    }
    .into_operator()
}
