//! The per-node load counters stay equal to a fresh count over all regions
//! across everything that changes regions: bootstrap, meta changes, leader
//! and size reports, splits, stale reports, node removal and snapshots.

use proto::metapb::{self, PeerRole};
use proto::pd_raftpb::{self, command::Cmd};

use super::{ClusterState, Reported};
use crate::load::NodeLoad;
use crate::storage::Batch;

fn peer(id: u64, node_id: u64) -> metapb::Peer {
    metapb::Peer {
        id,
        node_id,
        role: PeerRole::Voter as i32,
    }
}

fn region(id: u64, start: &[u8], end: &[u8], ver: (u64, u64), nodes: &[u64]) -> metapb::Region {
    metapb::Region {
        id,
        start_key: start.to_vec(),
        end_key: end.to_vec(),
        region_epoch: Some(metapb::RegionEpoch {
            conf_ver: ver.0,
            version: ver.1,
        }),
        peers: nodes.iter().map(|n| peer(id * 10 + n, *n)).collect(),
    }
}

fn node(id: u64) -> metapb::Node {
    metapb::Node {
        id,
        ..Default::default()
    }
}

fn apply(c: &mut ClusterState, cmd: Cmd) -> bool {
    let changed = c.apply(cmd, &mut Batch::default()).expect("apply");
    assert_eq!(*c.loads(), c.recount_loads(), "counters drifted");
    changed
}

fn update(c: &mut ClusterState, r: &metapb::Region) -> bool {
    apply(
        c,
        Cmd::UpdateRegion(pd_raftpb::UpdateRegion {
            region: Some(r.clone()),
        }),
    )
}

fn report(c: &mut ClusterState, r: &metapb::Region, leader_node: u64, size: u64) {
    let leader = r.peers.iter().find(|p| p.node_id == leader_node).copied();
    c.report(
        r,
        Reported {
            leader,
            approximate_size: size,
            approximate_keys: size / 10,
        },
    );
    assert_eq!(*c.loads(), c.recount_loads(), "counters drifted");
}

fn load(replicas: u64, leaders: u64, size: u64) -> NodeLoad {
    NodeLoad {
        replicas,
        leaders,
        size,
    }
}

fn bootstrapped(nodes: &[u64]) -> (ClusterState, metapb::Region) {
    let mut c = ClusterState::default();
    let r = region(1, b"", b"", (1, 1), nodes);
    apply(
        &mut c,
        Cmd::Bootstrap(pd_raftpb::Bootstrap {
            node: Some(node(1)),
            region: Some(r.clone()),
        }),
    );
    (c, r)
}

#[test]
fn meta_changes_leader_changes_and_sizes_are_counted() {
    let (mut c, r) = bootstrapped(&[1, 2, 3]);
    assert_eq!(c.loads().get(1), load(1, 0, 0));
    report(&mut c, &r, 1, 100);
    assert_eq!(c.loads().get(1), load(1, 1, 100));
    assert_eq!(c.loads().get(2), load(1, 0, 100));
    // Leadership moves to node 2; the size grows.
    report(&mut c, &r, 2, 300);
    assert_eq!(c.loads().get(1), load(1, 0, 300));
    assert_eq!(c.loads().get(2), load(1, 1, 300));

    // A replica moves from node 3 to node 4: the report carries over.
    let r2 = region(1, b"", b"", (2, 1), &[1, 2, 4]);
    assert!(update(&mut c, &r2));
    assert_eq!(c.loads().get(3), NodeLoad::default());
    assert_eq!(c.loads().get(4), load(1, 0, 300));
    assert_eq!(c.loads().get(2), load(1, 1, 300));

    // A report for the outdated meta is dropped.
    c.report(
        &r,
        Reported {
            leader: Some(r.peers[2]),
            ..Default::default()
        },
    );
    assert_eq!(c.loads().get(3), NodeLoad::default());
    assert_eq!(*c.loads(), c.recount_loads());

    // A stale meta changes nothing.
    assert!(!update(&mut c, &r));
    assert_eq!(c.loads().get(4).replicas, 1);
}

#[test]
fn a_removed_leader_is_no_longer_counted() {
    let (mut c, r) = bootstrapped(&[1, 2, 3]);
    report(&mut c, &r, 3, 0);
    // Node 3's replica is removed before the next heartbeat names the new
    // leader: the stale leader is not counted anywhere.
    let r2 = region(1, b"", b"", (2, 1), &[1, 2]);
    assert!(update(&mut c, &r2));
    assert_eq!(c.loads().get(3), NodeLoad::default());
    assert_eq!((c.loads().get(1).leaders, c.loads().get(2).leaders), (0, 0));
}

#[test]
fn splits_add_new_regions_on_the_same_nodes() {
    let (mut c, r) = bootstrapped(&[1, 2, 3]);
    report(&mut c, &r, 1, 1000);
    // The left half reports first: it shrinks, the right half is a hole.
    let left = region(1, b"", b"m", (1, 2), &[1, 2, 3]);
    assert!(update(&mut c, &left));
    report(&mut c, &left, 1, 500);
    let right = region(2, b"m", b"", (1, 2), &[1, 2, 3]);
    assert!(update(&mut c, &right));
    assert_eq!(c.loads().get(1), load(2, 1, 500));
    report(&mut c, &right, 2, 500);
    assert_eq!(c.loads().get(1), load(2, 1, 1000));
    assert_eq!(c.loads().get(2), load(2, 1, 1000));
    assert_eq!(c.loads().get(3), load(2, 0, 1000));

    // A merge-like report covering both makes region 2 obsolete.
    let whole = region(1, b"", b"", (1, 3), &[1, 2, 3]);
    assert!(update(&mut c, &whole));
    assert_eq!(c.region_count(), 1);
    assert_eq!(c.loads().get(2).replicas, 1);
}

#[test]
fn a_drained_node_has_no_load_and_snapshots_recount() {
    let (mut c, r) = bootstrapped(&[1, 2, 3]);
    apply(&mut c, Cmd::PutNode(node(2)));
    apply(&mut c, Cmd::PutNode(node(3)));
    report(&mut c, &r, 3, 10);
    let mut offline = node(3);
    offline.state = metapb::NodeState::Offline as i32;
    apply(&mut c, Cmd::PutNode(offline.clone()));
    // Still holds its replica: a node's state does not change its load.
    assert_eq!(c.loads().get(3), load(1, 1, 10));
    let drained = region(1, b"", b"", (2, 1), &[1, 2]);
    assert!(update(&mut c, &drained));
    assert_eq!(c.loads().get(3), NodeLoad::default());
    offline.state = metapb::NodeState::Tombstone as i32;
    apply(&mut c, Cmd::PutNode(offline));
    assert_eq!(c.loads().get(3), NodeLoad::default());

    // A member installing a snapshot (or becoming leader after a restart)
    // counts replicas from the meta; leaders and sizes come with the next
    // heartbeats.
    let snap = pd_raftpb::StateSnapshot {
        bootstrapped: true,
        nodes: c.nodes.values().cloned().collect(),
        regions: vec![drained],
        revision_high_water: 1,
        ..Default::default()
    };
    let c2 = ClusterState::from_snapshot(snap).expect("snapshot");
    assert_eq!(c2.loads().get(1), load(1, 0, 0));
    assert_eq!(c2.loads().get(2), load(1, 0, 0));
    assert_eq!(*c2.loads(), c2.recount_loads());
}
