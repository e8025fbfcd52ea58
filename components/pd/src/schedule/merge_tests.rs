//! The merge checker's conditions, one at a time, on [`MergeChecker`]
//! directly (regions on the same nodes; alignment is in `align_tests`).

use std::time::Duration;

use proto::metapb::{self, PeerRole};

use super::merge::{MergeChecker, Verdict};
use super::ScheduleConfig;
use crate::client::{RegionHeartbeat, RegionOperator, RegionWithLeader};

fn peer(id: u64, node_id: u64, role: PeerRole) -> metapb::Peer {
    metapb::Peer {
        id,
        node_id,
        role: role as i32,
    }
}

/// Region `id` over `[start, end)` at epoch version `version`, with voters
/// on `nodes`.
pub(super) fn region(
    id: u64,
    start: &[u8],
    end: &[u8],
    version: u64,
    nodes: &[u64],
) -> metapb::Region {
    metapb::Region {
        id,
        start_key: start.to_vec(),
        end_key: end.to_vec(),
        region_epoch: Some(metapb::RegionEpoch {
            conf_ver: 1,
            version,
        }),
        peers: nodes
            .iter()
            .map(|n| peer(id * 10 + n, *n, PeerRole::Voter))
            .collect(),
    }
}

pub(super) fn hb(r: &metapb::Region) -> RegionHeartbeat {
    RegionHeartbeat {
        region: r.clone(),
        leader: r.peers[0],
        approximate_keys: 10,
        approximate_size: 100,
        ..Default::default()
    }
}

/// What PD's map says of a region its leader reported with `hb`.
pub(super) fn known(hb: &RegionHeartbeat) -> RegionWithLeader {
    RegionWithLeader {
        region: hb.region.clone(),
        leader: Some(hb.leader),
        approximate_size: hb.approximate_size,
        approximate_keys: hb.approximate_keys,
    }
}

pub(super) fn config() -> ScheduleConfig {
    ScheduleConfig {
        max_merge_region_keys: 100,
        max_merge_region_size: 1000,
        split_merge_interval: Duration::ZERO,
        merge_limit: 2,
        merge_timeout: Duration::from_secs(60),
        ..Default::default()
    }
}

pub(super) fn idle(_: u64) -> bool {
    false
}

/// An alignment move picker with no move to offer.
fn no_move(_: &metapb::Region) -> Option<(u64, u64)> {
    None
}

pub(super) fn merge(target: &metapb::Region) -> Option<Verdict> {
    Some(Verdict::Merge(RegionOperator::Merge {
        target: target.clone(),
    }))
}

/// The checker after both regions' heartbeats, asked for `source`.
fn decide(c: &MergeChecker, source: &RegionHeartbeat, target: &RegionHeartbeat) -> Option<Verdict> {
    c.observe(target);
    c.observe(source);
    c.decide(source, Some(known(target)), &idle, &no_move)
}

#[test]
fn merges_only_into_the_adjacent_right_neighbour() {
    let c = MergeChecker::new(&config());
    let a = hb(&region(1, b"", b"g", 1, &[1, 2, 3]));
    let b = hb(&region(2, b"g", b"p", 1, &[1, 2, 3]));
    let far = hb(&region(3, b"q", b"", 1, &[1, 2, 3]));
    assert_eq!(decide(&c, &b, &far), None);
    // Not to the left either.
    assert_eq!(decide(&c, &b, &a), None);
    c.observe(&b);
    assert_eq!(c.decide(&b, None, &idle, &no_move), None);
    assert_eq!(decide(&c, &a, &b), merge(&b.region));
}

#[test]
fn sizes_each_and_together() {
    for (sk, ss, tk, ts, ok) in [
        (100, 0, 0, 1000, true),
        (50, 500, 50, 500, true),
        (51, 10, 50, 10, false),
        (10, 501, 10, 500, false),
        (101, 0, 0, 0, false),
        (0, 0, 0, 1001, false),
        (u64::MAX, 0, u64::MAX, 0, false),
    ] {
        let c = MergeChecker::new(&config());
        let mut a = hb(&region(1, b"", b"g", 1, &[1]));
        let mut b = hb(&region(2, b"g", b"", 1, &[1]));
        (a.approximate_keys, a.approximate_size) = (sk, ss);
        (b.approximate_keys, b.approximate_size) = (tk, ts);
        assert_eq!(
            decide(&c, &a, &b).is_some(),
            ok,
            "source {sk} keys {ss} bytes, target {tk} keys {ts} bytes"
        );
    }
}

#[test]
fn replicas_on_the_same_nodes_all_voters_healthy_and_led() {
    let a = hb(&region(1, b"", b"g", 1, &[1, 2, 3]));
    let b = hb(&region(2, b"g", b"", 1, &[1, 2, 3]));
    let c = MergeChecker::new(&config());
    let elsewhere = hb(&region(2, b"g", b"", 1, &[1, 2, 4]));
    assert_eq!(decide(&c, &a, &elsewhere), None);
    let fewer = hb(&region(2, b"g", b"", 1, &[1, 2]));
    assert_eq!(decide(&c, &a, &fewer), None);

    let mut learner = b.clone();
    learner.region.peers[2].role = PeerRole::Learner as i32;
    assert_eq!(decide(&c, &a, &learner), None);
    let down = RegionHeartbeat {
        down_peers: vec![b.region.peers[1]],
        ..b.clone()
    };
    assert_eq!(decide(&c, &a, &down), None);
    let pending = RegionHeartbeat {
        pending_peers: vec![a.region.peers[1]],
        ..a.clone()
    };
    assert_eq!(decide(&c, &pending, &b), None);
    // The target's leader is not known to PD.
    c.observe(&b);
    c.observe(&a);
    let unled = RegionWithLeader {
        leader: None,
        ..known(&b)
    };
    assert_eq!(c.decide(&a, Some(unled), &idle, &no_move), None);
    // An operator or a move under way on either.
    assert_eq!(c.decide(&a, Some(known(&b)), &|id| id == 2, &no_move), None);
    assert_eq!(c.decide(&a, Some(known(&b)), &|id| id == 1, &no_move), None);
    assert_eq!(decide(&c, &a, &b), merge(&b.region));
}

#[test]
fn both_versions_settled_for_the_interval() {
    let c = MergeChecker::new(&ScheduleConfig {
        split_merge_interval: Duration::from_millis(200),
        ..config()
    });
    let a = hb(&region(1, b"", b"g", 1, &[1]));
    let b = hb(&region(2, b"g", b"", 1, &[1]));
    // Never heard from the target: no clock.
    c.observe(&a);
    assert_eq!(c.decide(&a, Some(known(&b)), &idle, &no_move), None);
    assert_eq!(decide(&c, &a, &b), None);
    std::thread::sleep(Duration::from_millis(250));
    // PD's map has a newer version of the target than its heartbeats
    // showed so far.
    let b2 = hb(&region(2, b"g", b"", 2, &[1]));
    c.observe(&a);
    assert_eq!(c.decide(&a, Some(known(&b2)), &idle, &no_move), None);
    // Its clock starts with that version.
    assert_eq!(decide(&c, &a, &b2), None);
    std::thread::sleep(Duration::from_millis(250));
    // A new leader of the source: its sizes are not trusted yet.
    let mut a_new_leader = a.clone();
    a_new_leader.region.peers.push(peer(99, 2, PeerRole::Voter));
    a_new_leader.leader = peer(99, 2, PeerRole::Voter);
    let mut b2_too = b2.clone();
    b2_too.region.peers.push(peer(98, 2, PeerRole::Voter));
    assert_eq!(decide(&c, &a_new_leader, &b2_too), None);
    std::thread::sleep(Duration::from_millis(250));
    assert_eq!(decide(&c, &a_new_leader, &b2_too), merge(&b2_too.region));
}

#[test]
fn merges_in_flight_are_limited_and_settle() {
    let c = MergeChecker::new(&config());
    let r: Vec<RegionHeartbeat> = [
        (1, &b""[..], &b"b"[..]),
        (2, b"b", b"c"),
        (3, b"c", b"d"),
        (4, b"d", b"e"),
        (5, b"e", b"f"),
        (6, b"f", b""),
    ]
    .into_iter()
    .map(|(id, s, e)| hb(&region(id, s, e, 1, &[1])))
    .collect();
    assert_eq!(decide(&c, &r[0], &r[1]), merge(&r[1].region));
    // Region 2 is the target of a merge in flight: not a source now.
    assert_eq!(decide(&c, &r[1], &r[2]), None);
    assert_eq!(decide(&c, &r[2], &r[3]), merge(&r[3].region));
    // The limit (2) is reached.
    assert_eq!(decide(&c, &r[4], &r[5]), None);
    assert_eq!(c.in_flight(), 2);

    // Region 2 took region 1's range: done.
    let wide = hb(&region(2, b"", b"c", 2, &[1]));
    c.observe(&wide);
    assert_eq!(c.in_flight(), 1);
    assert!(!c.involves(1) && c.involves(4));
    // Region 3 split instead of merging: its range changed, not in flight.
    let shrunk = hb(&region(3, b"c", b"cc", 2, &[1]));
    c.observe(&shrunk);
    assert_eq!(c.in_flight(), 0);
    // The target's heartbeat that does not cover the source leaves the
    // merge in flight; the timeout ends it.
    let c = MergeChecker::new(&ScheduleConfig {
        merge_timeout: Duration::from_millis(100),
        ..config()
    });
    assert_eq!(decide(&c, &r[0], &r[1]), merge(&r[1].region));
    c.observe(&r[1]);
    assert_eq!(c.in_flight(), 1);
    std::thread::sleep(Duration::from_millis(150));
    c.observe(&r[4]);
    assert_eq!(c.in_flight(), 0);
}

#[test]
fn off_when_a_limit_is_zero() {
    for off in [
        ScheduleConfig {
            max_merge_region_keys: 0,
            ..config()
        },
        ScheduleConfig {
            max_merge_region_size: 0,
            ..config()
        },
        ScheduleConfig {
            merge_limit: 0,
            ..config()
        },
    ] {
        let c = MergeChecker::new(&off);
        assert!(!c.enabled());
        let mut a = hb(&region(1, b"", b"g", 1, &[1]));
        let mut b = hb(&region(2, b"g", b"", 1, &[1]));
        (a.approximate_keys, a.approximate_size) = (0, 0);
        (b.approximate_keys, b.approximate_size) = (0, 0);
        assert_eq!(decide(&c, &a, &b), None);
    }
}
