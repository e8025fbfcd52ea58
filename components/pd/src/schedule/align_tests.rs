//! Merge alignment: the merge checker moving a source's replicas onto its
//! target's nodes before merging, on [`MergeChecker`] directly (when it
//! starts, continues, waits and stops) and on a simulated cluster
//! ([`super::sim`], which checks quorum and the move invariants at every
//! step).

use std::time::Duration;

use proto::metapb::{self, PeerRole};

use super::merge::{MergeChecker, Verdict};
use super::merge_tests::{config, hb, idle, known, merge, region};
use super::sim::Sim;
use super::{ScheduleConfig, Scheduler};
use crate::client::{RegionHeartbeat, RegionOperator};

/// A picker that always offers the move from node 1 to node 4.
fn one_to_four(_: &metapb::Region) -> Option<(u64, u64)> {
    Some((1, 4))
}

fn align(from: u64, to: u64) -> Option<Verdict> {
    Some(Verdict::Align { from, to })
}

/// The checker after both regions' heartbeats, asked for `source`.
fn decide(c: &MergeChecker, source: &RegionHeartbeat, target: &RegionHeartbeat) -> Option<Verdict> {
    c.observe(target);
    c.observe(source);
    c.decide(source, Some(known(target)), &idle, &one_to_four)
}

#[test]
fn different_nodes_align_first_then_merge() {
    let c = MergeChecker::new(&config());
    let a = hb(&region(1, b"", b"g", 1, &[1, 2, 3]));
    let b = hb(&region(2, b"g", b"", 1, &[2, 3, 4]));
    assert_eq!(decide(&c, &a, &b), align(1, 4));
    assert_eq!((c.aligning(1), c.in_flight()), (Some(2), 1));
    assert!(c.involves(1) && c.involves(2));
    // The move under way (busy): nothing more meanwhile.
    assert_eq!(
        c.decide(&a, Some(known(&b)), &|id| id == 1, &one_to_four),
        None
    );
    assert_eq!(c.aligning(1), Some(2));
    // Its learner is in: the source is not healthy yet, the alignment waits.
    let mut learning = a.clone();
    learning.region.peers.push(metapb::Peer {
        id: 14,
        node_id: 4,
        role: PeerRole::Learner as i32,
    });
    assert_eq!(decide(&c, &learning, &b), None);
    assert_eq!(c.aligning(1), Some(2));
    // Moved: on the target's nodes (a new conf_ver, the same version), the
    // merge starts at once; the settle clock did not restart.
    let mut moved = hb(&region(1, b"", b"g", 1, &[2, 3, 4]));
    moved.region.region_epoch = Some(metapb::RegionEpoch {
        conf_ver: 4,
        version: 1,
    });
    assert_eq!(decide(&c, &moved, &b), merge(&b.region));
    assert_eq!((c.aligning(1), c.in_flight()), (None, 1));
    let listed = c.list();
    assert_eq!(
        (
            listed[0].source_id,
            listed[0].target_id,
            listed[0].aligning,
            listed[0].replica_moves
        ),
        (1, 2, false, 1)
    );
}

#[test]
fn replica_moves_do_not_restart_the_settle_clock() {
    let c = MergeChecker::new(&ScheduleConfig {
        split_merge_interval: Duration::from_millis(200),
        ..config()
    });
    // Region 1 led by peer 11 on node 1; region 2 lacks node 2.
    let a = hb(&region(1, b"", b"g", 3, &[1, 2, 3]));
    let b = hb(&region(2, b"g", b"", 3, &[1, 3, 4]));
    let two_to_four = |_: &metapb::Region| Some((2, 4));
    c.observe(&b);
    c.observe(&a);
    assert_eq!(c.decide(&a, Some(known(&b)), &idle, &two_to_four), None);
    std::thread::sleep(Duration::from_millis(250));
    c.observe(&b);
    c.observe(&a);
    assert_eq!(
        c.decide(&a, Some(known(&b)), &idle, &two_to_four),
        align(2, 4)
    );
    // Moved: a new conf_ver, the same version and leader. The merge starts
    // at once: the clock did not restart with the membership change.
    let mut moved = hb(&region(1, b"", b"g", 3, &[1, 3, 4]));
    moved.region.region_epoch = Some(metapb::RegionEpoch {
        conf_ver: 9,
        version: 3,
    });
    assert_eq!(decide(&c, &moved, &b), merge(&b.region));
}

#[test]
fn alignments_count_against_the_merge_limit() {
    let c = MergeChecker::new(&config());
    let r: Vec<RegionHeartbeat> = [
        (1, &b""[..], &b"b"[..], &[1, 2, 3][..]),
        (2, b"b", b"c", &[2, 3, 4]),
        (3, b"c", b"d", &[1, 2, 3]),
        (4, b"d", b"e", &[2, 3, 4]),
        (5, b"e", b"f", &[1, 2, 3]),
        (6, b"f", b"", &[1, 2, 3]),
    ]
    .into_iter()
    .map(|(id, s, e, nodes)| hb(&region(id, s, e, 1, nodes)))
    .collect();
    assert_eq!(decide(&c, &r[0], &r[1]), align(1, 4));
    // Region 2 is an alignment's target: not a source meanwhile.
    assert_eq!(decide(&c, &r[1], &r[2]), None);
    assert_eq!(decide(&c, &r[2], &r[3]), align(1, 4));
    // The limit (2) is reached, even for a merge of co-located regions.
    assert_eq!(decide(&c, &r[4], &r[5]), None);
    assert_eq!(c.in_flight(), 2);
    // An alignment in flight goes on: its next move is no new one.
    assert_eq!(decide(&c, &r[0], &r[1]), align(1, 4));
    assert_eq!(c.list()[0].replica_moves, 2);
}

/// A checker with region 1 ([, g) on nodes 1-3) aligning with region 2
/// ([g, ) on nodes 2-4), and both heartbeats.
fn aligning(cfg: ScheduleConfig) -> (MergeChecker, RegionHeartbeat, RegionHeartbeat) {
    let c = MergeChecker::new(&cfg);
    let a = hb(&region(1, b"", b"g", 1, &[1, 2, 3]));
    let b = hb(&region(2, b"g", b"", 1, &[2, 3, 4]));
    assert_eq!(decide(&c, &a, &b), align(1, 4));
    (c, a, b)
}

#[test]
fn an_alignment_stops_when_the_target_changes_or_grows() {
    // The target grows (its own heartbeat says so).
    let (c, _, mut b) = aligning(config());
    b.approximate_keys = 101;
    c.observe(&b);
    assert_eq!((c.aligning(1), c.in_flight()), (None, 0));
    // Both together too big: the source's latest size and the target's.
    let (c, mut a, mut b) = aligning(config());
    a.approximate_keys = 60;
    c.observe(&a);
    assert_eq!(c.aligning(1), Some(2));
    b.approximate_keys = 50;
    c.observe(&b);
    assert_eq!(c.aligning(1), None);
    // The source grows.
    let (c, mut a, _) = aligning(config());
    a.approximate_size = 1001;
    c.observe(&a);
    assert_eq!(c.aligning(1), None);
    // The target split (new version, narrower range).
    let (c, _, _) = aligning(config());
    c.observe(&hb(&region(2, b"g", b"k", 2, &[2, 3, 4])));
    assert_eq!(c.aligning(1), None);
    // The target merged into its right neighbour: another region is the
    // source's right neighbour now.
    let (c, a, _) = aligning(config());
    let other = hb(&region(3, b"g", b"", 2, &[2, 3, 4]));
    c.observe(&other);
    assert_eq!(c.aligning(1), Some(2));
    assert_eq!(
        c.decide(&a, Some(known(&other)), &|id| id == 1, &one_to_four),
        None
    );
    assert_eq!(c.aligning(1), None);
    // The source split.
    let (c, _, _) = aligning(config());
    c.observe(&hb(&region(1, b"", b"c", 2, &[1, 2, 3, 4])));
    assert_eq!(c.aligning(1), None);
    // No move started for balance_move_timeout.
    let (c, a, _) = aligning(ScheduleConfig {
        balance_move_timeout: Duration::from_millis(50),
        ..config()
    });
    std::thread::sleep(Duration::from_millis(80));
    c.observe(&a);
    assert_eq!(c.aligning(1), None);
}

#[test]
fn an_alignment_waits_while_a_region_is_busy_or_unhealthy() {
    let (c, a, b) = aligning(config());
    let pending = RegionHeartbeat {
        pending_peers: vec![b.region.peers[1]],
        ..b.clone()
    };
    assert_eq!(decide(&c, &a, &pending), None);
    c.observe(&b);
    assert_eq!(
        c.decide(&a, Some(known(&b)), &|id| id == 2, &one_to_four),
        None
    );
    // No move possible now (e.g. the target's new node is not up).
    c.observe(&b);
    assert_eq!(c.decide(&a, Some(known(&b)), &idle, &|_| None), None);
    assert_eq!(c.aligning(1), Some(2));
    assert_eq!(decide(&c, &a, &b), align(1, 4));
}

// ---- On a simulated cluster ----

/// Merging at once regions of at most 10 keys / 1000 bytes (the simulator
/// reports a key per 100 bytes), `merge_limit` at a time, with the given
/// balance limits.
fn scheduler(merge_limit: usize, balance_limit: usize) -> Scheduler {
    Scheduler::new(ScheduleConfig {
        max_merge_region_keys: 10,
        max_merge_region_size: 1000,
        split_merge_interval: Duration::ZERO,
        merge_limit,
        leader_balance_limit: balance_limit,
        region_balance_limit: balance_limit,
        ..Default::default()
    })
}

/// "add 4", "promote 4", "leader to 2", "remove 1", "merge into 2".
fn describe(op: &RegionOperator) -> String {
    match op {
        RegionOperator::AddLearner(p) => format!("add {}", p.node_id),
        RegionOperator::PromoteLearner(p) => format!("promote {}", p.node_id),
        RegionOperator::RemovePeer(p) => format!("remove {}", p.node_id),
        RegionOperator::TransferLeader(p) => format!("leader to {}", p.node_id),
        RegionOperator::Merge { target } => format!("merge into {}", target.id),
        RegionOperator::Split { .. } => format!("{op:?}"),
    }
}

/// Heartbeats regions 2 then 1 until region 1 is gone or `rounds` pass;
/// returns region 1's steps.
fn run_source(sim: &Sim, s: &Scheduler, rounds: usize) -> Vec<String> {
    let mut steps = Vec::new();
    for _ in 0..rounds {
        sim.heartbeat(s, 2);
        if !sim.exists(1) {
            break;
        }
        if let Some(op) = sim.heartbeat(s, 1) {
            steps.push(describe(&op));
        }
    }
    steps
}

#[test]
fn neighbours_on_different_nodes_are_aligned_then_merged() {
    // 5 nodes; region 1 on nodes 1-3 led from node 3, region 2 on 3-5.
    let sim = Sim::new(&[1, 2, 3, 4, 5], 2, &[1, 2, 3], 1, |_| 100);
    sim.relocate(1, &[1, 2, 3], 3);
    sim.relocate(2, &[3, 4, 5], 3);
    let s = scheduler(1, 0);
    let steps = run_source(&sim, &s, 30);
    // Two moves (learner, promotion, removal of a replica off the
    // target's nodes), then the merge; quorum (3 voters) at every step.
    assert_eq!(steps.len(), 7, "{steps:?}");
    assert_eq!(steps.last().map(String::as_str), Some("merge into 2"));
    assert_eq!(steps.iter().filter(|s| s.starts_with("add ")).count(), 2);
    assert_eq!(sim.region_ids(), vec![2]);
    assert_eq!(sim.nodes_of(2), vec![3, 4, 5]);
    assert_eq!(sim.region(2).start_key, Vec::<u8>::new());
    sim.settle(&s, 10);
    assert_eq!(s.merges.in_flight(), 0);
    assert_eq!(s.moves.in_flight(), (0, 0));
}

#[test]
fn a_leader_off_the_target_hands_over_before_its_replica_goes() {
    // Region 1 on nodes 1-3 led from node 1; region 2 on nodes 2-4: only
    // the leader's node is not the target's.
    let sim = Sim::new(&[1, 2, 3, 4, 5], 2, &[1, 2, 3], 1, |_| 100);
    sim.relocate(2, &[2, 3, 4], 2);
    let s = scheduler(1, 0);
    let steps = run_source(&sim, &s, 20);
    let new_leader = steps.get(2).cloned().unwrap_or_default();
    assert!(
        matches!(
            new_leader.as_str(),
            "leader to 2" | "leader to 3" | "leader to 4"
        ),
        "{steps:?}"
    );
    assert_eq!(
        steps,
        vec![
            "add 4".to_owned(),
            "promote 4".to_owned(),
            new_leader,
            "remove 1".to_owned(),
            "merge into 2".to_owned(),
        ]
    );
    assert_eq!(sim.region_ids(), vec![2]);
}

#[test]
fn balance_and_alignment_converge_without_ping_pong() {
    // 12 regions of 400 bytes alternating between nodes 1-3 and 3-5, all
    // led from node 3: neighbours merge in pairs (a third would be too
    // big) while balance spreads replicas and leaders. Balance must leave
    // a region alone while it aligns (or it moves the replica back) and the
    // merge checker must leave a region alone while balance moves it.
    let sim = Sim::new(&[1, 2, 3, 4, 5], 12, &[1, 2, 3], 3, |_| 400);
    for id in (2..=12).step_by(2) {
        sim.relocate(id, &[3, 4, 5], 3);
    }
    let s = scheduler(4, 4);
    let rounds = sim.settle(&s, 150);
    let ids = sim.region_ids();
    let sizes: Vec<u64> = ids.iter().map(|id| sim.size(*id)).collect();
    assert_eq!(sizes.iter().sum::<u64>(), 12 * 400, "{sizes:?}");
    // Merged as far as the limits allow: no two neighbours fit together.
    assert!(
        sizes.windows(2).all(|w| w[0] + w[1] > 1000),
        "after {rounds} rounds: {sizes:?}"
    );
    assert!(ids.len() <= 8, "{sizes:?}");
    for id in &ids {
        assert_eq!(sim.region(*id).peers.len(), 3, "region {id}");
    }
    // Balanced, as balance alone leaves it (see balance_tests).
    let total = ids.len() as u64 * 3;
    let replicas: Vec<u64> = (1..=5).map(|n| sim.load(n).replicas).collect();
    let leaders: Vec<u64> = (1..=5).map(|n| sim.load(n).leaders).collect();
    assert_eq!(replicas.iter().sum::<u64>(), total);
    let within = |v: &[u64], even: u64| {
        v.iter()
            .all(|x| (even.saturating_sub(1)..=even + 1).contains(x))
    };
    assert!(within(&replicas, total / 5), "replicas {replicas:?}");
    assert!(
        within(&leaders, ids.len() as u64 / 5),
        "leaders {leaders:?}"
    );
    // Quiet, nothing in flight.
    for _ in 0..3 {
        assert_eq!(sim.round(&s), 0);
    }
    assert_eq!(s.merges.in_flight(), 0);
    assert_eq!(s.moves.in_flight(), (0, 0));
}

#[test]
fn a_target_that_grows_stops_the_alignment() {
    let sim = Sim::new(&[1, 2, 3, 4, 5], 2, &[1, 2, 3], 1, |_| 100);
    sim.relocate(2, &[3, 4, 5], 3);
    let s = scheduler(1, 0);
    sim.heartbeat(&s, 2);
    let first = sim.heartbeat(&s, 1).map(|op| describe(&op));
    assert_eq!(first.as_deref(), Some("add 4"));
    assert_eq!(s.merges.aligning(1), Some(2));
    // The target grew past the size limit: its next heartbeat says so.
    sim.set_size(2, 2000);
    sim.heartbeat(&s, 2);
    assert_eq!(s.merges.aligning(1), None);
    assert_eq!(s.merges.in_flight(), 0);
    // The move under way finishes (placement carries it on); no other.
    sim.settle(&s, 20);
    assert_eq!(sim.region_ids(), vec![1, 2]);
    assert_eq!(sim.nodes_of(1), vec![1, 3, 4]);
    assert_eq!(s.moves.in_flight(), (0, 0));
}
