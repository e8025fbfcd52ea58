//! Region merge, driven by the source region's leader (the commands and
//! what they do to regions are raftstore's `merge` module).
//!
//! Contract:
//! * [`Router::merge_region`]`(source, target)`, on the source's ready
//!   leader (PD hands it the step): freezes the source with a prepare (see
//!   `RegionLeader::prepare_merge`) and returns; the rest happens in the
//!   background, in the merge driver's rounds.
//! * The driver ([`Router::start_merge_driver`]) runs every
//!   [`DRIVE_INTERVAL`] over the frozen regions this node leads (a new
//!   leader of a frozen region picks its merge up: the merge state is raft
//!   state). For each:
//!   - once every replica of the source has the prepare in its log (the
//!     leader's matched indexes; a replica without it could not apply the
//!     merge on its node), it asks the region owning the source's end key
//!     to **commit** the merge;
//!   - if that has not happened within [`MERGE_DEADLINE`] of the driver
//!     first seeing the merge (a replica is down or far behind, the target
//!     is unreachable), it asks that region to **reject** it;
//!   - a step's answer is the decision recorded in that region's log:
//!     committed (nothing more to do: the source's replicas stop as their
//!     nodes apply the commit), or refused, and only then is the source
//!     **rolled back** (unfrozen). An error answers nothing; the next round
//!     asks again.
//!
//! Why this is safe is in raftstore's `merge` module: the decision is one
//! record, written once, in one region's log.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mvcc::KeyRange;
use proto::forwardpb::{txn_step_request::Step, txn_step_response, MergeDecision};
use proto::metapb;
use proto::raft_cmdpb::{CommitMergeRequest, RejectMergeRequest, RollbackMergeRequest};
use proto::raft_serverpb::MergeState;
use raftstore::RegionHandle;
use tracing::{debug, info, warn};

use crate::{Error, Result, Router};

/// How often the merge driver looks at the frozen regions led here.
pub const DRIVE_INTERVAL: Duration = Duration::from_millis(200);
/// How long a merge may take before the driver settles it by a reject.
pub const MERGE_DEADLINE: Duration = Duration::from_secs(10);
/// The longest one round of the driver may take.
const DRIVE_ROUND: Duration = Duration::from_secs(5);

/// What the merge driver here has seen: when it first saw each merge, by
/// (source, prepare index), and how many it saw decided.
#[derive(Default)]
pub(crate) struct MergeDriverState {
    /// When first seen, and whether counted as committed.
    seen: parking_lot::Mutex<HashMap<(u64, u64), (Instant, bool)>>,
    committed: AtomicU64,
    rolled_back: AtomicU64,
}

/// How the merges this node's driver settled ended (since start).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MergeCounts {
    pub committed: u64,
    pub rolled_back: u64,
}

impl Router {
    /// Freezes `source_id` for a merge into `target` (see the contract).
    pub async fn merge_region(&self, source_id: u64, target: metapb::Region) -> Result<()> {
        let handle = self
            .store
            .region(source_id)
            .ok_or(Error::Region(raftstore::Error::RegionNotFound(source_id)))?;
        let leader = self.region_leader(source_id);
        let frozen = leader.prepare_merge(&handle, target.clone()).await?;
        info!(
            source_id,
            target_id = target.id,
            version = frozen.region_epoch.unwrap_or_default().version,
            "merge prepared"
        );
        Ok(())
    }

    /// Starts the merge driver (see the contract); it ends when the router
    /// is dropped.
    pub fn start_merge_driver(self: &Arc<Router>) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(DRIVE_INTERVAL).await;
                let Some(router) = weak.upgrade() else {
                    return;
                };
                let _ = tokio::time::timeout(DRIVE_ROUND, router.drive_round()).await;
            }
        })
    }

    async fn drive_round(&self) {
        let mut live = Vec::new();
        for handle in self.store.regions() {
            let status = handle.status();
            let Some(merging) = status.merging.clone() else {
                continue;
            };
            if !status.ready_leader {
                continue;
            }
            live.push((handle.region_id(), merging.prepare_index));
            if let Err(e) = self.drive(&handle, &merging).await {
                debug!(region_id = handle.region_id(), "merge step failed: {e}");
            }
        }
        self.merges.seen.lock().retain(|key, _| live.contains(key));
    }

    /// How the merges this node's driver settled ended.
    pub fn merge_counts(&self) -> MergeCounts {
        MergeCounts {
            committed: self.merges.committed.load(Ordering::Relaxed),
            rolled_back: self.merges.rolled_back.load(Ordering::Relaxed),
        }
    }

    /// One step of the merge of `handle`'s region (see the contract).
    async fn drive(&self, handle: &RegionHandle, merging: &MergeState) -> Result<()> {
        let status = handle.status();
        let source = status.region.clone();
        let key = (source.id, merging.prepare_index);
        let seen = self
            .merges
            .seen
            .lock()
            .entry(key)
            .or_insert_with(|| (Instant::now(), false))
            .0;
        let decision = if status.min_matched >= merging.prepare_index {
            let req = CommitMergeRequest {
                source: Some(source.clone()),
                prepare_index: merging.prepare_index,
                prepare_term: merging.prepare_term,
            };
            self.merge_step(&source, Step::CommitMerge(req)).await?
        } else if seen.elapsed() >= MERGE_DEADLINE {
            warn!(
                source_id = source.id,
                min_matched = status.min_matched,
                prepare_index = merging.prepare_index,
                "merge not done in time (a replica lacks the prepare); rejecting it"
            );
            let req = RejectMergeRequest {
                source_id: source.id,
                prepare_index: merging.prepare_index,
                source_end_key: source.end_key.clone(),
            };
            self.merge_step(&source, Step::RejectMerge(req)).await?
        } else {
            return Ok(());
        };
        if decision.committed {
            // Asked again each round until the source's replica here
            // stops (when this node applies the commit): counted once.
            if let Some((_, counted)) = self.merges.seen.lock().get_mut(&key) {
                if !*counted {
                    *counted = true;
                    self.merges.committed.fetch_add(1, Ordering::Relaxed);
                }
            }
            debug!(source_id = source.id, "merge committed");
            return Ok(());
        }
        info!(
            source_id = source.id,
            "merge refused; rolling the source back"
        );
        let leader = self.region_leader(source.id);
        let req = RollbackMergeRequest {
            prepare_index: merging.prepare_index,
        };
        leader.rollback_merge(handle, req).await?;
        self.merges.rolled_back.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Runs a merge step on the leader of the region owning `source`'s end
    /// key.
    async fn merge_step(&self, source: &metapb::Region, step: Step) -> Result<MergeDecision> {
        let span = KeyRange {
            start: source.end_key.clone(),
            end: None,
        };
        match self.step(&[span], step).await? {
            Some(txn_step_response::Result::Merge(d)) => Ok(d),
            other => Err(Error::Internal(format!("merge step answered {other:?}"))),
        }
    }
}
