//! Per-node load counters: how many replicas and region leaders each node
//! holds and the approximate bytes of its replicas, kept up to date
//! incrementally as regions' meta, leaders and sizes change, so that the
//! schedulers read a node's load in O(1) instead of walking every region on
//! each heartbeat.
//!
//! `state::ClusterState` owns one `NodeLoads` and calls
//! `NodeLoads::remove` with a region's old (meta, leader, size) and
//! `NodeLoads::add` with its new ones on every change, so the counters
//! always equal what a walk over all regions would count. The replica
//! counts follow the replicated meta (alike on every PD member); leaders
//! and sizes follow heartbeats, which only the PD leader receives: on a
//! member that just became leader they start at zero, which is exactly what
//! its (empty) reported state says, and fill in as heartbeats arrive.

use std::collections::HashMap;

use proto::metapb;

/// One node's load.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodeLoad {
    /// Replicas of any role (voters and learners).
    pub replicas: u64,
    /// Regions whose last reported leader is on this node.
    pub leaders: u64,
    /// Sum of the approximate sizes (bytes) of the regions it holds a
    /// replica of, as their leaders last reported them.
    pub size: u64,
}

impl NodeLoad {
    fn is_zero(&self) -> bool {
        *self == NodeLoad::default()
    }
}

/// A node as the schedulers see it: its state and load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeInfo {
    pub id: u64,
    pub state: metapb::NodeState,
    /// It has client URLs, i.e. a node process registered itself (a member
    /// added with MemberAdd but never started has none; nothing is placed
    /// there).
    pub started: bool,
    pub load: NodeLoad,
}

impl NodeInfo {
    /// A node replicas may be placed on.
    pub fn accepts_replicas(&self) -> bool {
        self.state == metapb::NodeState::Up && self.started
    }
}

/// What one region contributes to the counters.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RegionLoad<'a> {
    pub region: &'a metapb::Region,
    /// The last reported leader; counted only while it is one of the
    /// region's peers (a stale report may name a removed peer).
    pub leader: Option<metapb::Peer>,
    pub size: u64,
}

impl RegionLoad<'_> {
    fn leader_node(&self) -> Option<u64> {
        let leader = self.leader?;
        self.region
            .peers
            .iter()
            .any(|p| p.id == leader.id && p.node_id == leader.node_id)
            .then_some(leader.node_id)
    }
}

/// The counters of every node holding a replica; nodes without any load
/// have no entry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct NodeLoads {
    by_node: HashMap<u64, NodeLoad>,
}

impl NodeLoads {
    /// The load of `node_id` (zero if it holds nothing).
    pub fn get(&self, node_id: u64) -> NodeLoad {
        self.by_node.get(&node_id).copied().unwrap_or_default()
    }

    /// Counts a region in (it was inserted or changed to `r`).
    pub fn add(&mut self, r: RegionLoad<'_>) {
        for p in &r.region.peers {
            let l = self.by_node.entry(p.node_id).or_default();
            l.replicas += 1;
            l.size = l.size.saturating_add(r.size);
        }
        if let Some(n) = r.leader_node() {
            self.by_node.entry(n).or_default().leaders += 1;
        }
    }

    /// Counts a region out; `r` must be exactly what was added for it.
    pub fn remove(&mut self, r: RegionLoad<'_>) {
        for p in &r.region.peers {
            self.update(p.node_id, |l| {
                l.replicas = l.replicas.saturating_sub(1);
                l.size = l.size.saturating_sub(r.size);
            });
        }
        if let Some(n) = r.leader_node() {
            self.update(n, |l| l.leaders = l.leaders.saturating_sub(1));
        }
    }

    fn update(&mut self, node_id: u64, f: impl FnOnce(&mut NodeLoad)) {
        if let Some(l) = self.by_node.get_mut(&node_id) {
            f(l);
            if l.is_zero() {
                self.by_node.remove(&node_id);
            }
        }
    }

    /// Number of nodes with any load.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.by_node.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::metapb::{Peer, PeerRole, Region};

    fn region(nodes: &[u64]) -> Region {
        Region {
            id: 1,
            peers: nodes
                .iter()
                .map(|n| Peer {
                    id: 10 + n,
                    node_id: *n,
                    role: PeerRole::Voter as i32,
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn add_then_remove_leaves_nothing() {
        let r = region(&[1, 2, 3]);
        let load = RegionLoad {
            region: &r,
            leader: Some(r.peers[1]),
            size: 100,
        };
        let mut l = NodeLoads::default();
        l.add(load);
        assert_eq!(
            l.get(2),
            NodeLoad {
                replicas: 1,
                leaders: 1,
                size: 100
            }
        );
        assert_eq!(l.get(1).leaders, 0);
        assert_eq!(l.get(4), NodeLoad::default());
        l.remove(load);
        assert_eq!(l.len(), 0);
    }

    #[test]
    fn a_leader_that_is_no_peer_is_not_counted() {
        let r = region(&[1, 2]);
        let stranger = Peer {
            id: 99,
            node_id: 3,
            role: PeerRole::Voter as i32,
        };
        let mut l = NodeLoads::default();
        l.add(RegionLoad {
            region: &r,
            leader: Some(stranger),
            size: 0,
        });
        assert_eq!(l.get(3), NodeLoad::default());
        assert_eq!(l.get(1).leaders + l.get(2).leaders, 0);
    }
}
