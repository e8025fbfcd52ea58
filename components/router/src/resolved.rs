//! Per-region resolved revisions: for each region with a replica here, a
//! revision at or below which no write can still appear, and the leader's
//! applied index that holds every write at or below it. A replica that has
//! applied that index can answer any read at that revision by itself — no
//! barrier, no lock wait — and all regions' replicas can answer one read at
//! the lowest of their resolved revisions (serializable reads over several
//! regions now; the watch aggregator next).
//!
//! Contract:
//! * The leader's side is `RegionLeader::read_index`: a linearizable R
//!   (every write at or below R acknowledged or in flight is resolved), the
//!   applied index A after that, and resolved = R lowered to the base
//!   revision of every transaction lock held (a locked transaction commits
//!   above its lock's base; one locked later commits above R).
//! * [`Router::start_resolved_tracker`] asks every region's leader (itself,
//!   or through the forwarding RPC) once per [`RESOLVE_EVERY`], all regions
//!   concurrently, and keeps the newest answer per region; a region's
//!   resolved revision never goes back here.
//! * [`Router::resolved_revision`] is the region's resolved revision if
//!   this replica has applied the index that came with it, else `None`.

use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use mvcc::KeyRange;
use raftstore::RegionHandle;
use tracing::debug;

use crate::forward::ReadIndex;
use crate::locate::Location;
use crate::{Result, Router};

/// How often the resolved revisions are refreshed.
pub const RESOLVE_EVERY: Duration = Duration::from_millis(500);

/// The newest resolved revision heard of per region.
#[derive(Default)]
pub(crate) struct ResolvedRevisions(DashMap<u64, (i64, u64)>);

impl ResolvedRevisions {
    /// The newest (resolved revision, leader's applied index) of
    /// `region_id`.
    pub(crate) fn get(&self, region_id: u64) -> Option<(i64, u64)> {
        self.0.get(&region_id).map(|e| *e)
    }

    fn note(&self, region_id: u64, ri: ReadIndex) {
        let mut entry = self.0.entry(region_id).or_insert((0, 0));
        if ri.resolved >= entry.0 {
            *entry = (ri.resolved, ri.applied_index.max(entry.1));
        }
    }
}

impl Router {
    /// Starts refreshing the resolved revisions of this node's replicas
    /// (see the contract); ends when the router is dropped.
    pub fn start_resolved_tracker(self: &Arc<Router>) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(RESOLVE_EVERY).await;
                let Some(router) = weak.upgrade() else {
                    return;
                };
                let _ = tokio::time::timeout(RESOLVE_EVERY * 4, router.refresh_resolved()).await;
            }
        })
    }

    async fn refresh_resolved(&self) {
        let asks = self.store.regions().into_iter().filter_map(|handle| {
            let status = handle.status();
            if status.applied_index == 0 {
                return None;
            }
            Some(async move {
                let region_id = handle.region_id();
                match self.ask_read_index(&handle, status.region.start_key).await {
                    Ok(ri) => self.resolved.note(region_id, ri),
                    Err(e) => debug!(region_id, "no resolved revision: {e}"),
                }
            })
        });
        futures::future::join_all(asks).await;
    }

    /// Asks the leaders of `handles`' regions for their resolved
    /// revisions now (all concurrently) and keeps the answers, as a
    /// refresh of the tracker does: for a watch waiting on these regions.
    pub(crate) async fn refresh_resolved_of(&self, handles: Vec<RegionHandle>) {
        let asks = handles.into_iter().map(|handle| async move {
            let start_key = handle.status().region.start_key;
            match self.ask_read_index(&handle, start_key).await {
                Ok(ri) => self.resolved.note(handle.region_id(), ri),
                Err(e) => debug!(region_id = handle.region_id(), "no resolved revision: {e}"),
            }
        });
        futures::future::join_all(asks).await;
    }

    async fn ask_read_index(&self, handle: &RegionHandle, start_key: Vec<u8>) -> Result<ReadIndex> {
        if handle.status().ready_leader {
            return self
                .region_leader(handle.region_id())
                .read_index(handle)
                .await;
        }
        let span = [KeyRange {
            start: start_key,
            end: None,
        }];
        match self.locate(&span).await? {
            Location::Leader(handle, leader) => leader.read_index(&handle).await,
            Location::Follower(_, target) | Location::Remote(target) => {
                self.forwarded(&target, self.forwarder.read_index(&target))
                    .await
            }
        }
    }

    /// The resolved revision `handle`'s replica can serve reads at (see
    /// the contract).
    pub fn resolved_revision(&self, handle: &RegionHandle) -> Option<i64> {
        let (revision, index) = *self.resolved.0.get(&handle.region_id())?;
        (revision > 0 && handle.status().applied_index >= index).then_some(revision)
    }
}
