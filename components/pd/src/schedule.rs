//! Replica placement: keeps every region at `max_replicas` voters on
//! distinct, healthy nodes.
//!
//! The scheduler runs on each region heartbeat and answers with at most one
//! step for the region's leader ([`RegionOperator`]), TiKV-PD style:
//!
//! 1. a learner is promoted once the leader no longer reports it pending
//!    (caught up), or removed if its node is gone or it is still pending
//!    and has gone silent;
//! 2. while fewer than `max_replicas` voters are healthy, a learner is added
//!    on the up node with the fewest replicas that has none of this region;
//! 3. surplus voters are removed: first those on lost nodes (down longer than
//!    `max_node_down_time`, or removed by MemberRemove = `Offline`), then the
//!    one on the most loaded node. The leader is never removed directly; it
//!    hands leadership to a healthy voter first.
//!
//! A replica on an `Offline` node is removed even when no replacement node
//! exists (the operator asked for that node to go, as etcd's MemberRemove
//! shrinks the cluster), but never the last healthy voter. A replica that is
//! merely down is removed only once a replacement has caught up, so a node
//! restart never costs a region its quorum.
//!
//! An `Offline` node that holds no replica any more becomes a `Tombstone`.
//!
//! Operators are remembered per region until the region's epoch moves (the
//! step was applied) or [`ScheduleConfig::operator_timeout`] passes, so a
//! heartbeat that arrives before the leader applied the step gets the same
//! step again instead of a second new peer.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use proto::metapb::{self, NodeState, PeerRole};

use crate::client::{RegionHeartbeat, RegionOperator, Result};
use crate::operators::{PendingOperator, SOURCE_PLACEMENT};

/// The scheduler's name, as operators' tools show it.
pub const SCHEDULER_NAME: &str = "replica-placement";
/// What the scheduler does, as operators' tools show it.
pub const SCHEDULER_DESCRIPTION: &str = "keeps every region at max-replicas voters on \
     distinct up nodes: adds a learner on the least loaded node, promotes it once caught \
     up, removes surplus replicas and those on removed or long-down nodes (handing \
     leadership over first), and tombstones removed nodes that hold no replica";

#[derive(Debug, Clone)]
pub struct ScheduleConfig {
    /// Voters every region should have (on distinct nodes).
    pub max_replicas: usize,
    /// How long a peer may be reported down before it is replaced.
    pub max_node_down_time: Duration,
    /// How long an issued operator is repeated before PD decides anew.
    pub operator_timeout: Duration,
    /// How long a split asked for with [`crate::PdClient::split_region`]
    /// is handed out before PD forgets it.
    pub split_timeout: Duration,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        ScheduleConfig {
            max_replicas: 3,
            max_node_down_time: Duration::from_secs(30 * 60),
            operator_timeout: Duration::from_secs(10),
            split_timeout: Duration::from_secs(60),
        }
    }
}

struct Issued {
    epoch: metapb::RegionEpoch,
    op: RegionOperator,
    at: Instant,
}

/// What the scheduler needs from PD's state; [`crate::PdCore`] provides it
/// (its changes go through PD's raft group, hence async).
#[async_trait::async_trait]
pub trait ClusterView: Send + Sync {
    async fn nodes(&self) -> Result<Vec<metapb::Node>>;
    async fn regions(&self) -> Result<Vec<metapb::Region>>;
    async fn alloc_id(&self) -> Result<u64>;
    async fn set_node_state(&self, node: metapb::Node, state: NodeState) -> Result<()>;
}

pub struct Scheduler {
    config: ScheduleConfig,
    issued: Mutex<HashMap<u64, Issued>>,
    /// peer id → when its leader first reported it down (continuously since).
    down_since: Mutex<HashMap<u64, Instant>>,
}

impl Scheduler {
    pub fn new(config: ScheduleConfig) -> Scheduler {
        Scheduler {
            config,
            issued: Mutex::new(HashMap::new()),
            down_since: Mutex::new(HashMap::new()),
        }
    }

    pub fn config(&self) -> &ScheduleConfig {
        &self.config
    }

    /// The steps being repeated to their regions (not yet timed out), by
    /// region id.
    pub fn issued(&self) -> Vec<PendingOperator> {
        let issued = self.issued.lock();
        let mut out: Vec<PendingOperator> = issued
            .iter()
            .filter(|(_, i)| i.at.elapsed() < self.config.operator_timeout)
            .map(|(id, i)| PendingOperator {
                region_id: *id,
                source: SOURCE_PLACEMENT.to_owned(),
                op: i.op.clone(),
                age: i.at.elapsed(),
            })
            .collect();
        out.sort_by_key(|o| o.region_id);
        out
    }

    /// The next step for the heartbeating region, if any.
    pub async fn schedule(
        &self,
        view: &dyn ClusterView,
        hb: &RegionHeartbeat,
    ) -> Result<Option<RegionOperator>> {
        let region = &hb.region;
        let epoch = region.region_epoch.unwrap_or_default();
        {
            let mut issued = self.issued.lock();
            if let Some(i) = issued.get(&region.id) {
                if i.epoch == epoch && i.at.elapsed() < self.config.operator_timeout {
                    return Ok(Some(i.op.clone()));
                }
                issued.remove(&region.id);
            }
        }
        let lost_down = self.track_down(hb);
        let nodes: HashMap<u64, metapb::Node> =
            view.nodes().await?.into_iter().map(|n| (n.id, n)).collect();
        let regions = view.regions().await?;
        self.retire_offline_nodes(view, &nodes, &regions).await?;

        let op = self.decide(view, hb, &nodes, &regions, &lost_down).await?;
        if let Some(op) = &op {
            tracing::info!(region_id = region.id, ?op, "scheduled");
            self.issued.lock().insert(
                region.id,
                Issued {
                    epoch,
                    op: op.clone(),
                    at: Instant::now(),
                },
            );
        }
        Ok(op)
    }

    /// Updates how long each reported peer has been down; returns the ids
    /// of peers down for longer than allowed.
    fn track_down(&self, hb: &RegionHeartbeat) -> Vec<u64> {
        let mut down_since = self.down_since.lock();
        let region_peers: Vec<u64> = hb.region.peers.iter().map(|p| p.id).collect();
        // Forget peers of this region that are no longer reported down.
        down_since.retain(|id, _| {
            !region_peers.contains(id) || hb.down_peers.iter().any(|p| p.id == *id)
        });
        let now = Instant::now();
        hb.down_peers
            .iter()
            .filter_map(|p| {
                let since = *down_since.entry(p.id).or_insert(now);
                (now.duration_since(since) >= self.config.max_node_down_time).then_some(p.id)
            })
            .collect()
    }

    async fn retire_offline_nodes(
        &self,
        view: &dyn ClusterView,
        nodes: &HashMap<u64, metapb::Node>,
        regions: &[metapb::Region],
    ) -> Result<()> {
        for node in nodes.values() {
            if node.state() != NodeState::Offline {
                continue;
            }
            let holds_replica = regions
                .iter()
                .any(|r| r.peers.iter().any(|p| p.node_id == node.id));
            if !holds_replica {
                tracing::info!(
                    node_id = node.id,
                    "decommissioned node holds no replica; tombstoned"
                );
                view.set_node_state(node.clone(), NodeState::Tombstone)
                    .await?;
            }
        }
        Ok(())
    }

    async fn decide(
        &self,
        view: &dyn ClusterView,
        hb: &RegionHeartbeat,
        nodes: &HashMap<u64, metapb::Node>,
        regions: &[metapb::Region],
        lost_down: &[u64],
    ) -> Result<Option<RegionOperator>> {
        let region = &hb.region;
        let node_state = |id: u64| {
            nodes
                .get(&id)
                .map(|n| n.state())
                .unwrap_or(NodeState::Tombstone)
        };
        let offline = |p: &metapb::Peer| node_state(p.node_id) != NodeState::Up;
        let lost = |p: &metapb::Peer| offline(p) || lost_down.contains(&p.id);
        let pending = |p: &metapb::Peer| hb.pending_peers.iter().any(|q| q.id == p.id);

        // A joint configuration is left by raft on its own; wait for it.
        if region
            .peers
            .iter()
            .any(|p| matches!(p.role(), PeerRole::IncomingVoter | PeerRole::DemotingVoter))
        {
            return Ok(None);
        }

        let down = |p: &metapb::Peer| hb.down_peers.iter().any(|q| q.id == p.id);
        if let Some(learner) = region.peers.iter().find(|p| p.role() == PeerRole::Learner) {
            // A learner that never caught up and went silent (its node died
            // or never came up) would block placement forever.
            return Ok(Some(
                if lost(learner) || (pending(learner) && down(learner)) {
                    RegionOperator::RemovePeer(*learner)
                } else if pending(learner) {
                    return Ok(None);
                } else {
                    RegionOperator::PromoteLearner(*learner)
                },
            ));
        }

        let voters: Vec<&metapb::Peer> = region
            .peers
            .iter()
            .filter(|p| p.role() == PeerRole::Voter)
            .collect();
        let healthy = voters.iter().filter(|p| !lost(p)).count();
        let max = self.config.max_replicas.max(1);

        let mut load: HashMap<u64, usize> = HashMap::new();
        for r in regions {
            for p in &r.peers {
                *load.entry(p.node_id).or_default() += 1;
            }
        }
        // A member added but never started has no client URLs yet.
        let candidate = nodes
            .values()
            .filter(|n| n.state() == NodeState::Up && !n.client_urls.is_empty())
            .filter(|n| !region.peers.iter().any(|p| p.node_id == n.id))
            .min_by_key(|n| (load.get(&n.id).copied().unwrap_or(0), n.id));

        if healthy < max {
            if let Some(node) = candidate {
                let peer = metapb::Peer {
                    id: view.alloc_id().await?,
                    node_id: node.id,
                    role: PeerRole::Learner as i32,
                };
                return Ok(Some(RegionOperator::AddLearner(peer)));
            }
        }

        // Which voter, if any, should go.
        let victim = voters
            .iter()
            .find(|p| {
                lost(p) && (healthy >= max || (offline(p) && healthy >= 1 && candidate.is_none()))
            })
            .or_else(|| {
                (voters.len() > max)
                    .then(|| {
                        voters
                            .iter()
                            .filter(|p| p.id != hb.leader.id)
                            .max_by_key(|p| (load.get(&p.node_id).copied().unwrap_or(0), p.node_id))
                    })
                    .flatten()
            });
        let Some(victim) = victim else {
            return Ok(None);
        };
        if victim.id != hb.leader.id {
            return Ok(Some(RegionOperator::RemovePeer(**victim)));
        }
        // Never remove the leader itself: hand leadership to a healthy voter
        // that is caught up; the new leader removes the old one.
        Ok(voters
            .iter()
            .find(|p| p.id != victim.id && !lost(p) && !pending(p))
            .map(|p| RegionOperator::TransferLeader(**p)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::executor::block_on;
    use std::cell::Cell;

    struct View {
        nodes: Vec<metapb::Node>,
        regions: Vec<metapb::Region>,
        next_id: Mutex<Cell<u64>>,
        tombstoned: Mutex<Vec<u64>>,
    }

    #[async_trait::async_trait]
    impl ClusterView for View {
        async fn nodes(&self) -> Result<Vec<metapb::Node>> {
            Ok(self.nodes.clone())
        }
        async fn regions(&self) -> Result<Vec<metapb::Region>> {
            Ok(self.regions.clone())
        }
        async fn alloc_id(&self) -> Result<u64> {
            let c = self.next_id.lock();
            c.set(c.get() + 1);
            Ok(c.get())
        }
        async fn set_node_state(&self, node: metapb::Node, state: NodeState) -> Result<()> {
            assert_eq!(state, NodeState::Tombstone);
            self.tombstoned.lock().push(node.id);
            Ok(())
        }
    }

    fn node(id: u64, state: NodeState) -> metapb::Node {
        metapb::Node {
            id,
            state: state as i32,
            client_urls: vec![format!("http://127.0.0.1:{id}")],
            ..Default::default()
        }
    }

    fn peer(id: u64, node_id: u64, role: PeerRole) -> metapb::Peer {
        metapb::Peer {
            id,
            node_id,
            role: role as i32,
        }
    }

    fn region(peers: Vec<metapb::Peer>) -> metapb::Region {
        metapb::Region {
            id: 1,
            region_epoch: Some(metapb::RegionEpoch {
                conf_ver: peers.len() as u64,
                version: 1,
            }),
            peers,
            ..Default::default()
        }
    }

    fn view(nodes: Vec<metapb::Node>, regions: Vec<metapb::Region>) -> View {
        View {
            nodes,
            regions,
            next_id: Mutex::new(Cell::new(100)),
            tombstoned: Mutex::new(Vec::new()),
        }
    }

    fn hb(r: &metapb::Region, leader: u64) -> RegionHeartbeat {
        RegionHeartbeat {
            region: r.clone(),
            leader: *r.peers.iter().find(|p| p.id == leader).unwrap(),
            ..Default::default()
        }
    }

    fn up(ids: &[u64]) -> Vec<metapb::Node> {
        ids.iter().map(|i| node(*i, NodeState::Up)).collect()
    }

    #[test]
    fn adds_a_learner_on_the_least_loaded_free_node() {
        let r = region(vec![peer(11, 1, PeerRole::Voter)]);
        let other = metapb::Region {
            id: 2,
            peers: vec![peer(21, 2, PeerRole::Voter)],
            ..r.clone()
        };
        let v = view(up(&[1, 2, 3]), vec![r.clone(), other]);
        let s = Scheduler::new(ScheduleConfig::default());
        let op = block_on(s.schedule(&v, &hb(&r, 11))).unwrap();
        assert_eq!(
            op,
            Some(RegionOperator::AddLearner(peer(101, 3, PeerRole::Learner)))
        );
        // Repeated, not re-allocated, until the epoch moves.
        assert_eq!(block_on(s.schedule(&v, &hb(&r, 11))).unwrap(), op);
        let issued = s.issued();
        assert_eq!(issued.len(), 1);
        assert_eq!((issued[0].region_id, Some(issued[0].op.clone())), (1, op));
        assert_eq!(issued[0].source, SCHEDULER_NAME);
    }

    #[test]
    fn promotes_only_caught_up_learners() {
        let r = region(vec![
            peer(11, 1, PeerRole::Voter),
            peer(12, 2, PeerRole::Learner),
        ]);
        let v = view(up(&[1, 2]), vec![r.clone()]);
        let s = Scheduler::new(ScheduleConfig::default());
        let mut h = hb(&r, 11);
        h.pending_peers = vec![r.peers[1]];
        assert_eq!(block_on(s.schedule(&v, &h)).unwrap(), None);
        h.pending_peers.clear();
        assert_eq!(
            block_on(s.schedule(&v, &h)).unwrap(),
            Some(RegionOperator::PromoteLearner(r.peers[1]))
        );
    }

    #[test]
    fn silent_learner_that_never_caught_up_is_removed() {
        let r = region(vec![
            peer(11, 1, PeerRole::Voter),
            peer(12, 2, PeerRole::Learner),
        ]);
        let v = view(up(&[1, 2]), vec![r.clone()]);
        let s = Scheduler::new(ScheduleConfig::default());
        let mut h = hb(&r, 11);
        h.pending_peers = vec![r.peers[1]];
        h.down_peers = vec![r.peers[1]];
        assert_eq!(
            block_on(s.schedule(&v, &h)).unwrap(),
            Some(RegionOperator::RemovePeer(r.peers[1]))
        );
    }

    #[test]
    fn full_region_on_healthy_nodes_needs_nothing() {
        let r = region(vec![
            peer(11, 1, PeerRole::Voter),
            peer(12, 2, PeerRole::Voter),
            peer(13, 3, PeerRole::Voter),
        ]);
        let v = view(up(&[1, 2, 3, 4]), vec![r.clone()]);
        let s = Scheduler::new(ScheduleConfig::default());
        assert_eq!(block_on(s.schedule(&v, &hb(&r, 11))).unwrap(), None);
    }

    #[test]
    fn surplus_voter_goes_but_never_the_leader() {
        let r = region(vec![
            peer(11, 1, PeerRole::Voter),
            peer(12, 2, PeerRole::Voter),
            peer(13, 3, PeerRole::Voter),
            peer(14, 4, PeerRole::Voter),
        ]);
        let v = view(up(&[1, 2, 3, 4]), vec![r.clone()]);
        let s = Scheduler::new(ScheduleConfig::default());
        match block_on(s.schedule(&v, &hb(&r, 14))).unwrap() {
            Some(RegionOperator::RemovePeer(p)) => assert_ne!(p.id, 14),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn offline_node_is_drained_then_tombstoned() {
        let r = region(vec![
            peer(11, 1, PeerRole::Voter),
            peer(12, 2, PeerRole::Voter),
            peer(13, 3, PeerRole::Voter),
        ]);
        let mut nodes = up(&[1, 2, 4]);
        nodes.push(node(3, NodeState::Offline));
        let v = view(nodes.clone(), vec![r.clone()]);
        let s = Scheduler::new(ScheduleConfig::default());
        // A replacement first: only two healthy voters.
        assert_eq!(
            block_on(s.schedule(&v, &hb(&r, 11))).unwrap(),
            Some(RegionOperator::AddLearner(peer(101, 4, PeerRole::Learner)))
        );
        let mut r2 = r.clone();
        r2.peers.push(peer(101, 4, PeerRole::Voter));
        r2.region_epoch = Some(metapb::RegionEpoch {
            conf_ver: 9,
            version: 1,
        });
        let v = view(nodes.clone(), vec![r2.clone()]);
        assert_eq!(
            block_on(s.schedule(&v, &hb(&r2, 11))).unwrap(),
            Some(RegionOperator::RemovePeer(r.peers[2]))
        );
        let mut r3 = r2.clone();
        r3.peers.retain(|p| p.node_id != 3);
        r3.region_epoch = Some(metapb::RegionEpoch {
            conf_ver: 10,
            version: 1,
        });
        let v = view(nodes, vec![r3.clone()]);
        assert_eq!(block_on(s.schedule(&v, &hb(&r3, 11))).unwrap(), None);
        assert_eq!(*v.tombstoned.lock(), vec![3]);
    }

    #[test]
    fn offline_node_without_replacement_still_leaves() {
        let r = region(vec![
            peer(11, 1, PeerRole::Voter),
            peer(12, 2, PeerRole::Voter),
            peer(13, 3, PeerRole::Voter),
        ]);
        let mut nodes = up(&[1, 2]);
        nodes.push(node(3, NodeState::Offline));
        let v = view(nodes, vec![r.clone()]);
        let s = Scheduler::new(ScheduleConfig::default());
        assert_eq!(
            block_on(s.schedule(&v, &hb(&r, 11))).unwrap(),
            Some(RegionOperator::RemovePeer(r.peers[2]))
        );
        // The leader on a leaving node hands over first.
        let s = Scheduler::new(ScheduleConfig::default());
        assert_eq!(
            block_on(s.schedule(&v, &hb(&r, 13))).unwrap(),
            Some(RegionOperator::TransferLeader(r.peers[0]))
        );
    }

    #[test]
    fn down_peer_is_replaced_only_after_the_down_time_and_kept_meanwhile() {
        let r = region(vec![
            peer(11, 1, PeerRole::Voter),
            peer(12, 2, PeerRole::Voter),
            peer(13, 3, PeerRole::Voter),
        ]);
        let v = view(up(&[1, 2, 3, 4]), vec![r.clone()]);
        let mut h = hb(&r, 11);
        h.down_peers = vec![r.peers[2]];
        let s = Scheduler::new(ScheduleConfig::default());
        assert_eq!(block_on(s.schedule(&v, &h)).unwrap(), None);
        let s = Scheduler::new(ScheduleConfig {
            max_node_down_time: Duration::ZERO,
            ..Default::default()
        });
        assert_eq!(
            block_on(s.schedule(&v, &h)).unwrap(),
            Some(RegionOperator::AddLearner(peer(101, 4, PeerRole::Learner)))
        );
        // No spare node: a down voter stays (removing it would not help).
        let v = view(up(&[1, 2, 3]), vec![r.clone()]);
        let s = Scheduler::new(ScheduleConfig {
            max_node_down_time: Duration::ZERO,
            ..Default::default()
        });
        assert_eq!(block_on(s.schedule(&v, &h)).unwrap(), None);
    }
}
