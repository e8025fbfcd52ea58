//! A simulated cluster for the scheduler's tests: PD's real state machine
//! ([`ClusterState`]: its `apply`, reports and load counters) behind
//! [`ClusterView`], and region leaders that heartbeat and carry out every
//! answered step at once; PD learns of a membership step with the
//! region's next heartbeat (as `PdCore` records a heartbeat's meta before
//! scheduling it), a merge at once. A heartbeat asks the merge checker when
//! placement and balance have nothing (as `PdCore` does, without
//! operators' requests). A new learner reports pending on its first
//! heartbeat (it is catching up) and caught up afterwards.
//!
//! Every step is checked as it is applied: the leader is never removed, a
//! transfer goes to a voter, voters never drop below what the regions
//! started with, a move never removes the replica it added, a merge joins
//! adjacent regions on the same nodes, all voters, as PD knows the target
//! now, and the counters equal a fresh count over all regions.

use std::collections::{HashMap, HashSet};

use futures::executor::block_on;
use parking_lot::Mutex;
use proto::metapb::{self, NodeState, PeerRole};
use proto::pd_raftpb::{self, command::Cmd};

use super::{ClusterView, Scheduler};
use crate::client::{RegionHeartbeat, RegionOperator, Result};
use crate::load::{NodeInfo, NodeLoad};
use crate::state::{ClusterState, Reported};
use crate::storage::Batch;

pub(super) struct Sim {
    state: Mutex<ClusterState>,
    next_id: Mutex<u64>,
    /// region id → its leader's peer id.
    leaders: Mutex<HashMap<u64, u64>>,
    /// Learners that report pending on their next heartbeat.
    catching_up: Mutex<HashSet<u64>>,
    /// region id → the peer last added to it, until a peer of the region
    /// is removed: that removal must not be the new peer (no failures are
    /// simulated, so a move must never undo itself).
    fresh: Mutex<HashMap<u64, u64>>,
    /// The fewest voters any region may have after any step.
    min_voters: usize,
    /// region id → its meta after a membership step its leader carried
    /// out, until its next heartbeat tells PD.
    staged: Mutex<HashMap<u64, metapb::Region>>,
}

/// A peer id that encodes its region and node.
fn peer_id(region: u64, node: u64) -> u64 {
    region * 100 + node
}

impl Sim {
    /// Up nodes `nodes`; `regions` regions splitting the keyspace, each
    /// with voters on `replica_nodes`, led from `leader_node`, and each of
    /// size `size(region id)`.
    pub fn new(
        nodes: &[u64],
        regions: u64,
        replica_nodes: &[u64],
        leader_node: u64,
        size: impl Fn(u64) -> u64,
    ) -> Sim {
        let sim = Sim {
            state: Mutex::new(ClusterState::default()),
            next_id: Mutex::new(1_000_000),
            leaders: Mutex::new(HashMap::new()),
            catching_up: Mutex::new(HashSet::new()),
            fresh: Mutex::new(HashMap::new()),
            min_voters: replica_nodes.len(),
            staged: Mutex::new(HashMap::new()),
        };
        let key = |i: u64| format!("k{i:04}").into_bytes();
        let region = |id: u64| metapb::Region {
            id,
            start_key: if id == 1 { Vec::new() } else { key(id - 1) },
            end_key: if id == regions { Vec::new() } else { key(id) },
            region_epoch: Some(metapb::RegionEpoch {
                conf_ver: 1,
                version: 2,
            }),
            peers: replica_nodes
                .iter()
                .map(|n| metapb::Peer {
                    id: peer_id(id, *n),
                    node_id: *n,
                    role: PeerRole::Voter as i32,
                })
                .collect(),
        };
        let whole = metapb::Region {
            start_key: Vec::new(),
            end_key: Vec::new(),
            region_epoch: Some(metapb::RegionEpoch {
                conf_ver: 1,
                version: 1,
            }),
            ..region(1)
        };
        sim.apply(Cmd::Bootstrap(pd_raftpb::Bootstrap {
            node: Some(node(nodes[0], NodeState::Up)),
            region: Some(whole),
        }));
        for n in &nodes[1..] {
            sim.apply(Cmd::PutNode(node(*n, NodeState::Up)));
        }
        // As if region 1 split into the others.
        for id in 1..=regions {
            sim.update(region(id));
            sim.leaders.lock().insert(id, peer_id(id, leader_node));
            sim.report(id, size(id));
        }
        sim
    }

    fn apply(&self, cmd: Cmd) {
        let mut c = self.state.lock();
        c.apply(cmd, &mut Batch::default()).expect("apply");
        assert_eq!(*c.loads(), c.recount_loads(), "counters drifted");
    }

    fn update(&self, r: metapb::Region) {
        self.apply(Cmd::UpdateRegion(pd_raftpb::UpdateRegion {
            region: Some(r),
        }));
    }

    /// The region's meta as PD has it.
    pub fn region(&self, id: u64) -> metapb::Region {
        self.state
            .lock()
            .entry_with_leader(id)
            .expect("region exists")
            .region
    }

    pub fn region_ids(&self) -> Vec<u64> {
        self.state.lock().region_ids()
    }

    /// Whether PD's map has region `id` (a merged source is gone).
    pub fn exists(&self, id: u64) -> bool {
        self.state.lock().entry_with_leader(id).is_some()
    }

    /// The node ids of region `id`'s peers, sorted.
    pub fn nodes_of(&self, id: u64) -> Vec<u64> {
        let mut nodes: Vec<u64> = self.region(id).peers.iter().map(|p| p.node_id).collect();
        nodes.sort_unstable();
        nodes
    }

    /// Puts region `id`'s voters on `nodes` instead, led from
    /// `leader_node` (as if moved there before the test).
    pub fn relocate(&self, id: u64, nodes: &[u64], leader_node: u64) {
        self.flush(id);
        let size = self.size(id);
        let mut r = self.region(id);
        r.peers = nodes
            .iter()
            .map(|n| metapb::Peer {
                id: peer_id(id, *n),
                node_id: *n,
                role: PeerRole::Voter as i32,
            })
            .collect();
        if let Some(e) = r.region_epoch.as_mut() {
            e.conf_ver += 1;
        }
        self.update(r);
        self.leaders.lock().insert(id, peer_id(id, leader_node));
        self.report(id, size);
    }

    /// Tells PD region `id`'s meta changed by a step carried out since its
    /// last heartbeat, if any: what the heartbeat's meta does in PD before
    /// it is scheduled.
    fn flush(&self, id: u64) {
        let staged = self.staged.lock().remove(&id);
        if let Some(r) = staged {
            self.update(r);
        }
    }

    /// Region `id`'s size as PD has it (0 for an unknown region).
    pub fn size(&self, id: u64) -> u64 {
        self.state
            .lock()
            .entry_with_leader(id)
            .map_or(0, |e| e.approximate_size)
    }

    /// Region `id`'s size as its next heartbeats report it.
    pub fn set_size(&self, id: u64, size: u64) {
        self.report(id, size);
    }

    pub fn leader(&self, region_id: u64) -> metapb::Peer {
        let leader = self.leaders.lock()[&region_id];
        *self
            .region(region_id)
            .peers
            .iter()
            .find(|p| p.id == leader)
            .expect("the leader is a peer")
    }

    /// Records the heartbeat's report, as PD does before scheduling.
    fn report(&self, region_id: u64, size: u64) {
        let r = self.region(region_id);
        let leader = self.leader(region_id);
        let mut c = self.state.lock();
        assert!(c.report(
            &r,
            Reported {
                leader: Some(leader),
                approximate_size: size,
                approximate_keys: size / 100,
            }
        ));
        assert_eq!(*c.loads(), c.recount_loads(), "counters drifted");
    }

    pub fn load(&self, node_id: u64) -> NodeLoad {
        self.state.lock().loads().get(node_id)
    }

    pub fn set_node_state(&self, node_id: u64, state: NodeState) {
        self.apply(Cmd::PutNode(node(node_id, state)));
    }

    /// One heartbeat of region `id`: reported, scheduled, and the answered
    /// step carried out.
    pub fn heartbeat(&self, s: &Scheduler, id: u64) -> Option<RegionOperator> {
        self.flush(id);
        let region = self.region(id);
        let size = self.size(id);
        self.report(id, size);
        let pending: Vec<metapb::Peer> = {
            let mut catching_up = self.catching_up.lock();
            let pending = region
                .peers
                .iter()
                .filter(|p| catching_up.contains(&p.id))
                .copied()
                .collect();
            catching_up.retain(|id| !region.peers.iter().any(|p| p.id == *id));
            pending
        };
        let hb = RegionHeartbeat {
            leader: self.leader(id),
            region,
            pending_peers: pending,
            approximate_size: size,
            approximate_keys: size / 100,
            ..Default::default()
        };
        let mut op = block_on(s.schedule(self, &hb)).expect("schedule");
        if op.is_none() {
            op = block_on(s.check_merge(self, &hb, &|_| false)).expect("check merge");
        }
        if let Some(op) = &op {
            self.carry_out(&hb, op);
        }
        op
    }

    /// Heartbeats every region once (but those merged away meanwhile);
    /// returns the steps answered.
    pub fn round(&self, s: &Scheduler) -> usize {
        self.region_ids()
            .into_iter()
            .filter(|id| self.exists(*id) && self.heartbeat(s, *id).is_some())
            .count()
    }

    /// Rounds until two in a row answer nothing (a learner catching up
    /// makes one round quiet); returns how many it took.
    pub fn settle(&self, s: &Scheduler, max_rounds: usize) -> usize {
        let mut quiet = 0;
        for i in 0..max_rounds {
            quiet = if self.round(s) == 0 { quiet + 1 } else { 0 };
            if quiet == 2 {
                return i;
            }
        }
        panic!("not settled after {max_rounds} rounds");
    }

    fn carry_out(&self, hb: &RegionHeartbeat, op: &RegionOperator) {
        let mut r = hb.region.clone();
        let bump = |r: &mut metapb::Region| {
            if let Some(e) = r.region_epoch.as_mut() {
                e.conf_ver += 1;
            }
        };
        match op {
            RegionOperator::AddLearner(p) => {
                assert!(r.peers.iter().all(|q| q.node_id != p.node_id), "{op:?}");
                assert_eq!(p.role(), PeerRole::Learner);
                r.peers.push(*p);
                self.catching_up.lock().insert(p.id);
                self.fresh.lock().insert(r.id, p.id);
            }
            RegionOperator::PromoteLearner(p) => {
                let q = r.peers.iter_mut().find(|q| q.id == p.id).expect("a peer");
                assert_eq!(q.role(), PeerRole::Learner);
                q.role = PeerRole::Voter as i32;
            }
            RegionOperator::RemovePeer(p) => {
                assert_ne!(p.id, hb.leader.id, "the leader is never removed directly");
                assert_ne!(
                    self.fresh.lock().remove(&r.id),
                    Some(p.id),
                    "a move removed its own new replica"
                );
                r.peers.retain(|q| q.id != p.id);
            }
            RegionOperator::TransferLeader(p) => {
                assert_ne!(p.id, hb.leader.id);
                assert!(
                    r.peers
                        .iter()
                        .any(|q| q.id == p.id && q.role() == PeerRole::Voter),
                    "transfer to a non-voter: {op:?}"
                );
                self.leaders.lock().insert(r.id, p.id);
                return;
            }
            RegionOperator::Merge { target } => {
                self.merge(&r, target);
                return;
            }
            RegionOperator::Split { .. } => panic!("unexpected {op:?}"),
        }
        bump(&mut r);
        let voters = r
            .peers
            .iter()
            .filter(|p| p.role() == PeerRole::Voter)
            .count();
        assert!(
            voters >= self.min_voters,
            "region {} down to {voters} voters after {op:?}",
            r.id
        );
        self.staged.lock().insert(r.id, r);
    }

    /// Merges `source` into `target` (PD's meta of it, from the operator):
    /// the target takes the source's range with a version above both, and
    /// the sizes add up.
    fn merge(&self, source: &metapb::Region, target: &metapb::Region) {
        self.flush(target.id);
        assert_eq!(
            *target,
            self.region(target.id),
            "merge into an outdated target"
        );
        assert_eq!(
            source.end_key, target.start_key,
            "merge of non-adjacent regions"
        );
        assert_eq!(
            self.nodes_of(source.id),
            self.nodes_of(target.id),
            "merge of regions on different nodes"
        );
        assert!(
            source
                .peers
                .iter()
                .chain(&target.peers)
                .all(|p| p.role() == PeerRole::Voter),
            "merge with a non-voter"
        );
        let merged_size = self.size(source.id) + self.size(target.id);
        let mut merged = target.clone();
        merged.start_key = source.start_key.clone();
        let version = |r: &metapb::Region| r.region_epoch.map_or(0, |e| e.version);
        let v = version(source).max(version(target)) + 1;
        if let Some(e) = merged.region_epoch.as_mut() {
            e.version = v;
        }
        self.update(merged);
        assert!(!self.exists(source.id), "the source is gone from PD's map");
        self.leaders.lock().remove(&source.id);
        self.fresh.lock().remove(&source.id);
        self.report(target.id, merged_size);
    }

    /// Splits region `id` at its middle key `key`: the right half becomes
    /// a new region on the same nodes, led from the same node.
    pub fn split(&self, id: u64, key: &[u8], new_id: u64) {
        self.flush(id);
        let mut left = self.region(id);
        let mut right = left.clone();
        let leader_node = self.leader(id).node_id;
        left.end_key = key.to_vec();
        right.start_key = key.to_vec();
        right.id = new_id;
        for p in &mut right.peers {
            p.id = peer_id(new_id, p.node_id);
        }
        for r in [&mut left, &mut right] {
            if let Some(e) = r.region_epoch.as_mut() {
                e.version += 1;
            }
        }
        self.update(left);
        self.update(right);
        self.leaders
            .lock()
            .insert(new_id, peer_id(new_id, leader_node));
        self.report(id, 0);
        self.report(new_id, 0);
    }
}

fn node(id: u64, state: NodeState) -> metapb::Node {
    metapb::Node {
        id,
        state: state as i32,
        client_urls: vec![format!("http://127.0.0.1:{}", 4000 + id)],
        ..Default::default()
    }
}

#[async_trait::async_trait]
impl ClusterView for Sim {
    async fn nodes(&self) -> Result<Vec<NodeInfo>> {
        Ok(self.state.lock().node_infos())
    }

    async fn alloc_id(&self) -> Result<u64> {
        let mut id = self.next_id.lock();
        *id += 1;
        Ok(*id)
    }

    async fn set_node_state(&self, node_id: u64, state: NodeState) -> Result<()> {
        Sim::set_node_state(self, node_id, state);
        Ok(())
    }

    async fn right_neighbour(
        &self,
        region: &metapb::Region,
    ) -> Result<Option<crate::client::RegionWithLeader>> {
        Ok(crate::merge::right_neighbour(&self.state.lock(), region))
    }
}
