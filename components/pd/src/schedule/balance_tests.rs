//! Leader and region balance on a simulated cluster ([`super::sim`]):
//! convergence, quorum at every step, the in-flight limits, which replica
//! a move removes, node removal and splits while balancing.

use proto::metapb::NodeState;

use super::sim::Sim;
use super::{ScheduleConfig, Scheduler};
use crate::client::RegionOperator;

fn scheduler(leader_limit: usize, region_limit: usize) -> Scheduler {
    Scheduler::new(ScheduleConfig {
        leader_balance_limit: leader_limit,
        region_balance_limit: region_limit,
        ..Default::default()
    })
}

/// (leaders, replicas) of each of `nodes`.
fn counts(sim: &Sim, nodes: &[u64]) -> (Vec<u64>, Vec<u64>) {
    nodes
        .iter()
        .map(|n| (sim.load(*n).leaders, sim.load(*n).replicas))
        .unzip()
}

fn assert_within(values: &[u64], low: u64, high: u64, what: &str) {
    assert!(
        values.iter().all(|v| (low..=high).contains(v)),
        "{what} not within {low}..={high}: {values:?}"
    );
}

#[test]
fn leaders_and_replicas_spread_from_one_node_and_stay_put() {
    // 64 regions on nodes 1-3, all led from node 1; node 4 is new.
    let sim = Sim::new(&[1, 2, 3, 4], 64, &[1, 2, 3], 1, |id| id * 1000);
    let s = scheduler(4, 4);
    sim.settle(&s, 300);
    let (leaders, replicas) = counts(&sim, &[1, 2, 3, 4]);
    assert_within(&leaders, 15, 17, "leaders");
    assert_within(&replicas, 47, 49, "replicas");
    for id in sim.region_ids() {
        assert_eq!(sim.region(id).peers.len(), 3, "region {id}");
    }
    // Balanced: nothing more to do, and nothing in flight.
    for _ in 0..3 {
        assert_eq!(sim.round(&s), 0);
    }
    assert_eq!(s.moves.in_flight(), (0, 0));
}

#[test]
fn leaders_spread_over_nodes_holding_every_region() {
    let sim = Sim::new(&[1, 2, 3], 30, &[1, 2, 3], 2, |_| 0);
    let s = scheduler(4, 4);
    sim.settle(&s, 100);
    let (leaders, replicas) = counts(&sim, &[1, 2, 3]);
    assert_eq!(leaders, vec![10, 10, 10]);
    assert_eq!(replicas, vec![30, 30, 30]);
}

#[test]
fn moves_in_flight_are_limited() {
    let sim = Sim::new(&[1, 2, 3, 4], 32, &[1, 2, 3], 1, |_| 0);
    let s = scheduler(2, 3);
    // Heartbeats whose steps are not carried out: each region is answered
    // the same step again, and only the limits' worth are started.
    let mut transfers = 0;
    let mut adds = 0;
    for id in sim.region_ids() {
        let hb = crate::client::RegionHeartbeat {
            region: sim.region(id),
            leader: sim.leader(id),
            ..Default::default()
        };
        for _ in 0..2 {
            match futures::executor::block_on(s.schedule(&sim, &hb)).expect("schedule") {
                Some(RegionOperator::TransferLeader(_)) => transfers += 1,
                Some(RegionOperator::AddLearner(_)) => adds += 1,
                None => {}
                Some(op) => panic!("unexpected {op:?}"),
            }
        }
    }
    assert_eq!((transfers, adds), (2 * 2, 3 * 2));
    assert_eq!(s.moves.in_flight(), (2, 3));

    // Limits of 0 turn balancing off.
    let s = scheduler(0, 0);
    assert_eq!(sim.round(&s), 0);
}

#[test]
fn a_move_removes_its_source_replica_not_the_most_loaded_one() {
    // Three regions on nodes 1-3 led from node 1; node 4 is empty. The
    // move takes the replica on node 3 (a non-leader among equals); once
    // it started, node 3 counts one replica fewer, so "the most loaded
    // voter" would be node 2's: the move must still remove node 3's.
    let sim = Sim::new(&[1, 2, 3, 4], 3, &[1, 2, 3], 1, |_| 0);
    let s = scheduler(0, 1);
    let mut steps = Vec::new();
    while let Some(op) = sim.heartbeat(&s, 1) {
        steps.push(op);
    }
    // The learner is pending on its first heartbeat.
    let steps: Vec<String> = steps
        .iter()
        .map(|op| match op {
            RegionOperator::AddLearner(p) => format!("add {}", p.node_id),
            RegionOperator::PromoteLearner(p) => format!("promote {}", p.node_id),
            RegionOperator::RemovePeer(p) => format!("remove {}", p.node_id),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(steps, ["add 4"]);
    while let Some(op) = sim.heartbeat(&s, 1) {
        match op {
            RegionOperator::PromoteLearner(p) => assert_eq!(p.node_id, 4),
            RegionOperator::RemovePeer(p) => assert_eq!(p.node_id, 3),
            other => panic!("unexpected {other:?}"),
        }
    }
    let nodes: Vec<u64> = sim.region(1).peers.iter().map(|p| p.node_id).collect();
    assert_eq!(nodes, vec![1, 2, 4]);
    assert_eq!(s.moves.in_flight(), (0, 0));
}

#[test]
fn a_source_that_leads_hands_over_before_it_goes() {
    // One voter per region: every region's only replica (its leader) is on
    // node 1, so a move's source is always the leader.
    let sim = Sim::new(&[1, 2, 3], 4, &[1], 1, |_| 0);
    let s = Scheduler::new(ScheduleConfig {
        max_replicas: 1,
        region_balance_limit: 1,
        ..Default::default()
    });
    let mut steps = Vec::new();
    while let Some(op) = sim.heartbeat(&s, 1).or_else(|| sim.heartbeat(&s, 1)) {
        steps.push(op);
    }
    let new = sim.region(1).peers[0];
    assert_eq!(new.node_id, 2);
    assert_eq!(
        steps,
        vec![
            RegionOperator::AddLearner(metapb_learner(new.id, 2)),
            RegionOperator::PromoteLearner(metapb_learner(new.id, 2)),
            RegionOperator::TransferLeader(new),
            RegionOperator::RemovePeer(sim_peer(1, 1)),
        ]
    );
    // The rest spreads too: 4 regions over 3 nodes.
    sim.settle(&s, 50);
    let (leaders, replicas) = counts(&sim, &[1, 2, 3]);
    assert_within(&replicas, 1, 2, "replicas");
    assert_eq!(leaders, replicas);
}

fn metapb_learner(id: u64, node_id: u64) -> proto::metapb::Peer {
    proto::metapb::Peer {
        id,
        node_id,
        role: proto::metapb::PeerRole::Learner as i32,
    }
}

fn sim_peer(region: u64, node_id: u64) -> proto::metapb::Peer {
    proto::metapb::Peer {
        id: region * 100 + node_id,
        node_id,
        role: proto::metapb::PeerRole::Voter as i32,
    }
}

#[test]
fn a_removed_node_is_drained_and_balance_continues_without_it() {
    let sim = Sim::new(&[1, 2, 3, 4], 24, &[1, 2, 3], 1, |_| 0);
    let s = scheduler(4, 4);
    sim.settle(&s, 200);
    assert_eq!(counts(&sim, &[1, 2, 3, 4]).1, vec![18, 18, 18, 18]);

    sim.set_node_state(4, NodeState::Offline);
    sim.settle(&s, 200);
    assert_eq!(sim.load(4), Default::default());
    assert!(sim
        .region_ids()
        .iter()
        .all(|id| sim.region(*id).peers.iter().all(|p| p.node_id != 4)));
    let (leaders, replicas) = counts(&sim, &[1, 2, 3]);
    assert_eq!(replicas, vec![24, 24, 24]);
    assert_within(&leaders, 7, 9, "leaders");
    // Tombstoned once empty (by the scheduler, through the view).
    let tombstoned = futures::executor::block_on(super::ClusterView::nodes(&sim))
        .expect("nodes")
        .into_iter()
        .find(|n| n.id == 4)
        .map(|n| n.state);
    assert_eq!(tombstoned, Some(NodeState::Tombstone));
}

#[test]
fn splits_while_balancing_keep_counters_and_converge() {
    let sim = Sim::new(&[1, 2, 3, 4, 5], 10, &[1, 2, 3], 1, |_| 0);
    let s = scheduler(4, 4);
    for round in 0..6u64 {
        sim.round(&s);
        // Split two regions per round; the new ones start on the same
        // nodes, led from the same node (moves may be under way).
        // Split regions 1 ([, k0001)) and 2 ([k0001, k0002)) each round,
        // at a key below the last one; the right halves are new regions on
        // the same nodes, led from the same node, moves maybe under way.
        let down = 9 - round;
        sim.split(1, format!("a{down}").as_bytes(), 1000 + round * 10);
        sim.split(2, format!("k0001/{down}").as_bytes(), 1001 + round * 10);
    }
    sim.settle(&s, 300);
    let total = sim.region_ids().len() as u64 * 3;
    let (leaders, replicas) = counts(&sim, &[1, 2, 3, 4, 5]);
    assert_eq!(replicas.iter().sum::<u64>(), total);
    let even = total / 5;
    assert_within(&replicas, even.saturating_sub(1), even + 1, "replicas");
    let even = sim.region_ids().len() as u64 / 5;
    assert_within(&leaders, even, even + 1, "leaders");
}

#[test]
fn few_regions_on_more_nodes_settle() {
    // Replicas that do not divide evenly over the nodes: balance must
    // stop within ±1 of even rather than move replicas around for ever.
    for (nodes, regions) in [(5, 6), (5, 9), (4, 6), (5, 14)] {
        let ids: Vec<u64> = (1..=nodes).collect();
        let sim = Sim::new(&ids, regions, &[1, 2, 3], 1, |_| 800);
        let s = scheduler(4, 4);
        sim.settle(&s, 100);
        let (leaders, replicas) = counts(&sim, &ids);
        let even = regions * 3 / nodes;
        assert_within(&replicas, even.saturating_sub(1), even + 1, "replicas");
        assert_eq!(replicas.iter().sum::<u64>(), regions * 3);
        assert_eq!(leaders.iter().sum::<u64>(), regions);
    }
}
