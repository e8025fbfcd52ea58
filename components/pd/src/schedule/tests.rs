use super::*;
use crate::load::{NodeLoads, RegionLoad};
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
    async fn nodes(&self) -> Result<Vec<NodeInfo>> {
        // Counted afresh from the regions: an independent check of what
        // PD's counters would say.
        let mut loads = NodeLoads::default();
        for r in &self.regions {
            loads.add(RegionLoad {
                region: r,
                leader: None,
                size: 0,
            });
        }
        Ok(self
            .nodes
            .iter()
            .map(|n| NodeInfo {
                id: n.id,
                state: n.state(),
                started: !n.client_urls.is_empty(),
                load: loads.get(n.id),
            })
            .collect())
    }
    async fn alloc_id(&self) -> Result<u64> {
        let c = self.next_id.lock();
        c.set(c.get() + 1);
        Ok(c.get())
    }
    async fn set_node_state(&self, node_id: u64, state: NodeState) -> Result<()> {
        assert_eq!(state, NodeState::Tombstone);
        self.tombstoned.lock().push(node_id);
        Ok(())
    }
    async fn right_neighbour(&self, region: &metapb::Region) -> Result<Option<RegionWithLeader>> {
        Ok(self
            .regions
            .iter()
            .find(|r| !region.end_key.is_empty() && r.start_key == region.end_key)
            .cloned()
            .map(RegionWithLeader::new))
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

/// Region 1 with voters 11, 12 and 13 on nodes 1, 2 and 3.
fn three_voters() -> metapb::Region {
    region(vec![
        peer(11, 1, PeerRole::Voter),
        peer(12, 2, PeerRole::Voter),
        peer(13, 3, PeerRole::Voter),
    ])
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

/// Region 1 with a voter on node 1 and a learner (reported pending) on
/// node 2, the view, a scheduler and the heartbeat.
fn pending_learner() -> (metapb::Region, View, Scheduler, RegionHeartbeat) {
    let r = region(vec![
        peer(11, 1, PeerRole::Voter),
        peer(12, 2, PeerRole::Learner),
    ]);
    let v = view(up(&[1, 2]), vec![r.clone()]);
    let mut h = hb(&r, 11);
    h.pending_peers = vec![r.peers[1]];
    (r, v, Scheduler::new(ScheduleConfig::default()), h)
}

#[test]
fn promotes_only_caught_up_learners() {
    let (r, v, s, mut h) = pending_learner();
    assert_eq!(block_on(s.schedule(&v, &h)).unwrap(), None);
    h.pending_peers.clear();
    assert_eq!(
        block_on(s.schedule(&v, &h)).unwrap(),
        Some(RegionOperator::PromoteLearner(r.peers[1]))
    );
}

#[test]
fn silent_learner_that_never_caught_up_is_removed() {
    let (r, v, s, mut h) = pending_learner();
    h.down_peers = vec![r.peers[1]];
    assert_eq!(
        block_on(s.schedule(&v, &h)).unwrap(),
        Some(RegionOperator::RemovePeer(r.peers[1]))
    );
}

#[test]
fn full_region_on_healthy_nodes_needs_nothing() {
    let r = three_voters();
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
    let r = three_voters();
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
    let r = three_voters();
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
    let r = three_voters();
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
