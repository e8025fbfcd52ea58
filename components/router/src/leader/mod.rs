//! The leader-side protocols of one region on this node (what TiKV keeps in
//! `storage`/`txn`): how a write is evaluated, takes its revision and
//! reaches the raft log, and how a linearizable read finds its revision.
//! The router calls into a [`RegionLeader`] only when this node's replica
//! is the region's ready leader (it has applied an entry of its own term);
//! every method checks that again where it matters.
//!
//! A write, step by step (one future, the caller's; nothing it holds is
//! lost if the caller goes away):
//! 1. latch the keys it touches ([`latches`]): single keys by hashed slot,
//!    any key range the whole region — not the owner keys of the leases it
//!    attaches keys to: attachments of different keys commute, apply
//!    refuses one whose lease is gone, and a revoke (a transaction) finds
//!    an attachment applied before its lock, so puts with one lease run
//!    side by side; then wait until no transaction over several regions
//!    holds a lock on them, owner keys included ([`txn`]);
//! 2. on the ready leader of term T, evaluate it (`mvcc::exec`) against one
//!    RocksDB snapshot, with the compaction revision read from the same
//!    snapshot;
//! 3. if it changes nothing (a read-only txn, a failed compare without
//!    writes, a delete of nothing) it is a read: answer at a linearizable
//!    revision R taken as for a read below, in the same term T;
//! 4. otherwise register as in flight ([`inflight`]) and hand the write —
//!    mutations, term T, latches and registration — to the region's
//!    [`sequencer`], which takes its revision from the oracle and proposes
//!    it; the replica refuses it unless it still leads in term T, and apply
//!    refuses it unless its entry is of term T;
//! 5. the replica answers once the entry is applied or known not to apply;
//!    the latches and the registration are released right then, even if
//!    the caller stopped waiting.
//!
//! A linearizable read takes R = the oracle's current revision *before* a
//! raft read-index barrier, then waits until no write registered here is
//! unresolved at or below R. Taking R first matters: every write
//! acknowledged before the read started has a revision <= R, and any
//! leader that could commit a write at or below R after the barrier would
//! have been elected before it, which the barrier's quorum rules out — so a
//! client that lists at R and watches from R + 1 misses nothing.
//!
//! Contract of [`RegionLeader`] (errors are classified as in
//! `crate::error`):
//! * `write(handle, req)`: the response with revisions filled in. Not
//!   applied (retryable): not the ready leader at evaluation, or the term or
//!   epoch moved before the proposal, or apply refused it; an oracle failure
//!   before the proposal. Outcome unknown: no answer within
//!   [`WRITE_TIMEOUT`] (the write keeps its latches and registration until
//!   its outcome is known), or the replica lost track of the entry. etcd
//!   request errors come from evaluation and mean nothing was written.
//! * `linearizable_revision(handle)`: (R, T) as described, T the term the
//!   barrier confirmed; each wait (oracle, barrier, in-flight writes) is
//!   bounded by [`READ_TIMEOUT`], after which it fails "outcome unknown"
//!   (etcd's "request timed out").
//! * `compact(handle, revision, epoch)`: checks `revision` against the
//!   compaction revision and a linearizable R, proposes it with `epoch`
//!   (the region as the caller located it: apply refuses it if a split
//!   moved keys away meanwhile), and returns R and the applied index once
//!   the compaction is applied here.
//! * `split(handle, req)`: a barrier for the region's writes — it takes the
//!   region's whole latch, so every write evaluated before has its outcome
//!   and none is evaluated meanwhile — then proposes the split in the
//!   current term; the region's new meta once applied here. A write
//!   evaluated against the old epoch after that fails its epoch check and
//!   is routed again. Not applied: not the ready leader, the epoch or term
//!   moved, the latch not free within [`WRITE_TIMEOUT`]; outcome unknown:
//!   no answer within [`WRITE_TIMEOUT`].
//! * the merge steps are in [`merge`].

pub mod inflight;
pub mod latches;
mod merge;
pub mod sequencer;
pub mod txn;

use std::sync::Arc;
use std::time::Duration;

use mvcc::exec::{self, ReadBounds, WriteRequest, WriteResponse};
use mvcc::{KeyRange, MvccStore};
use pd::PdClient;
use proto::metapb;
use proto::raft_cmdpb::{
    raft_cmd_request::Cmd, CompactRequest, RaftCmdRequest, RaftRequestHeader, SplitRequest,
};
use raftstore::{Applied, RegionHandle};
use tokio::sync::oneshot;

use crate::forward::ReadIndex;
use crate::locate::covers;
use crate::{Error, Result};
use inflight::Inflight;
use latches::{LatchSet, Latches};

use crate::locate::latch_spans;
use sequencer::{Job, Sequencer};

/// How long a write waits for its outcome before answering "outcome
/// unknown" (below the forwarding call's deadline, so a forwarded write
/// times out on the leader's node first and says so).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(4);
/// Bound of each wait of a read (barrier, in-flight writes).
pub const READ_TIMEOUT: Duration = Duration::from_secs(4);

/// Leader-side state of one region: latches, in-flight writes, sequencer.
pub struct RegionLeader {
    pd: Arc<dyn PdClient>,
    mvcc: MvccStore,
    latches: Latches,
    inflight: Arc<Inflight>,
    sequencer: Arc<Sequencer>,
}

impl RegionLeader {
    pub fn new(pd: Arc<dyn PdClient>, mvcc: MvccStore) -> RegionLeader {
        RegionLeader {
            pd,
            mvcc,
            latches: Latches::default(),
            inflight: Arc::default(),
            sequencer: Arc::default(),
        }
    }

    /// Serves a validated Put, DeleteRange or Txn whose keys `spans` lie in
    /// `handle`'s region (see the contract).
    pub async fn write(
        &self,
        handle: &RegionHandle,
        req: &WriteRequest,
        spans: &[KeyRange],
    ) -> Result<WriteResponse> {
        let latches = self
            .latches
            .acquire(LatchSet::of(&latch_spans(req, spans)))
            .await;
        // A transaction over several regions holding some of the keys
        // commits without latches; its lock is what keeps this write out.
        txn::wait_unlocked(handle, spans, 0).await?;
        let status = handle.status();
        if !status.ready_leader {
            return Err(not_leader(handle));
        }
        // A split may have moved the keys away while this write waited for
        // its latches (a split holds them all).
        check_spans(&status.region, spans)?;
        let term = status.term;
        let current = match req {
            // Only txns read at historical revisions during evaluation.
            WriteRequest::Txn(_) => self.current_revision().await?,
            _ => i64::MAX,
        };
        let eval = {
            let view = self.mvcc.snapshot();
            let state = handle.read_state(&view)?;
            let bounds = ReadBounds {
                current,
                compacted: state.compact_revision,
            };
            exec::evaluate(&view, req, bounds, &handle.lease_view(&view))?
        };
        let mut response = eval.response;
        if eval.mutations.is_empty() {
            // A read: its keys stay latched, so no write of them is in
            // flight; R and the barrier make the answer linearizable.
            let (read_rev, confirmed) = self.linearizable_revision(handle).await?;
            if confirmed != term {
                // Leadership was lost and regained since the evaluation.
                return Err(not_leader(handle));
            }
            exec::fill_revisions(&mut response, read_rev, read_rev);
            return Ok(response);
        }
        let (done, outcome) = oneshot::channel();
        self.sequencer.submit(
            &self.pd,
            Job {
                handle: handle.clone(),
                header: RaftRequestHeader {
                    region_id: status.region.id,
                    region_epoch: status.region.region_epoch,
                    term,
                },
                mutations: eval.mutations,
                latches,
                inflight: self.inflight.register(),
                done,
            },
        );
        let applied = match tokio::time::timeout(WRITE_TIMEOUT, outcome).await {
            Ok(Ok(res)) => res?,
            // Every path answers the job; a vanished answer is not a "no".
            Ok(Err(_)) => return Err(Error::OutcomeUnknown("write abandoned".into())),
            Err(_) => return Err(Error::timed_out("write")),
        };
        exec::fill_revisions(&mut response, applied.revision, applied.revision - 1);
        Ok(response)
    }

    /// A linearizable revision R and the term the barrier confirmed (see
    /// the contract).
    pub async fn linearizable_revision(&self, handle: &RegionHandle) -> Result<(i64, u64)> {
        let revision = self.current_revision().await?;
        let term = tokio::time::timeout(READ_TIMEOUT, handle.read_index())
            .await
            .map_err(|_| Error::timed_out("read barrier"))??;
        tokio::time::timeout(READ_TIMEOUT, self.inflight.wait_resolved(revision))
            .await
            .map_err(|_| Error::timed_out("wait for in-flight writes"))?;
        Ok((revision, term))
    }

    /// A linearizable revision R, this replica's applied index A once
    /// every write at or below R is applied here, and the region's resolved
    /// revision: R, or the lowest base revision of the transaction locks
    /// held (a locked transaction commits above its lock's base, and a
    /// lock taken after R was fixed commits above R).
    pub async fn read_index(&self, handle: &RegionHandle) -> Result<ReadIndex> {
        let (revision, _) = self.linearizable_revision(handle).await?;
        let resolved = handle
            .locks()
            .all()
            .iter()
            .map(|l| l.record.base_revision)
            .fold(revision, i64::min);
        Ok(ReadIndex {
            revision,
            applied_index: handle.status().applied_index,
            resolved,
        })
    }

    /// The oracle's current revision, waiting at most [`READ_TIMEOUT`].
    async fn current_revision(&self) -> Result<i64> {
        tokio::time::timeout(READ_TIMEOUT, self.pd.current_revision())
            .await
            .map_err(|_| Error::timed_out("the oracle's current revision"))?
            .map_err(Error::from)
    }

    /// Proposes compaction at `revision` (see the contract).
    pub async fn compact(
        &self,
        handle: &RegionHandle,
        revision: i64,
        epoch: Option<metapb::RegionEpoch>,
    ) -> Result<(i64, u64)> {
        // Apply refuses a compaction while transactions hold locks.
        txn::wait_unlocked(handle, &[everything()], 0).await?;
        let (current, term) = self.linearizable_revision(handle).await?;
        let compacted = handle.read_state(&self.mvcc.snapshot())?.compact_revision;
        if revision <= compacted {
            return Err(mvcc::Error::Compacted.into());
        }
        if revision > current {
            return Err(mvcc::Error::FutureRev.into());
        }
        // Proposed with the epoch the caller located the region by: the
        // caller compacts the keys it thinks the region holds, and a split
        // meanwhile (moving some of them to a region the caller will not
        // compact) makes apply refuse it, so the caller looks again.
        let cmd = RaftCmdRequest {
            header: Some(RaftRequestHeader {
                region_id: handle.region_id(),
                region_epoch: epoch,
                term,
            }),
            cmd: Some(Cmd::Compact(CompactRequest { revision })),
        };
        let applied: Applied = tokio::time::timeout(WRITE_TIMEOUT, handle.propose(cmd))
            .await
            .map_err(|_| Error::timed_out("compaction"))??;
        Ok((current, applied.index))
    }
}

impl RegionLeader {
    /// Splits the region as `req` says (see the contract).
    pub async fn split(&self, handle: &RegionHandle, req: SplitRequest) -> Result<metapb::Region> {
        let _latches = self.whole_latch("split").await?;
        // Apply refuses a split while transactions hold locks.
        txn::wait_unlocked(handle, &[everything()], 0).await?;
        self.propose_in_term(handle, Cmd::Split(req), "split")
            .await?;
        Ok(handle.status().region)
    }

    /// Proposes `cmd` on the ready leader, bound to its current term, and
    /// waits at most [`WRITE_TIMEOUT`] for it to apply here (`what` names
    /// it in the timeout's error).
    async fn propose_in_term(
        &self,
        handle: &RegionHandle,
        cmd: Cmd,
        what: &str,
    ) -> Result<Applied> {
        let status = handle.status();
        if !status.ready_leader {
            return Err(not_leader(handle));
        }
        let cmd = RaftCmdRequest {
            header: Some(RaftRequestHeader {
                region_id: status.region.id,
                region_epoch: status.region.region_epoch,
                term: status.term,
            }),
            cmd: Some(cmd),
        };
        tokio::time::timeout(WRITE_TIMEOUT, handle.propose(cmd))
            .await
            .map_err(|_| Error::timed_out(what))?
            .map_err(Error::from)
    }
}

/// `EpochNotMatch` unless `region` holds every key of `spans`: the caller
/// located the request by an older view of the region.
pub(crate) fn check_spans(region: &metapb::Region, spans: &[KeyRange]) -> Result<()> {
    if spans.iter().all(|s| covers(region, s)) {
        return Ok(());
    }
    Err(Error::Region(raftstore::Error::EpochNotMatch {
        region_id: region.id,
        current: region.clone(),
    }))
}

/// Every key.
fn everything() -> KeyRange {
    KeyRange {
        start: Vec::new(),
        end: Some(Vec::new()),
    }
}

fn not_leader(handle: &RegionHandle) -> Error {
    Error::Region(raftstore::Error::NotLeader {
        region_id: handle.region_id(),
        leader: None,
    })
}
