//! Forwarding requests to the node holding a region's leader.
//!
//! [`Forward`] is the seam between the router and the network: the node
//! uses [`GrpcForwarder`] (the `forwardpb.RegionForward` service on the
//! other node's peer URL, served by `server::forward`), tests use
//! [`LocalNetwork`], which calls the other in-process router directly and
//! can drop requests or replies between chosen nodes.
//!
//! Contract of every [`Forward`] method: the receiving node runs the
//! request only if its replica of `target.region_id` is the ready leader
//! (`Router::serve_forwarded_*`) and never forwards it again, so stale
//! leader hints cannot make a request loop. Errors keep their class
//! (`crate::error`): region errors from the receiver (retryable),
//! [`crate::Error::Unreachable`] when the request certainly did not reach
//! the receiver (retryable), [`crate::Error::OutcomeUnknown`] when a write
//! or compaction may have run but no answer came back (never retried),
//! etcd request errors as the receiver found them. Reads whose call failed
//! are reported `Unreachable`: running a read twice is harmless.

mod grpc;
mod local;
pub mod wire;

use mvcc::exec::{WriteRequest, WriteResponse};
use mvcc::KeyRange;
use proto::etcdserverpb::{RangeRequest, RangeResponse};
use proto::forwardpb::{txn_step_request::Step, txn_step_response};
use proto::{forwardpb, metapb};

use crate::lease::{LeaseAnswer, LeaseOp};
use crate::Result;

pub use grpc::GrpcForwarder;
pub use local::{Delivery, LocalNetwork};

/// Where a forwarded request goes: the node believed to hold the leader of
/// the region, and the region as the sender located it.
#[derive(Clone, Debug)]
pub struct Target {
    pub node_id: u64,
    pub region_id: u64,
    pub epoch: Option<metapb::RegionEpoch>,
}

impl Target {
    pub fn header(&self) -> forwardpb::RequestHeader {
        forwardpb::RequestHeader {
            region_id: self.region_id,
            region_epoch: self.epoch,
        }
    }
}

/// A region leader's answer to a read index (see
/// `RegionLeader::read_index`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadIndex {
    /// A linearizable revision R.
    pub revision: i64,
    /// The leader's applied index, covering every write at or below R.
    pub applied_index: u64,
    /// No write at or below it can appear in the region after
    /// `applied_index`: R, or less while transaction locks are held.
    pub resolved: i64,
}

/// A region leader's changes of a key range (see
/// [`Forward::watch_events`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RegionChanges {
    /// (sub-revision, event), in (revision, sub) order.
    pub changes: Vec<(u32, proto::mvccpb::Event)>,
    /// Every change up to this revision is in `changes`.
    pub resolved: i64,
    /// Non-zero: the region is compacted above the revision asked from.
    pub compact_revision: i64,
}

/// A region leader's HashKV of a key range (see `Router::hash_kv`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionHash {
    /// The hash of the range's stream and its length (combinable).
    pub hash: mvcc::RangeHash,
    /// The region's compaction revision, which the hash is taken at.
    pub compact_revision: i64,
    /// The revision hashed.
    pub revision: i64,
}

/// Sends requests to the node of a region's leader (see the contract).
#[async_trait::async_trait]
pub trait Forward: Send + Sync {
    /// Runs a Put, DeleteRange or Txn on the leader's node.
    async fn write(&self, target: &Target, req: &WriteRequest) -> Result<WriteResponse>;

    /// Runs a Range on the leader's node (for a node without a replica).
    async fn range(&self, target: &Target, req: &RangeRequest) -> Result<RangeResponse>;

    /// Compacts on the leader's node; returns the leader's linearizable
    /// revision and its applied index once the compaction was applied
    /// there (and, with `physical`, cleaned up).
    async fn compact(&self, target: &Target, revision: i64, physical: bool) -> Result<(i64, u64)>;

    /// The leader's linearizable revision R, an applied index covering
    /// every write at or below R, and the region's resolved revision.
    async fn read_index(&self, target: &Target) -> Result<ReadIndex>;

    /// Runs one step of a transaction over several regions on the
    /// leader's node (`RegionLeader::txn_step`).
    async fn txn_step(
        &self,
        target: &Target,
        step: Step,
    ) -> Result<Option<txn_step_response::Result>>;

    /// The leader's hash of the keys of `span` (which must lie in the
    /// region) at `revision` (0: its linearizable revision).
    async fn hash(&self, target: &Target, span: &KeyRange, revision: i64) -> Result<RegionHash>;

    /// The leader's changes of the keys of `span` (which must lie in the
    /// region) from revision `from` up to its resolved revision
    /// (`Router::serve_forwarded_watch_events`).
    async fn watch_events(
        &self,
        target: &Target,
        span: &KeyRange,
        from: i64,
        prev_kv: bool,
    ) -> Result<RegionChanges>;

    /// Runs a lease operation on the leader's node
    /// (`Router::serve_forwarded_lease`).
    async fn lease(&self, target: &Target, op: LeaseOp) -> Result<LeaseAnswer>;
}

/// `span`'s bounds as a key range hash takes them: `[lower, upper)`, an
/// empty `upper` unbounded.
pub fn span_bounds(span: &KeyRange) -> (Vec<u8>, Vec<u8>) {
    match &span.end {
        Some(end) => (span.start.clone(), end.clone()),
        None => {
            let mut next = span.start.clone();
            next.push(0);
            (span.start.clone(), next)
        }
    }
}
