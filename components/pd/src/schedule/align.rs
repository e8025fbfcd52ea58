//! The merge checker on the scheduler: [`Scheduler::check_merge`] asks
//! `schedule::merge` for a region's merge or alignment move, and starts an
//! alignment move as a replica move (`schedule::balance`, purpose `Align`)
//! that placement carries on: learner on the target's node, promotion once
//! caught up, then the source replica removed (leadership handed over
//! first when it leads).
//!
//! Which move ([`align_move`]): a replica of the source on a node the target
//! does not use goes to an up node the target uses and the source does
//! not. A follower goes before the leader (saving a transfer), then the one
//! on the node with the most replicas; it goes to the target's node with the
//! fewest replicas (then the least data, then the lowest id). Loads include
//! the moves in flight, as for balance.

use std::collections::HashMap;
use std::time::Instant;

use proto::metapb::{self, PeerRole};

use super::merge::Verdict;
use super::{ClusterView, Issued, Scheduler, MERGE_CHECKER};
use crate::client::{RegionHeartbeat, RegionOperator, Result};
use crate::load::NodeInfo;
use crate::merge::same_nodes;
use crate::operators::CheckerMerge;

impl Scheduler {
    /// The merge checker's step for the heartbeating region (see
    /// `schedule::merge`), to be asked after [`Self::schedule`] found
    /// nothing and no operator's request is to be handed out: a merge into
    /// its right neighbour, or the first step (a learner) of a replica move
    /// onto the neighbour's nodes. `requested` tells whether a region has an
    /// operator's request (split or merge) pending; a region with one, with
    /// a step being repeated or a balance move or merge in flight is left
    /// alone, as source and as target. The step is repeated like any
    /// ([`super::ScheduleConfig::operator_timeout`]); a merge counts against
    /// [`super::ScheduleConfig::merge_limit`] until done or
    /// [`super::ScheduleConfig::merge_timeout`] old, an alignment from its
    /// first move until its merge starts or it stops. `Err` only when
    /// looking up the neighbour or the nodes or allocating the learner's id
    /// fails (this member lost leadership).
    pub async fn check_merge(
        &self,
        view: &dyn ClusterView,
        hb: &RegionHeartbeat,
        requested: &(dyn Fn(u64) -> bool + Sync),
    ) -> Result<Option<RegionOperator>> {
        let region = &hb.region;
        if !self.merges.enabled() || region.end_key.is_empty() {
            return Ok(None);
        }
        let target = view.right_neighbour(region).await?;
        // The nodes and their loads (O(nodes)), only when an alignment may
        // be due: small regions on different nodes.
        let mut nodes: HashMap<u64, NodeInfo> = HashMap::new();
        if target
            .as_ref()
            .is_some_and(|t| !same_nodes(region, &t.region) && self.merges.small_enough(hb, t))
        {
            nodes = view.nodes().await?.into_iter().map(|n| (n.id, n)).collect();
            self.moves.add_influence(&mut nodes);
        }
        let busy = |id: u64| {
            requested(id)
                || self.moves.contains(id)
                || self
                    .issued
                    .lock()
                    .get(&id)
                    .is_some_and(|i| i.at.elapsed() < self.config.operator_timeout)
        };
        let pick = |t: &metapb::Region| align_move(hb, t, &nodes);
        let Some(verdict) = self.merges.decide(hb, target, &busy, &pick) else {
            return Ok(None);
        };
        let op = match verdict {
            Verdict::Merge(op) => op,
            Verdict::Align { from, to } => {
                if !self.moves.start_alignment(region.id, from, to) {
                    self.merges.undo_align(region.id);
                    return Ok(None);
                }
                match view.alloc_id().await {
                    Ok(id) => RegionOperator::AddLearner(metapb::Peer {
                        id,
                        node_id: to,
                        role: PeerRole::Learner as i32,
                    }),
                    Err(e) => {
                        self.moves.cancel(region.id);
                        self.merges.undo_align(region.id);
                        return Err(e);
                    }
                }
            }
        };
        tracing::info!(
            region_id = region.id,
            ?op,
            scheduler = MERGE_CHECKER,
            "scheduled"
        );
        let mut issued = self.issued.lock();
        // A merged source never heartbeats again: its entry would stay.
        issued.retain(|_, i| i.at.elapsed() < self.config.operator_timeout);
        issued.insert(
            region.id,
            Issued {
                epoch: region.region_epoch.unwrap_or_default(),
                leader: hb.leader.id,
                op: op.clone(),
                source: MERGE_CHECKER,
                at: Instant::now(),
            },
        );
        Ok(Some(op))
    }

    /// The merges and alignments the merge checker has in flight, by
    /// source region id. O(merges in flight).
    pub fn merges_in_flight(&self) -> Vec<CheckerMerge> {
        self.merges.list()
    }
}

/// The replica move (source node, target node) that brings `hb`'s region
/// one node closer to `target`'s nodes (see the module docs); `None` when
/// the source has no replica off the target's nodes or the target no up
/// node without one of the source's.
pub(super) fn align_move(
    hb: &RegionHeartbeat,
    target: &metapb::Region,
    nodes: &HashMap<u64, NodeInfo>,
) -> Option<(u64, u64)> {
    let source = &hb.region;
    let on = |r: &metapb::Region, node: u64| r.peers.iter().any(|p| p.node_id == node);
    let to = target
        .peers
        .iter()
        .filter(|p| !on(source, p.node_id))
        .filter_map(|p| nodes.get(&p.node_id))
        .filter(|n| n.accepts_replicas())
        .min_by_key(|n| (n.load.replicas, n.load.size, n.id))?;
    let load = |node: u64| nodes.get(&node).map(|n| n.load).unwrap_or_default();
    let from = source
        .peers
        .iter()
        .filter(|p| !on(target, p.node_id))
        .max_by_key(|p| {
            let l = load(p.node_id);
            (p.id != hb.leader.id, l.replicas, l.size, p.node_id)
        })?;
    Some((from.node_id, to.id))
}
