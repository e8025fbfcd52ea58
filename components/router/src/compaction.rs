//! etcd's Compact across regions, and regions catching up with the
//! cluster's compaction revision.
//!
//! The cluster's compaction revision lives in PD (`PdClient::compact`,
//! durable and only ever raised). [`Router::compact`]`(R)`:
//! 1. asks PD to record R: R at or below PD's revision is etcd's
//!    "compacted", R above the oracle's current revision etcd's "future
//!    revision" (nothing recorded);
//! 2. applies PD's revision (R, or the higher one already recorded) to
//!    every region in key order; a region that already compacted that far
//!    (an earlier call that stopped half way, a catch-up) counts as done;
//! 3. answers success only once every region applied it (so every later
//!    read below R, in any region, is refused), or "compacted" for a
//!    revision PD had already, after the same step 2.
//!
//! A call that fails after step 1 leaves some regions behind PD. They, and
//! regions whose leader was unreachable, catch up by themselves:
//! [`Router::start_compaction_catch_up`] has every node ask PD for the
//! revision every [`CATCH_UP_INTERVAL`] (one small read per node, none
//! while it leads no region) and propose it in each region it leads that is
//! behind. A split's new region inherits its parent's compaction revision
//! at apply.
//!
//! Each region's compaction is proposed with the epoch the router located
//! it by, so a split meanwhile makes apply refuse it and the pieces are
//! taken again.

use std::sync::Arc;
use std::time::Duration;

use mvcc::KeyRange;
use pd::CompactStatus;
use tracing::{debug, info};

use crate::leader::check_spans;
use crate::locate::Location;
use crate::router::retrying;
use crate::{Error, Result, Router, RETRY_DEADLINE};

/// How often a node compares its led regions with PD's compaction
/// revision.
pub const CATCH_UP_INTERVAL: Duration = Duration::from_secs(2);

impl Router {
    /// etcd Compact (see the module docs): returns the current revision for
    /// the response header. With `physical`, waits until this node's
    /// replicas (or the leaders', for regions without one here) have cleaned
    /// up. Errors: `Mvcc(Compacted)` for a revision at or below the
    /// cluster's compaction revision (after making every region catch up
    /// with it), `Mvcc(FutureRev)` for one above the current revision,
    /// `OutcomeUnknown` when PD or a region did not answer in time (the
    /// revision may be recorded; regions catch up).
    pub async fn compact(&self, revision: i64, physical: bool) -> Result<i64> {
        let outcome = tokio::time::timeout(RETRY_DEADLINE, self.pd.compact(revision))
            .await
            .map_err(|_| Error::timed_out("recording the compaction revision"))??;
        let result = match outcome.status {
            CompactStatus::Future => return Err(mvcc::Error::FutureRev.into()),
            CompactStatus::Recorded => Ok(()),
            CompactStatus::Compacted => Err(mvcc::Error::Compacted.into()),
        };
        let current = self
            .compact_regions(outcome.compaction_revision, physical)
            .await?;
        result.map(|()| current)
    }

    /// Compaction `revision` in every region, in key order; the highest
    /// current revision a region reported.
    async fn compact_regions(&self, revision: i64, physical: bool) -> Result<i64> {
        let everything = KeyRange::from_etcd(b"\0", b"\0");
        self.with_pieces(&everything, |pieces| async move {
            let mut current = 0;
            for piece in &pieces {
                match self.compact_region(piece, revision, physical).await {
                    Ok(c) => current = current.max(c),
                    // Done before (a call that stopped half way, a
                    // catch-up).
                    Err(Error::Mvcc(mvcc::Error::Compacted)) => {}
                    Err(e) => return Err(e),
                }
            }
            if current == 0 {
                current = self.current_revision().await?;
            }
            Ok(current)
        })
        .await
    }

    /// Compact in the one region holding `span`.
    async fn compact_region(&self, span: &KeyRange, revision: i64, physical: bool) -> Result<i64> {
        let spans = std::slice::from_ref(span);
        let (current, local, index) = retrying(move || async move {
            match self.locate(spans).await? {
                Location::Leader(handle, leader) => {
                    let region = handle.status().region;
                    check_spans(&region, spans)?;
                    let (current, index) = leader
                        .compact(&handle, revision, region.region_epoch)
                        .await?;
                    Ok((current, Some(handle), index))
                }
                Location::Follower(handle, target) => {
                    let (current, index) = self
                        .forwarded(&target, self.forwarder.compact(&target, revision, false))
                        .await?;
                    Ok((current, Some(handle), index))
                }
                Location::Remote(target) => {
                    let (current, index) = self
                        .forwarded(&target, self.forwarder.compact(&target, revision, physical))
                        .await?;
                    Ok((current, None, index))
                }
            }
        })
        .await?;
        if physical {
            if let Some(handle) = local {
                // The compaction is committed; this replica starts its own
                // clean-up once it has applied it.
                tokio::time::timeout(RETRY_DEADLINE, handle.wait_applied(index))
                    .await
                    .map_err(|_| Error::timed_out("wait for the compaction to apply"))??;
                handle.wait_physically_compacted(revision).await?;
            }
        }
        Ok(current)
    }

    /// Starts the catch-up loop (see the module docs); it ends when the
    /// router is dropped.
    pub fn start_compaction_catch_up(self: &Arc<Router>) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(CATCH_UP_INTERVAL).await;
                let Some(router) = weak.upgrade() else {
                    return;
                };
                // Bounded, so a node being shut down is not held up by it.
                let round = tokio::time::timeout(RETRY_DEADLINE, router.catch_up_compaction());
                if let Ok(Err(e)) = round.await {
                    debug!("compaction catch-up: {e}");
                }
            }
        })
    }

    /// One catch-up round: proposes PD's compaction revision in every region
    /// this node leads that is behind it. Returns how many regions caught
    /// up. A region that fails (leadership moved, locks held too long) is
    /// left for the next round or its new leader.
    pub async fn catch_up_compaction(&self) -> Result<usize> {
        let led: Vec<_> = self
            .store
            .regions()
            .into_iter()
            .filter(|h| h.status().ready_leader)
            .collect();
        if led.is_empty() {
            return Ok(0);
        }
        let target = self.pd.compaction_revision().await?;
        let mut caught_up = 0;
        for handle in led {
            let status = handle.status();
            if !status.ready_leader || status.compact_revision >= target {
                continue;
            }
            let leader = self.region_leader(handle.region_id());
            match leader
                .compact(&handle, target, status.region.region_epoch)
                .await
            {
                Ok(_) => {
                    info!(
                        region_id = handle.region_id(),
                        from = status.compact_revision,
                        revision = target,
                        "region caught up with the cluster's compaction revision"
                    );
                    caught_up += 1;
                }
                Err(Error::Mvcc(mvcc::Error::Compacted)) => {}
                Err(e) => debug!(
                    region_id = handle.region_id(),
                    revision = target,
                    "compaction catch-up failed: {e}"
                ),
            }
        }
        Ok(caught_up)
    }
}
