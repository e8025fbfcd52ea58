//! Split requests and the sizes reported with heartbeats, through a
//! single-member [`PdCore`].

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use proto::metapb;

use super::tests::{leader_of, node, region, split_three};
use super::{PdConfig, PdCore};
use crate::client::{PdError, RegionHeartbeat, RegionOperator};
use crate::operators::{SOURCE_PLACEMENT, SOURCE_SPLIT_REQUEST};
use crate::schedule::ScheduleConfig;

/// A bootstrapped PD on nodes 1 and 2 (the test regions' nodes) placing
/// `max_replicas` voters, and split requests kept for `split_timeout`.
/// Balancing is off: the test regions are all led from node 1.
async fn open(dir: &Path, max_replicas: usize, split_timeout: Duration) -> Arc<PdCore> {
    let mut cfg = PdConfig::new(dir);
    cfg.schedule = ScheduleConfig {
        max_replicas,
        split_timeout,
        leader_balance_limit: 0,
        region_balance_limit: 0,
        ..Default::default()
    };
    let pd = PdCore::open(cfg).expect("open PD");
    pd.bootstrap(node(1), region(1, b"", b"", 1, 1))
        .await
        .expect("bootstrap");
    pd.put_node(node(2)).await.expect("put node");
    pd
}

fn hb(r: &metapb::Region) -> RegionHeartbeat {
    RegionHeartbeat {
        region: r.clone(),
        leader: leader_of(r),
        ..Default::default()
    }
}

fn split(key: &[u8]) -> Option<RegionOperator> {
    Some(RegionOperator::Split { key: key.to_vec() })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_goes_to_the_region_containing_the_key_until_it_happened() {
    let dir = tempfile::tempdir().unwrap();
    let pd = open(dir.path(), 2, Duration::from_secs(60)).await;
    split_three(&pd).await; // 1 [, g), 2 [g, p), 3 [p, )
    let (r1, r2, r3) = (
        region(1, b"", b"g", 1, 3),
        region(2, b"g", b"p", 1, 3),
        region(3, b"p", b"", 1, 3),
    );

    let asked = pd.split_region(b"k").await.unwrap();
    assert_eq!(asked.region, r2);
    assert_eq!(asked.leader, Some(leader_of(&r2)));
    // Not handed to other regions.
    assert_eq!(pd.handle_region_heartbeat(hb(&r1)).await.unwrap(), None);
    assert_eq!(pd.handle_region_heartbeat(hb(&r3)).await.unwrap(), None);
    // Handed to region 2, on every heartbeat until the split shows.
    assert_eq!(
        pd.handle_region_heartbeat(hb(&r2)).await.unwrap(),
        split(b"k")
    );
    assert_eq!(
        pd.handle_region_heartbeat(hb(&r2)).await.unwrap(),
        split(b"k")
    );
    let ops = pd.operators().await.unwrap();
    assert_eq!(ops.len(), 1, "{ops:?}");
    assert_eq!(
        (
            ops[0].region_id,
            ops[0].source.as_str(),
            Some(ops[0].op.clone())
        ),
        (2, SOURCE_SPLIT_REQUEST, split(b"k"))
    );

    // Region 2 split at k: it keeps [g, k), region 4 gets [k, p).
    let left = region(2, b"g", b"k", 1, 4);
    let right = region(4, b"k", b"p", 1, 4);
    assert_eq!(pd.handle_region_heartbeat(hb(&right)).await.unwrap(), None);
    assert_eq!(pd.handle_region_heartbeat(hb(&left)).await.unwrap(), None);
    assert!(pd.operators().await.unwrap().is_empty());
    assert_eq!(pd.get_region(b"k").await.unwrap().unwrap().region, right);
    // Now k starts a region: nothing to split.
    assert!(matches!(
        pd.split_region(b"k").await,
        Err(PdError::InvalidArgument(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_dropped_when_the_region_no_longer_holds_the_key_or_expired() {
    let dir = tempfile::tempdir().unwrap();
    let pd = open(dir.path(), 2, Duration::from_secs(60)).await;
    pd.split_region(b"m").await.unwrap();
    // Region 1 split elsewhere, at f, and kept the left side: m moved out.
    let left = region(1, b"", b"f", 1, 2);
    let right = region(5, b"f", b"", 1, 2);
    assert_eq!(pd.handle_region_heartbeat(hb(&left)).await.unwrap(), None);
    assert_eq!(pd.handle_region_heartbeat(hb(&right)).await.unwrap(), None);
    assert!(pd.operators().await.unwrap().is_empty());

    let dir = tempfile::tempdir().unwrap();
    let pd = open(dir.path(), 2, Duration::ZERO).await;
    pd.split_region(b"m").await.unwrap();
    let whole = region(1, b"", b"", 1, 1);
    assert_eq!(pd.handle_region_heartbeat(hb(&whole)).await.unwrap(), None);
    assert!(pd.operators().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_placement_goes_first() {
    let dir = tempfile::tempdir().unwrap();
    let pd = open(dir.path(), 3, Duration::from_secs(60)).await;
    pd.put_node(node(3)).await.unwrap();
    pd.split_region(b"m").await.unwrap();
    let whole = region(1, b"", b"", 1, 1);
    match pd.handle_region_heartbeat(hb(&whole)).await.unwrap() {
        Some(RegionOperator::AddLearner(p)) => assert_eq!(p.node_id, 3),
        other => panic!("expected a learner on node 3, got {other:?}"),
    }
    // Both listed: the split waits.
    let sources: Vec<String> = pd
        .operators()
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.source)
        .collect();
    assert_eq!(sources, vec![SOURCE_SPLIT_REQUEST, SOURCE_PLACEMENT]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_split_keys_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let fresh = PdCore::open(PdConfig::new(dir.path())).unwrap();
    assert_eq!(
        fresh.split_region(b"k").await.unwrap_err(),
        PdError::NotBootstrapped
    );
    drop(fresh);

    let dir = tempfile::tempdir().unwrap();
    let pd = open(dir.path(), 2, Duration::from_secs(60)).await;
    assert!(matches!(
        pd.split_region(b"").await,
        Err(PdError::InvalidArgument(_))
    ));
    split_three(&pd).await;
    for start in [&b"g"[..], b"p"] {
        assert!(matches!(
            pd.split_region(start).await,
            Err(PdError::InvalidArgument(_))
        ));
    }
    // A hole: region 6 [x, ) replaced region 3 [p, ) before [p, x) reported.
    let r6 = region(6, b"x", b"", 1, 4);
    pd.region_heartbeat(r6.clone(), leader_of(&r6))
        .await
        .unwrap();
    assert!(matches!(
        pd.split_region(b"q").await,
        Err(PdError::RegionNotFound(_))
    ));
    assert!(pd.operators().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approximate_size_and_keys_come_from_the_latest_heartbeat() {
    let dir = tempfile::tempdir().unwrap();
    let pd = open(dir.path(), 2, Duration::from_secs(60)).await;
    let whole = region(1, b"", b"", 1, 1);
    let found = pd.get_region(b"a").await.unwrap().unwrap();
    assert_eq!((found.approximate_size, found.approximate_keys), (0, 0));
    for (size, keys) in [(1 << 20, 1000), (2 << 20, 1500)] {
        pd.handle_region_heartbeat(RegionHeartbeat {
            approximate_size: size,
            approximate_keys: keys,
            ..hb(&whole)
        })
        .await
        .unwrap();
        let by_key = pd.get_region(b"a").await.unwrap().unwrap();
        assert_eq!(
            (by_key.approximate_size, by_key.approximate_keys),
            (size, keys)
        );
        assert_eq!(pd.get_region_by_id(1).await.unwrap(), Some(by_key.clone()));
        assert_eq!(pd.scan_regions(b"", b"", 0).await.unwrap(), vec![by_key]);
    }
}
