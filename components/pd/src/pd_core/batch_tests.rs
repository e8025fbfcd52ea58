//! Batched region heartbeats through a single-member [`PdCore`]: one raft
//! proposal for the meta changes of a whole batch, outcomes in request
//! order, and placement, split and balance steps handed out through a
//! batch as through single heartbeats.

use std::path::Path;
use std::sync::Arc;

use proto::metapb;

use super::tests::{leader_of, node, peer, region, split_three};
use super::{HeartbeatStats, PdConfig, PdCore};
use crate::client::{PdError, RegionHeartbeat, RegionOperator};
use crate::operators::SOURCE_LEADER_BALANCE;
use crate::schedule::ScheduleConfig;

/// A bootstrapped PD on nodes `1..=nodes` placing `max_replicas` voters,
/// with leader balance limited to `leader_balance_limit` transfers and
/// region balance off.
async fn open(
    dir: &Path,
    nodes: u64,
    max_replicas: usize,
    leader_balance_limit: usize,
) -> Arc<PdCore> {
    let mut cfg = PdConfig::new(dir);
    cfg.schedule = ScheduleConfig {
        max_replicas,
        leader_balance_limit,
        region_balance_limit: 0,
        ..Default::default()
    };
    let pd = PdCore::open(cfg).expect("open PD");
    pd.bootstrap(node(1), region(1, b"", b"", 1, 1))
        .await
        .expect("bootstrap");
    for id in 2..=nodes {
        pd.put_node(node(id)).await.expect("put node");
    }
    pd
}

fn hb(r: &metapb::Region, size: u64) -> RegionHeartbeat {
    RegionHeartbeat {
        region: r.clone(),
        leader: leader_of(r),
        approximate_size: size,
        approximate_keys: size / 10,
        ..Default::default()
    }
}

/// `n` adjacent regions over the whole keyspace (ids 1..=n, region 1
/// first), as `n - 1` splits of the bootstrap region leave them, each with
/// `peers(id)`.
fn split_into(n: u64, peers: impl Fn(u64) -> Vec<metapb::Peer>) -> Vec<metapb::Region> {
    let key = |i: u64| format!("k{i:03}").into_bytes();
    (1..=n)
        .map(|id| {
            let start = if id == 1 { Vec::new() } else { key(id) };
            let end = if id == n { Vec::new() } else { key(id + 1) };
            metapb::Region {
                id,
                start_key: start,
                end_key: end,
                region_epoch: Some(metapb::RegionEpoch {
                    conf_ver: 1,
                    version: 2,
                }),
                peers: peers(id),
            }
        })
        .collect()
}

/// What happened between two stats snapshots.
fn delta(before: HeartbeatStats, after: HeartbeatStats) -> HeartbeatStats {
    HeartbeatStats {
        batches: after.batches - before.batches,
        heartbeats: after.heartbeats - before.heartbeats,
        meta_proposals: after.meta_proposals - before.meta_proposals,
        proposals: after.proposals - before.proposals,
    }
}

fn stats(batches: u64, heartbeats: u64, proposals: u64) -> HeartbeatStats {
    HeartbeatStats {
        batches,
        heartbeats,
        meta_proposals: proposals,
        proposals,
    }
}

fn assert_loads_consistent(pd: &PdCore) {
    let c = pd.shared.state.read();
    assert_eq!(*c.loads(), c.recount_loads());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_changed_regions_costs_one_proposal() {
    const N: u64 = 40;
    let dir = tempfile::tempdir().unwrap();
    let pd = open(dir.path(), 2, 2, 0).await;
    let regions = split_into(N, |id| vec![peer(id * 10 + 1, 1), peer(id * 10 + 2, 2)]);

    // The split of the bootstrap region into 40, reported in one batch
    // (the parent last, so the new regions overlap the old parent).
    let mut batch: Vec<RegionHeartbeat> = regions.iter().map(|r| hb(r, r.id * 100)).collect();
    batch.rotate_left(1);
    let before = pd.heartbeat_stats();
    let outcomes = pd.handle_region_heartbeats(batch.clone()).await.unwrap();
    assert_eq!(outcomes, vec![Ok(None); N as usize]);
    assert_eq!(delta(before, pd.heartbeat_stats()), stats(1, N, 1));
    let scanned = pd.scan_regions(b"", b"", 0).await.unwrap();
    assert_eq!(scanned.len(), N as usize);
    for (r, found) in regions.iter().zip(&scanned) {
        assert_eq!(found.region, *r);
        assert_eq!(found.leader, Some(leader_of(r)));
        assert_eq!(
            (found.approximate_size, found.approximate_keys),
            (r.id * 100, r.id * 10)
        );
    }
    assert_loads_consistent(&pd);

    // Nothing changed: no proposal at all.
    let before = pd.heartbeat_stats();
    let outcomes = pd.handle_region_heartbeats(batch).await.unwrap();
    assert_eq!(outcomes, vec![Ok(None); N as usize]);
    assert_eq!(delta(before, pd.heartbeat_stats()), stats(1, N, 0));

    // Three changed among unchanged, stale and malformed ones: one
    // proposal, and every outcome in its place.
    let mut changed = Vec::new();
    let mut batch = Vec::new();
    for r in &regions {
        let mut r = r.clone();
        if r.id % 10 == 3 && r.id < 30 {
            r.region_epoch = Some(metapb::RegionEpoch {
                conf_ver: 2,
                version: 2,
            });
            changed.push(r.clone());
        }
        batch.push(hb(&r, 7));
    }
    let stale = region(5, b"k005", b"k006", 1, 1);
    batch.insert(5, hb(&stale, 999));
    let mut malformed = hb(&regions[8], 7);
    malformed.leader = peer(99, 9);
    batch.insert(9, malformed);
    let before = pd.heartbeat_stats();
    let outcomes = pd.handle_region_heartbeats(batch).await.unwrap();
    assert_eq!(outcomes.len(), N as usize + 2);
    for (i, o) in outcomes.iter().enumerate() {
        match i {
            9 => assert!(matches!(o, Err(PdError::InvalidArgument(_))), "{o:?}"),
            _ => assert_eq!(*o, Ok(None), "outcome {i}"),
        }
    }
    assert_eq!(delta(before, pd.heartbeat_stats()), stats(1, N + 2, 1));
    for r in &changed {
        assert_eq!(pd.get_region_by_id(r.id).await.unwrap().unwrap().region, *r);
    }
    // The stale report changed nothing, its size included.
    let five = pd.get_region_by_id(5).await.unwrap().unwrap();
    assert_eq!(
        (five.region.end_key.as_slice(), five.approximate_size),
        (&b"k006"[..], 7)
    );
    assert_loads_consistent(&pd);

    // The batch's meta is stored like any other.
    pd.close().await.unwrap();
    drop(pd);
    let pd = PdCore::open(PdConfig::new(dir.path())).expect("reopen PD");
    let scanned = pd.scan_regions(b"", b"", 0).await.unwrap();
    assert_eq!(scanned.len(), N as usize);
    for r in &changed {
        assert_eq!(pd.get_region_by_id(r.id).await.unwrap().unwrap().region, *r);
    }
    pd.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placement_and_split_steps_come_back_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let pd = open(dir.path(), 3, 2, 0).await;
    split_three(&pd).await; // 1 [, g), 2 [g, p), 3 [p, ) on nodes 1 and 2
    pd.split_region(b"k").await.unwrap();

    // Region 1 gained a caught-up learner on node 3, region 3 a third
    // voter there; region 2 is as it was.
    let mut r1 = region(1, b"", b"g", 2, 3);
    let learner = metapb::Peer {
        id: 13,
        node_id: 3,
        role: metapb::PeerRole::Learner as i32,
    };
    r1.peers.push(learner);
    let r2 = region(2, b"g", b"p", 1, 3);
    let mut r3 = region(3, b"p", b"", 2, 3);
    r3.peers.push(peer(33, 3));
    let mut malformed = hb(&r2, 0);
    malformed.leader = peer(99, 9);
    let stale = region(2, b"g", b"", 1, 2);

    let before = pd.heartbeat_stats();
    let outcomes = pd
        .handle_region_heartbeats(vec![
            hb(&r1, 0),
            malformed,
            hb(&r2, 0),
            hb(&stale, 0),
            hb(&r3, 0),
        ])
        .await
        .unwrap();
    assert_eq!(outcomes.len(), 5);
    assert_eq!(
        outcomes[0],
        Ok(Some(RegionOperator::PromoteLearner(learner)))
    );
    assert!(matches!(outcomes[1], Err(PdError::InvalidArgument(_))));
    assert_eq!(
        outcomes[2],
        Ok(Some(RegionOperator::Split { key: b"k".to_vec() }))
    );
    assert_eq!(outcomes[3], Ok(None), "stale");
    // One voter too many on region 3: a non-leader goes.
    match &outcomes[4] {
        Ok(Some(RegionOperator::RemovePeer(p))) => {
            assert!(r3.peers.contains(p) && *p != leader_of(&r3), "{p:?}")
        }
        other => panic!("expected a removal, got {other:?}"),
    }
    // Regions 1 and 3 changed: one proposal for both.
    assert_eq!(delta(before, pd.heartbeat_stats()), stats(1, 5, 1));
    assert_eq!(pd.get_region_by_id(1).await.unwrap().unwrap().region, r1);
    assert_eq!(pd.get_region_by_id(3).await.unwrap().unwrap().region, r3);
    // The steps are repeated until applied, through batches as well.
    let again = pd
        .handle_region_heartbeats(vec![hb(&r3, 0), hb(&r1, 0)])
        .await
        .unwrap();
    assert_eq!(again, vec![outcomes[4].clone(), outcomes[0].clone()]);
    pd.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_balance_hands_out_transfers_through_a_batch() {
    const N: u64 = 12;
    let dir = tempfile::tempdir().unwrap();
    let pd = open(dir.path(), 3, 3, 4).await;
    // Every region on nodes 1, 2 and 3, all led from node 1.
    let regions = split_into(N, |id| {
        (1..=3).map(|n| peer(id * 10 + n, n)).collect::<Vec<_>>()
    });
    let batch: Vec<RegionHeartbeat> = regions.iter().map(|r| hb(r, 0)).collect();
    let before = pd.heartbeat_stats();
    let outcomes = pd.handle_region_heartbeats(batch).await.unwrap();
    assert_eq!(delta(before, pd.heartbeat_stats()), stats(1, N, 1));

    // At most 4 transfers in flight: the first four regions get one each,
    // spread over nodes 2 and 3 (each counts in the next decision).
    let mut targets = Vec::new();
    for (i, (r, o)) in regions.iter().zip(&outcomes).enumerate() {
        match o {
            Ok(Some(RegionOperator::TransferLeader(p))) if i < 4 => {
                assert!(r.peers.contains(p) && p.node_id != 1, "{p:?}");
                targets.push(p.node_id);
            }
            Ok(None) if i >= 4 => {}
            other => panic!("region {}: {other:?}", r.id),
        }
    }
    targets.sort();
    assert_eq!(targets, [2, 2, 3, 3]);
    let ops = pd.operators().await.unwrap();
    assert_eq!(ops.len(), 4, "{ops:?}");
    assert!(ops.iter().all(|o| o.source == SOURCE_LEADER_BALANCE));
    pd.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_level_errors() {
    let dir = tempfile::tempdir().unwrap();
    let pd = super::tests::open(dir.path(), 1000, 10_000);
    let r = region(1, b"", b"", 1, 1);
    // Before bootstrap the whole batch fails, but a batch with nothing
    // well-formed says what is wrong with each.
    assert_eq!(
        pd.handle_region_heartbeats(vec![hb(&r, 0)]).await,
        Err(PdError::NotBootstrapped)
    );
    let mut malformed = hb(&r, 0);
    malformed.region.region_epoch = None;
    let outcomes = pd.handle_region_heartbeats(vec![malformed]).await.unwrap();
    assert!(matches!(outcomes[..], [Err(PdError::InvalidArgument(_))]));
    assert_eq!(
        pd.handle_region_heartbeats(Vec::new()).await,
        Ok(Vec::new())
    );
    pd.close().await.unwrap();
    assert_eq!(
        pd.handle_region_heartbeats(vec![hb(&r, 0)]).await,
        Err(PdError::Closed)
    );
}
