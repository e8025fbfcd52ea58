//! The cluster's compaction revision (etcd's Compact across regions).
//!
//! `compact(R)` records R in the replicated state (`Cmd::CompactionRevision`,
//! applied as a raise: a late or repeated entry never lowers it) after
//! checking it the way etcd does, compacted first, then future:
//! * R at or below the recorded revision: `Compacted`, nothing proposed;
//! * R above the oracle's current revision (a linearizable read on this
//!   serving leader): `Future`, nothing proposed;
//! * otherwise the entry is proposed; `Recorded` if applying it raised the
//!   revision, `Compacted` if a concurrent call recorded a higher one first
//!   (as if that one came first). No lock is needed: apply orders them.
//!
//! The revision survives restarts and leader changes as the rest of the
//! state machine does (stored with it, in raft snapshots too).

use proto::pd_raftpb::command::Cmd;

use crate::client::{CompactOutcome, CompactStatus, Result};
use crate::pd_core::PdCore;

impl PdCore {
    /// See [`crate::PdClient::compact`] and the module docs.
    pub async fn compact(&self, revision: i64) -> Result<CompactOutcome> {
        self.check_open()?;
        let recorded = self.compaction_revision().await?;
        let outcome = |status, compaction_revision| CompactOutcome {
            status,
            compaction_revision,
        };
        if revision <= recorded {
            return Ok(outcome(CompactStatus::Compacted, recorded));
        }
        if revision > self.current_revision().await? {
            return Ok(outcome(CompactStatus::Future, recorded));
        }
        let raised = self.propose(Cmd::CompactionRevision(revision)).await?;
        let now = self.shared.state.read().compaction_revision;
        let status = if raised {
            CompactStatus::Recorded
        } else {
            CompactStatus::Compacted
        };
        Ok(outcome(status, now))
    }

    /// See [`crate::PdClient::compaction_revision`]: read on the serving
    /// leader, which has applied every entry of earlier terms.
    pub async fn compaction_revision(&self) -> Result<i64> {
        self.read(|c| Ok(c.compaction_revision)).await
    }
}
