//! [`PdClient`] over an in-process [`PdCore`], for a node that embeds PD.

use std::sync::Arc;

use proto::{metapb, pdpb};

use crate::client::{
    HeartbeatOutcome, PdClient, RegionHeartbeat, RegionOperator, RegionWithLeader, Result,
};
use crate::pd_core::PdCore;

/// Calls the embedded core directly: no batching is needed because the
/// oracle's fast path is a mutex-protected increment. The embedded PD is a
/// single-member raft group, so it is always its own leader.
#[derive(Debug, Clone)]
pub struct LocalPdClient {
    core: Arc<PdCore>,
}

impl LocalPdClient {
    pub fn new(core: Arc<PdCore>) -> Self {
        LocalPdClient { core }
    }

    pub fn core(&self) -> &Arc<PdCore> {
        &self.core
    }
}

#[async_trait::async_trait]
impl PdClient for LocalPdClient {
    async fn cluster_id(&self) -> Result<u64> {
        Ok(self.core.cluster_id())
    }

    async fn is_bootstrapped(&self) -> Result<bool> {
        self.core.is_bootstrapped().await
    }

    async fn bootstrap(&self, node: metapb::Node, region: metapb::Region) -> Result<()> {
        self.core.bootstrap(node, region).await
    }

    async fn alloc_id(&self) -> Result<u64> {
        self.core.alloc_id().await
    }

    async fn put_node(&self, node: metapb::Node) -> Result<()> {
        self.core.put_node(node).await
    }

    async fn get_node(&self, id: u64) -> Result<Option<metapb::Node>> {
        self.core.get_node(id).await
    }

    async fn get_all_nodes(&self) -> Result<Vec<metapb::Node>> {
        self.core.get_all_nodes().await
    }

    async fn get_region(&self, key: &[u8]) -> Result<Option<RegionWithLeader>> {
        self.core.get_region(key).await
    }

    async fn get_region_by_id(&self, id: u64) -> Result<Option<RegionWithLeader>> {
        self.core.get_region_by_id(id).await
    }

    async fn scan_regions(
        &self,
        start: &[u8],
        end: &[u8],
        limit: usize,
    ) -> Result<Vec<RegionWithLeader>> {
        self.core.scan_regions(start, end, limit).await
    }

    async fn region_heartbeat(&self, hb: RegionHeartbeat) -> Result<Option<RegionOperator>> {
        self.core.handle_region_heartbeat(hb).await
    }

    async fn region_heartbeats(&self, hbs: Vec<RegionHeartbeat>) -> Result<Vec<HeartbeatOutcome>> {
        if hbs.is_empty() {
            return Ok(Vec::new());
        }
        self.core.handle_region_heartbeats(hbs).await
    }

    async fn alloc_revisions(&self, count: u32) -> Result<i64> {
        self.core.alloc_revisions(count).await
    }

    async fn current_revision(&self) -> Result<i64> {
        self.core.current_revision().await
    }

    async fn split_region(&self, key: &[u8]) -> Result<RegionWithLeader> {
        self.core.split_region(key).await
    }

    async fn merge_regions(
        &self,
        source_id: u64,
        target_id: u64,
    ) -> Result<(RegionWithLeader, RegionWithLeader)> {
        self.core.merge_regions(source_id, target_id).await
    }

    async fn compact(&self, revision: i64) -> Result<crate::CompactOutcome> {
        self.core.compact(revision).await
    }

    async fn compaction_revision(&self) -> Result<i64> {
        self.core.compaction_revision().await
    }

    async fn alarm(
        &self,
        action: pdpb::alarm_request::AlarmAction,
        member_id: u64,
        alarm: pdpb::AlarmType,
    ) -> Result<Vec<pdpb::AlarmMember>> {
        self.core.alarm(action, member_id, alarm).await
    }
}
