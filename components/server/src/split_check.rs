//! Region sizes and automatic splits.
//!
//! Every `split-check-interval`, each region this node leads is measured:
//! the bytes and keys of its history (`mvcc::MvccSnapshot::size_of`, a scan
//! of the region's versions, run off the async threads). A region whose
//! range and applied revision have not moved since its last measure is not
//! scanned again. The figures are kept in [`RegionSizes`] for the region
//! heartbeats. A region over `region-max-size` bytes or `region-max-keys`
//! keys is split (`router::Router::split_region`) at the key before which
//! half of its keys (when over the key limit) or of its bytes lie; a region
//! holding a single huge key cannot be split and stays as it is.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use mvcc::SizeStats;
use proto::metapb;
use router::Router;
use tokio::sync::watch;
use tracing::{debug, info, warn};

/// The last measured size of each region this node leads.
#[derive(Default)]
pub struct RegionSizes(DashMap<u64, SizeStats>);

impl RegionSizes {
    /// Region `region_id`'s last measure (zero if never measured here).
    pub fn get(&self, region_id: u64) -> SizeStats {
        self.0.get(&region_id).map(|s| *s).unwrap_or_default()
    }
}

/// When a region splits.
#[derive(Clone, Copy, Debug)]
pub struct SplitLimits {
    pub max_size: u64,
    pub max_keys: u64,
    pub interval: Duration,
}

/// What a region looked like when last measured.
#[derive(PartialEq)]
struct Measured {
    region: metapb::Region,
    applied_revision: i64,
}

pub async fn run(
    router: Arc<Router>,
    sizes: Arc<RegionSizes>,
    limits: SplitLimits,
    mut stopped: watch::Receiver<bool>,
) {
    let mut measured: HashMap<u64, Measured> = HashMap::new();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(limits.interval) => {}
            _ = stopped.wait_for(|s| *s) => return,
        }
        let store = router.store().clone();
        for handle in store.regions() {
            let status = handle.status();
            if !status.ready_leader {
                continue;
            }
            let now = Measured {
                region: status.region.clone(),
                applied_revision: status.applied_revision,
            };
            if measured.get(&status.region.id) == Some(&now) {
                continue;
            }
            let region = status.region.clone();
            let mvcc = store.mvcc();
            let (start, end) = (region.start_key.clone(), region.end_key.clone());
            let stats =
                match tokio::task::spawn_blocking(move || mvcc.snapshot().size_of(&start, &end))
                    .await
                {
                    Ok(Ok(stats)) => stats,
                    Ok(Err(e)) => {
                        warn!(region_id = region.id, "cannot measure region: {e}");
                        continue;
                    }
                    Err(e) => {
                        warn!(region_id = region.id, "region measuring task failed: {e}");
                        continue;
                    }
                };
            sizes.0.insert(region.id, stats);
            measured.insert(region.id, now);
            if stats.bytes > limits.max_size || stats.keys > limits.max_keys {
                split(&router, &region, stats, limits).await;
            }
        }
        // Forget regions no longer led here.
        measured.retain(|id, _| store.region(*id).is_some_and(|h| h.status().ready_leader));
        sizes.0.retain(|id, _| measured.contains_key(id));
    }
}

/// Splits `region`, measured at `stats`, at its middle.
async fn split(router: &Router, region: &metapb::Region, stats: SizeStats, limits: SplitLimits) {
    let (bytes, keys) = if stats.keys > limits.max_keys {
        (u64::MAX, stats.keys / 2)
    } else {
        (stats.bytes / 2, u64::MAX)
    };
    let mvcc = router.store().mvcc();
    let (start, end) = (region.start_key.clone(), region.end_key.clone());
    let key = match tokio::task::spawn_blocking(move || {
        mvcc.snapshot().split_key(&start, &end, bytes, keys)
    })
    .await
    {
        Ok(Ok(Some(key))) => key,
        Ok(Ok(None)) => {
            debug!(
                region_id = region.id,
                "region over its limits has no split key"
            );
            return;
        }
        Ok(Err(e)) => {
            warn!(region_id = region.id, "cannot find a split key: {e}");
            return;
        }
        Err(e) => {
            warn!(region_id = region.id, "split key task failed: {e}");
            return;
        }
    };
    match router.split_region(region.id, key.clone()).await {
        Ok((left, right)) => info!(
            region_id = left.id,
            new_region_id = right.id,
            split_key = ?String::from_utf8_lossy(&key),
            bytes = stats.bytes,
            keys = stats.keys,
            "region split"
        ),
        // The next round measures again.
        Err(e) => warn!(region_id = region.id, "split failed: {e}"),
    }
}
