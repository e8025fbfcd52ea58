//! A placement-driver client that makes the revision oracle slow or stall
//! on demand: every call is passed to the real client, after a delay drawn
//! from the current [`OracleFault`] for `alloc_revisions` and
//! `current_revision` (the calls on a write's and a read's path). Other
//! calls pass straight through.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use pd::{HeartbeatOutcome, PdClient, RegionHeartbeat, RegionOperator, RegionWithLeader, Result};
use proto::metapb;
use rand::Rng;

/// What the oracle does to each call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OracleFault {
    None,
    /// Each call waits a uniform delay in `[0, max]`.
    Slow(Duration),
    /// Each call waits exactly this long (an oracle that hangs for a while).
    Stall(Duration),
}

pub struct FaultyPd {
    inner: Arc<dyn PdClient>,
    fault: Mutex<OracleFault>,
}

impl FaultyPd {
    pub fn new(inner: Arc<dyn PdClient>) -> Arc<FaultyPd> {
        Arc::new(FaultyPd {
            inner,
            fault: Mutex::new(OracleFault::None),
        })
    }

    pub fn set_fault(&self, fault: OracleFault) {
        *self.fault.lock() = fault;
    }

    async fn oracle_delay(&self) {
        let delay = match *self.fault.lock() {
            OracleFault::None => return,
            OracleFault::Slow(max) => max.mul_f64(rand::thread_rng().gen_range(0.0..1.0)),
            OracleFault::Stall(d) => d,
        };
        tokio::time::sleep(delay).await;
    }
}

#[async_trait::async_trait]
impl PdClient for FaultyPd {
    async fn cluster_id(&self) -> Result<u64> {
        self.inner.cluster_id().await
    }
    async fn is_bootstrapped(&self) -> Result<bool> {
        self.inner.is_bootstrapped().await
    }
    async fn bootstrap(&self, node: metapb::Node, region: metapb::Region) -> Result<()> {
        self.inner.bootstrap(node, region).await
    }
    async fn alloc_id(&self) -> Result<u64> {
        self.inner.alloc_id().await
    }
    async fn put_node(&self, node: metapb::Node) -> Result<()> {
        self.inner.put_node(node).await
    }
    async fn get_node(&self, id: u64) -> Result<Option<metapb::Node>> {
        self.inner.get_node(id).await
    }
    async fn get_all_nodes(&self) -> Result<Vec<metapb::Node>> {
        self.inner.get_all_nodes().await
    }
    async fn get_region(&self, key: &[u8]) -> Result<Option<RegionWithLeader>> {
        self.inner.get_region(key).await
    }
    async fn get_region_by_id(&self, id: u64) -> Result<Option<RegionWithLeader>> {
        self.inner.get_region_by_id(id).await
    }
    async fn scan_regions(
        &self,
        start: &[u8],
        end: &[u8],
        limit: usize,
    ) -> Result<Vec<RegionWithLeader>> {
        self.inner.scan_regions(start, end, limit).await
    }
    async fn region_heartbeat(&self, hb: RegionHeartbeat) -> Result<Option<RegionOperator>> {
        self.inner.region_heartbeat(hb).await
    }
    async fn region_heartbeats(&self, hbs: Vec<RegionHeartbeat>) -> Result<Vec<HeartbeatOutcome>> {
        self.inner.region_heartbeats(hbs).await
    }
    async fn alloc_revisions(&self, count: u32) -> Result<i64> {
        self.oracle_delay().await;
        self.inner.alloc_revisions(count).await
    }
    async fn current_revision(&self) -> Result<i64> {
        self.oracle_delay().await;
        self.inner.current_revision().await
    }
    async fn split_region(&self, key: &[u8]) -> Result<RegionWithLeader> {
        self.inner.split_region(key).await
    }
    async fn merge_regions(
        &self,
        source_id: u64,
        target_id: u64,
    ) -> Result<(RegionWithLeader, RegionWithLeader)> {
        self.inner.merge_regions(source_id, target_id).await
    }
    async fn compact(&self, revision: i64) -> Result<pd::CompactOutcome> {
        self.inner.compact(revision).await
    }
    async fn compaction_revision(&self) -> Result<i64> {
        self.inner.compaction_revision().await
    }
    async fn alarm(
        &self,
        action: proto::pdpb::alarm_request::AlarmAction,
        member_id: u64,
        alarm: proto::pdpb::AlarmType,
    ) -> Result<Vec<proto::pdpb::AlarmMember>> {
        self.inner.alarm(action, member_id, alarm).await
    }
}
