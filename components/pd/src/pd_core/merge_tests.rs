//! Merge requests and the merge checker, through a single-member
//! [`PdCore`]: validation, hand-out with heartbeat responses, settling.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use proto::metapb;

use super::tests::{leader_of, node, peer, region, split_three};
use super::{PdConfig, PdCore};
use crate::client::{PdError, RegionHeartbeat, RegionOperator};
use crate::operators::{SOURCE_MERGE_CHECKER, SOURCE_MERGE_REQUEST, SOURCE_PLACEMENT};
use crate::schedule::ScheduleConfig;

/// A bootstrapped PD on nodes 1 and 2 (the test regions' nodes) placing
/// `max_replicas` voters, without balancing, with `schedule` for the rest.
async fn open(dir: &Path, max_replicas: usize, schedule: ScheduleConfig) -> Arc<PdCore> {
    let mut cfg = PdConfig::new(dir);
    cfg.schedule = ScheduleConfig {
        max_replicas,
        leader_balance_limit: 0,
        region_balance_limit: 0,
        ..schedule
    };
    let pd = PdCore::open(cfg).expect("open PD");
    pd.bootstrap(node(1), region(1, b"", b"", 1, 1))
        .await
        .expect("bootstrap");
    pd.put_node(node(2)).await.expect("put node");
    pd
}

/// Merge requests only: the checker is off.
fn requests_only() -> ScheduleConfig {
    ScheduleConfig {
        merge_limit: 0,
        ..Default::default()
    }
}

/// The checker merging at once regions of at most 100 keys and 1000 bytes,
/// one merge at a time.
fn eager_checker() -> ScheduleConfig {
    ScheduleConfig {
        max_merge_region_keys: 100,
        max_merge_region_size: 1000,
        split_merge_interval: Duration::ZERO,
        merge_limit: 1,
        ..Default::default()
    }
}

fn hb(r: &metapb::Region) -> RegionHeartbeat {
    sized(r, 10, 100)
}

fn sized(r: &metapb::Region, keys: u64, size: u64) -> RegionHeartbeat {
    RegionHeartbeat {
        region: r.clone(),
        leader: leader_of(r),
        approximate_keys: keys,
        approximate_size: size,
        ..Default::default()
    }
}

fn merge(target: &metapb::Region) -> Option<RegionOperator> {
    Some(RegionOperator::Merge {
        target: target.clone(),
    })
}

fn three() -> (metapb::Region, metapb::Region, metapb::Region) {
    (
        region(1, b"", b"g", 1, 3),
        region(2, b"g", b"p", 1, 3),
        region(3, b"p", b"", 1, 3),
    )
}

fn invalid(r: Result<impl std::fmt::Debug, PdError>) -> String {
    match r {
        Err(PdError::InvalidArgument(m)) => m,
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merge_requests_are_validated_and_ordered_left_into_right() {
    let dir = tempfile::tempdir().unwrap();
    let fresh = PdCore::open(PdConfig::new(dir.path())).unwrap();
    assert_eq!(
        fresh.merge_regions(1, 2).await.unwrap_err(),
        PdError::NotBootstrapped
    );
    drop(fresh);

    let dir = tempfile::tempdir().unwrap();
    let pd = open(dir.path(), 2, requests_only()).await;
    split_three(&pd).await;
    let (r1, r2, r3) = three();

    for (a, b) in [(1, 9), (9, 1), (9, 9)] {
        assert_eq!(
            pd.merge_regions(a, b).await.unwrap_err(),
            PdError::RegionNotFound("region 9 not found".into())
        );
    }
    assert_eq!(
        invalid(pd.merge_regions(2, 2).await),
        "cannot merge region 2 into itself"
    );
    assert_eq!(
        invalid(pd.merge_regions(1, 3).await),
        "regions 1 and 3 are not adjacent"
    );
    assert!(pd.operators().await.unwrap().is_empty());

    // The target given is the source's left neighbour: swapped.
    let (source, target) = pd.merge_regions(3, 2).await.unwrap();
    assert_eq!((&source.region, &target.region), (&r2, &r3));
    assert_eq!(source.leader, Some(leader_of(&r2)));
    let (source, target) = pd.merge_regions(1, 2).await.unwrap();
    assert_eq!((&source.region, &target.region), (&r1, &r2));
    let listed: Vec<(u64, String)> = pd
        .operators()
        .await
        .unwrap()
        .into_iter()
        .map(|o| (o.region_id, o.source))
        .collect();
    assert_eq!(
        listed,
        vec![
            (1, SOURCE_MERGE_REQUEST.to_owned()),
            (2, SOURCE_MERGE_REQUEST.to_owned())
        ]
    );

    // Region 3 moved a replica to node 3: not co-located with region 2.
    pd.put_node(node(3)).await.unwrap();
    let mut moved = region(3, b"p", b"", 2, 3);
    moved.peers[1] = peer(33, 3);
    pd.region_heartbeat(moved.clone(), leader_of(&moved))
        .await
        .unwrap();
    let m = invalid(pd.merge_regions(2, 3).await);
    assert!(
        m.starts_with(
            "the replicas of regions 2 and 3 are not on the same nodes; region 2 is on \
             nodes [1, 2], region 3 on nodes [1, 3]"
        ),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requested_merge_goes_to_the_source_until_it_merged() {
    let dir = tempfile::tempdir().unwrap();
    let pd = open(dir.path(), 2, requests_only()).await;
    split_three(&pd).await;
    let (r1, r2, r3) = three();
    pd.merge_regions(2, 1).await.unwrap();

    // Not handed to the target or another region.
    assert_eq!(pd.handle_region_heartbeat(hb(&r2)).await.unwrap(), None);
    assert_eq!(pd.handle_region_heartbeat(hb(&r3)).await.unwrap(), None);
    // To the source, on every heartbeat, with PD's latest target meta.
    assert_eq!(
        pd.handle_region_heartbeat(hb(&r1)).await.unwrap(),
        merge(&r2)
    );
    let r2_newer = region(2, b"g", b"p", 2, 3);
    assert_eq!(
        pd.handle_region_heartbeat(hb(&r2_newer)).await.unwrap(),
        None
    );
    assert_eq!(
        pd.handle_region_heartbeat(hb(&r1)).await.unwrap(),
        merge(&r2_newer)
    );
    let ops = pd.operators().await.unwrap();
    assert_eq!(ops.len(), 1, "{ops:?}");
    assert_eq!(
        (
            ops[0].region_id,
            ops[0].source.as_str(),
            Some(ops[0].op.clone())
        ),
        (1, SOURCE_MERGE_REQUEST, merge(&r2_newer))
    );

    // The merge happened: region 2 took [, p) with a newer version, region
    // 1 is obsolete and gone from PD's map.
    let merged = region(2, b"", b"p", 2, 4);
    assert_eq!(pd.handle_region_heartbeat(hb(&merged)).await.unwrap(), None);
    assert_eq!(pd.get_region_by_id(1).await.unwrap(), None);
    assert!(pd.operators().await.unwrap().is_empty());
    // A late heartbeat of the old source is stale: nothing handed out.
    assert_eq!(pd.handle_region_heartbeat(hb(&r1)).await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requested_merge_dropped_when_the_neighbour_changed_or_expired() {
    let dir = tempfile::tempdir().unwrap();
    let pd = open(dir.path(), 2, requests_only()).await;
    split_three(&pd).await;
    let (r1, _, _) = three();
    pd.merge_regions(1, 2).await.unwrap();
    // Region 2 merged into region 3 first: 3 now starts at g.
    let r3_wide = region(3, b"g", b"", 1, 4);
    assert_eq!(
        pd.handle_region_heartbeat(hb(&r3_wide)).await.unwrap(),
        None
    );
    assert_eq!(pd.handle_region_heartbeat(hb(&r1)).await.unwrap(), None);
    assert!(pd.operators().await.unwrap().is_empty());

    let dir = tempfile::tempdir().unwrap();
    let pd = open(
        dir.path(),
        2,
        ScheduleConfig {
            merge_timeout: Duration::ZERO,
            ..requests_only()
        },
    )
    .await;
    split_three(&pd).await;
    pd.merge_regions(1, 2).await.unwrap();
    assert_eq!(pd.handle_region_heartbeat(hb(&r1)).await.unwrap(), None);
    assert!(pd.operators().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_placement_goes_before_a_requested_merge() {
    let dir = tempfile::tempdir().unwrap();
    let pd = open(dir.path(), 3, requests_only()).await;
    split_three(&pd).await;
    pd.put_node(node(3)).await.unwrap();
    let (r1, r2, _) = three();
    pd.merge_regions(1, 2).await.unwrap();
    match pd.handle_region_heartbeat(hb(&r1)).await.unwrap() {
        Some(RegionOperator::AddLearner(p)) => assert_eq!(p.node_id, 3),
        other => panic!("expected a learner on node 3, got {other:?}"),
    }
    let sources: Vec<String> = pd
        .operators()
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.source)
        .collect();
    assert_eq!(sources, vec![SOURCE_MERGE_REQUEST, SOURCE_PLACEMENT]);
    // Still waiting: r2 is the right neighbour all along.
    assert_eq!(pd.operators().await.unwrap()[0].op, merge(&r2).unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checker_merges_small_settled_neighbours() {
    let dir = tempfile::tempdir().unwrap();
    let pd = open(dir.path(), 2, eager_checker()).await;
    split_three(&pd).await;
    let (r1, r2, r3) = three();
    // Region 1 is heard first: its neighbour's clock has not started.
    assert_eq!(pd.handle_region_heartbeat(hb(&r1)).await.unwrap(), None);
    // Region 3 reaches the end of the keyspace: nothing to its right.
    assert_eq!(pd.handle_region_heartbeat(hb(&r3)).await.unwrap(), None);
    // Region 2 merges into 3, and takes the one merge allowed.
    assert_eq!(
        pd.handle_region_heartbeat(hb(&r2)).await.unwrap(),
        merge(&r3)
    );
    assert_eq!(pd.handle_region_heartbeat(hb(&r1)).await.unwrap(), None);
    // Repeated to the source like any step.
    assert_eq!(
        pd.handle_region_heartbeat(hb(&r2)).await.unwrap(),
        merge(&r3)
    );
    let ops = pd.operators().await.unwrap();
    assert_eq!(
        ops.iter()
            .map(|o| (o.region_id, o.source.as_str()))
            .collect::<Vec<_>>(),
        vec![(2, SOURCE_MERGE_CHECKER)]
    );
    // The checker's merge in flight, as `metastore-ctl scheduler` shows it
    // (same nodes: no alignment, no replica move).
    let in_flight: Vec<(u64, u64, bool, u64)> = pd
        .scheduling_status()
        .await
        .unwrap()
        .merges_in_flight
        .into_iter()
        .map(|m| (m.source_id, m.target_id, m.aligning, m.replica_moves))
        .collect();
    assert_eq!(in_flight, vec![(2, 3, false, 0)]);

    // Done: region 3 took [g, ), region 2 is gone. Region 1 merges next.
    let r3_wide = region(3, b"g", b"", 1, 4);
    assert_eq!(
        pd.handle_region_heartbeat(hb(&r3_wide)).await.unwrap(),
        None
    );
    assert_eq!(
        pd.handle_region_heartbeat(hb(&r1)).await.unwrap(),
        merge(&r3_wide)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checker_leaves_big_or_busy_regions_alone() {
    let dir = tempfile::tempdir().unwrap();
    let pd = open(dir.path(), 2, eager_checker()).await;
    split_three(&pd).await;
    let (r1, r2, _) = three();
    let both = |a: RegionHeartbeat, b: RegionHeartbeat| {
        let pd = pd.clone();
        async move {
            pd.handle_region_heartbeat(b).await.unwrap();
            pd.handle_region_heartbeat(a).await.unwrap()
        }
    };
    // Each small, but too many keys together; then too many bytes.
    assert_eq!(both(sized(&r1, 60, 10), sized(&r2, 50, 10)).await, None);
    assert_eq!(both(sized(&r1, 10, 600), sized(&r2, 10, 500)).await, None);
    // One of them too big.
    assert_eq!(both(sized(&r1, 101, 10), sized(&r2, 0, 0)).await, None);
    assert_eq!(both(sized(&r1, 0, 0), sized(&r2, 0, 1001)).await, None);
    // The target reports a pending peer.
    let pending = RegionHeartbeat {
        pending_peers: vec![r2.peers[1]],
        ..hb(&r2)
    };
    assert_eq!(both(hb(&r1), pending).await, None);
    // An operator asked to split the target.
    pd.split_region(b"k").await.unwrap();
    assert_eq!(both(hb(&r1), hb(&r2)).await, None);

    // Within limits, nothing else under way: merged.
    let dir = tempfile::tempdir().unwrap();
    let pd = open(dir.path(), 2, eager_checker()).await;
    split_three(&pd).await;
    pd.handle_region_heartbeat(sized(&r2, 50, 500))
        .await
        .unwrap();
    assert_eq!(
        pd.handle_region_heartbeat(sized(&r1, 50, 500))
            .await
            .unwrap(),
        merge(&r2)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checker_waits_for_the_interval_and_can_be_off() {
    let dir = tempfile::tempdir().unwrap();
    let pd = open(
        dir.path(),
        2,
        ScheduleConfig {
            split_merge_interval: Duration::from_millis(300),
            ..eager_checker()
        },
    )
    .await;
    split_three(&pd).await;
    let (r1, r2, _) = three();
    pd.handle_region_heartbeat(hb(&r2)).await.unwrap();
    assert_eq!(pd.handle_region_heartbeat(hb(&r1)).await.unwrap(), None);
    tokio::time::sleep(Duration::from_millis(350)).await;
    // Region 2 split meanwhile (new version): its clock starts again. (The
    // new region 4 is too big to merge with region 2.)
    let r2_split = region(2, b"g", b"k", 1, 4);
    let r4 = region(4, b"k", b"p", 1, 4);
    pd.handle_region_heartbeat(sized(&r4, 101, 0))
        .await
        .unwrap();
    pd.handle_region_heartbeat(hb(&r2_split)).await.unwrap();
    assert_eq!(pd.handle_region_heartbeat(hb(&r1)).await.unwrap(), None);
    tokio::time::sleep(Duration::from_millis(350)).await;
    pd.handle_region_heartbeat(hb(&r2_split)).await.unwrap();
    assert_eq!(
        pd.handle_region_heartbeat(hb(&r1)).await.unwrap(),
        merge(&r2_split)
    );

    for off in [
        ScheduleConfig {
            max_merge_region_keys: 0,
            ..eager_checker()
        },
        ScheduleConfig {
            max_merge_region_size: 0,
            ..eager_checker()
        },
        requests_only(),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let pd = open(dir.path(), 2, off).await;
        split_three(&pd).await;
        pd.handle_region_heartbeat(hb(&r2)).await.unwrap();
        assert_eq!(pd.handle_region_heartbeat(hb(&r1)).await.unwrap(), None);
    }
}
