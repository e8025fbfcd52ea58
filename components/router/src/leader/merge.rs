//! A region leader's side of region merge (the protocol is in raftstore's
//! `merge` module; the source's leader drives it from `crate::merge`).
//!
//! Contract of [`RegionLeader`]'s merge methods (errors classified as in
//! `crate::error`):
//! * `prepare_merge(handle, target)`, on the source's ready leader: a
//!   barrier for the region's writes (its whole latch, as a split takes),
//!   waits for transaction locks to go, then proposes the prepare in the
//!   current term; the frozen region once applied here. Not applied: not
//!   the ready leader, merging already, locks or writes not gone within
//!   [`WRITE_TIMEOUT`]; outcome unknown: no answer within it.
//! * `merge_step(handle, cmd)`, on the leader of the region owning the
//!   source's end key, for a commit or a reject: proposes it in the current
//!   term (a commit behind the region's whole latch, as it changes the
//!   region's range and epoch) and answers the decision now recorded:
//!   committed or refused. Any error means nothing is known of it.
//! * `rollback_merge(handle, req)`, on the source's ready leader, only
//!   once the merge was refused: unfreezes the region.

use proto::forwardpb::MergeDecision;
use proto::metapb;
use proto::raft_cmdpb::{raft_cmd_request::Cmd, PrepareMergeRequest, RollbackMergeRequest};
use raftstore::RegionHandle;

use super::latches::LatchSet;
use super::{everything, txn::wait_unlocked, RegionLeader, WRITE_TIMEOUT};
use crate::{Error, Result};

impl RegionLeader {
    /// Freezes the region for a merge into `target` (see the contract).
    pub async fn prepare_merge(
        &self,
        handle: &RegionHandle,
        target: metapb::Region,
    ) -> Result<metapb::Region> {
        let _latches = self.whole_latch("merge").await?;
        // Apply refuses a prepare while transactions hold locks.
        wait_unlocked(handle, &[everything()], 0).await?;
        let req = PrepareMergeRequest {
            target: Some(target),
        };
        self.propose_in_term(handle, Cmd::PrepareMerge(req), "merge prepare")
            .await?;
        Ok(handle.status().region)
    }

    /// Unfreezes the region after its merge was refused.
    pub async fn rollback_merge(
        &self,
        handle: &RegionHandle,
        req: RollbackMergeRequest,
    ) -> Result<()> {
        self.propose_in_term(handle, Cmd::RollbackMerge(req), "merge rollback")
            .await
            .map(|_| ())
    }

    /// Runs a merge commit or reject here (see the contract).
    pub async fn merge_step(&self, handle: &RegionHandle, cmd: Cmd) -> Result<MergeDecision> {
        let _latches = match cmd {
            Cmd::CommitMerge(_) => Some(self.whole_latch("merge").await?),
            _ => None,
        };
        match self.propose_in_term(handle, cmd, "merge step").await {
            Ok(_) => Ok(MergeDecision { committed: true }),
            Err(Error::Region(raftstore::Error::MergeRefused(_))) => {
                Ok(MergeDecision { committed: false })
            }
            Err(e) => Err(e),
        }
    }

    /// The region's whole latch: every write evaluated before has its
    /// outcome, and none is evaluated until it is dropped.
    pub(super) async fn whole_latch(&self, what: &str) -> Result<super::latches::LatchGuard> {
        tokio::time::timeout(WRITE_TIMEOUT, self.latches.acquire(LatchSet::Everything))
            .await
            .map_err(|_| {
                Error::Region(raftstore::Error::StaleCommand(format!(
                    "{what}: the region's writes did not finish in time"
                )))
            })
    }
}
