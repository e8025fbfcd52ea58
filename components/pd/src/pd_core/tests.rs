use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use proto::metapb;

use super::{PdConfig, PdCore};
use crate::client::PdError;

pub(super) fn open(dir: &Path, id_window: u64, revision_window: i64) -> Arc<PdCore> {
    let mut cfg = PdConfig::new(dir);
    cfg.id_window = id_window;
    cfg.revision_window = revision_window;
    PdCore::open(cfg).expect("open PD")
}

pub(super) fn peer(id: u64, node_id: u64) -> metapb::Peer {
    metapb::Peer {
        id,
        node_id,
        role: metapb::PeerRole::Voter as i32,
    }
}

pub(super) fn region(
    id: u64,
    start: &[u8],
    end: &[u8],
    conf_ver: u64,
    version: u64,
) -> metapb::Region {
    metapb::Region {
        id,
        start_key: start.to_vec(),
        end_key: end.to_vec(),
        region_epoch: Some(metapb::RegionEpoch { conf_ver, version }),
        peers: vec![peer(id * 10 + 1, 1), peer(id * 10 + 2, 2)],
    }
}

pub(super) fn node(id: u64) -> metapb::Node {
    metapb::Node {
        id,
        name: format!("n{id}"),
        peer_urls: vec![format!("http://127.0.0.1:{}", 3000 + id)],
        client_urls: vec![format!("http://127.0.0.1:{}", 4000 + id)],
        state: metapb::NodeState::Up as i32,
    }
}

pub(super) async fn bootstrapped(dir: &Path) -> Arc<PdCore> {
    let pd = open(dir, 1000, 10_000);
    pd.bootstrap(node(1), region(1, b"", b"", 1, 1))
        .await
        .expect("bootstrap");
    pd
}

pub(super) fn leader_of(r: &metapb::Region) -> metapb::Peer {
    r.peers[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_unique_and_increasing_across_clean_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let mut seen = Vec::new();
    let pd = open(dir.path(), 10, 100);
    for _ in 0..25 {
        seen.push(pd.alloc_id().await.unwrap());
    }
    pd.close().await.unwrap();
    assert_eq!(pd.alloc_id().await, Err(PdError::Closed));
    drop(pd);

    let pd = open(dir.path(), 10, 100);
    let next = pd.alloc_id().await.unwrap();
    // A clean close persisted the exact position.
    assert_eq!(next, 26);
    seen.push(next);
    for _ in 0..25 {
        seen.push(pd.alloc_id().await.unwrap());
    }
    assert!(seen[0] > 0);
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_never_reused_after_crash() {
    let dir = tempfile::tempdir().unwrap();
    let mut max = 0;
    // Several crashes, each after crossing at least one persisted window.
    for round in 0..4 {
        let pd = open(dir.path(), 10, 100);
        for i in 0..(7 * round + 3) {
            let id = pd.alloc_id().await.unwrap();
            assert!(id > max, "round {round} alloc {i}: id {id} <= {max}");
            max = id;
        }
        drop(pd); // no close(): a crash
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revisions_fresh_cluster_and_consecutive() {
    let dir = tempfile::tempdir().unwrap();
    let pd = open(dir.path(), 10, 5);
    assert_eq!(pd.current_revision().await.unwrap(), 1);
    assert_eq!(pd.alloc_revisions(1).await.unwrap(), 2);
    assert_eq!(pd.current_revision().await.unwrap(), 2);
    assert_eq!(pd.alloc_revisions(3).await.unwrap(), 3);
    assert_eq!(pd.current_revision().await.unwrap(), 5);
    // Crosses the window of 5 several times.
    let mut expect = 6;
    for n in 1..20u32 {
        assert_eq!(pd.alloc_revisions(n).await.unwrap(), expect);
        expect += i64::from(n);
        assert_eq!(pd.current_revision().await.unwrap(), expect - 1);
    }
    assert!(matches!(
        pd.alloc_revisions(0).await,
        Err(PdError::InvalidArgument(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revisions_clean_reopen_continues_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let pd = open(dir.path(), 10, 1000);
    for _ in 0..17 {
        pd.alloc_revisions(2).await.unwrap();
    }
    let current = pd.current_revision().await.unwrap();
    assert_eq!(current, 1 + 34);
    pd.close().await.unwrap();
    assert_eq!(pd.alloc_revisions(1).await, Err(PdError::Closed));
    drop(pd);

    let pd = open(dir.path(), 10, 1000);
    assert_eq!(pd.current_revision().await.unwrap(), current);
    assert_eq!(pd.alloc_revisions(1).await.unwrap(), current + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revisions_crash_reopen_strictly_greater() {
    let dir = tempfile::tempdir().unwrap();
    let mut last = 1;
    for round in 0..4 {
        let pd = open(dir.path(), 10, 8);
        assert!(
            pd.current_revision().await.unwrap() >= last,
            "current went back"
        );
        for _ in 0..(5 * round + 2) {
            let first = pd.alloc_revisions(3).await.unwrap();
            assert!(first > last, "round {round}: {first} <= {last}");
            last = first + 2;
        }
        drop(pd); // crash
    }
    let pd = open(dir.path(), 10, 8);
    assert!(pd.current_revision().await.unwrap() >= last);
    assert!(pd.alloc_revisions(1).await.unwrap() > last);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_revision_allocations_are_disjoint() {
    let dir = tempfile::tempdir().unwrap();
    let pd = open(dir.path(), 10, 50);
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let pd = pd.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                for i in 0..200u32 {
                    let n = (i + t) % 4 + 1;
                    let first = pd.alloc_revisions(n).await.unwrap();
                    got.extend(first..first + i64::from(n));
                }
                got
            })
        })
        .collect();
    let mut all = HashSet::new();
    let mut total = 0;
    for t in threads {
        for r in t.await.unwrap() {
            total += 1;
            assert!(all.insert(r), "revision {r} handed out twice");
        }
    }
    // Failure-free run: consecutive, no gap.
    assert_eq!(all.len(), total);
    assert_eq!(*all.iter().min().unwrap(), 2);
    assert_eq!(*all.iter().max().unwrap(), 1 + total as i64);
    assert_eq!(pd.current_revision().await.unwrap(), 1 + total as i64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_once() {
    let dir = tempfile::tempdir().unwrap();
    let pd = open(dir.path(), 10, 100);
    assert!(!pd.is_bootstrapped().await.unwrap());
    assert_eq!(pd.get_region(b"a").await, Err(PdError::NotBootstrapped));
    assert_eq!(pd.put_node(node(2)).await, Err(PdError::NotBootstrapped));
    // Ids are available before bootstrap: the bootstrap ids come from here.
    let first_id = pd.alloc_id().await.unwrap();
    assert!(matches!(
        pd.bootstrap(node(1), region(1, b"a", b"", 1, 1)).await,
        Err(PdError::InvalidArgument(_))
    ));
    pd.bootstrap(node(1), region(1, b"", b"", 1, 1))
        .await
        .unwrap();
    assert!(pd.is_bootstrapped().await.unwrap());
    assert_eq!(
        pd.bootstrap(node(9), region(9, b"", b"", 1, 1)).await,
        Err(PdError::AlreadyBootstrapped)
    );
    // The caller-chosen ids (peers 11, 12) are reserved in the allocator.
    assert!(pd.alloc_id().await.unwrap() > 12.max(first_id));
    let cluster_id = pd.cluster_id();
    drop(pd);

    let pd = open(dir.path(), 10, 100);
    assert!(pd.is_bootstrapped().await.unwrap());
    assert_eq!(pd.cluster_id(), cluster_id);
    assert_eq!(
        pd.bootstrap(node(1), region(1, b"", b"", 1, 1)).await,
        Err(PdError::AlreadyBootstrapped)
    );
    assert_eq!(pd.get_node(1).await.unwrap(), Some(node(1)));
    assert_eq!(pd.get_region(b"zz").await.unwrap().unwrap().region.id, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_ids_differ_between_data_dirs() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let pa = open(a.path(), 10, 100);
    let pb = open(b.path(), 10, 100);
    assert_ne!(pa.cluster_id(), 0);
    assert_ne!(pa.cluster_id(), pb.cluster_id());
}

/// Splits region 1 [,) into 1 [, g), 2 [g, p), 3 [p, ).
pub(super) async fn split_three(pd: &PdCore) {
    let r1 = region(1, b"", b"g", 1, 3);
    let r2 = region(2, b"g", b"p", 1, 3);
    let r3 = region(3, b"p", b"", 1, 3);
    for r in [r2, r1, r3] {
        pd.region_heartbeat(r.clone(), leader_of(&r)).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn region_lookup_by_key() {
    let dir = tempfile::tempdir().unwrap();
    let pd = bootstrapped(dir.path()).await;
    let crate::RegionWithLeader {
        region: r, leader, ..
    } = pd.get_region(b"").await.unwrap().unwrap();
    assert_eq!(r.id, 1);
    assert_eq!(leader, None, "no heartbeat yet");

    split_three(&pd).await;
    let cases: &[(&[u8], u64)] = &[
        (b"", 1),
        (b"a", 1),
        (b"f\xff\xff", 1),
        (b"g", 2),
        (b"g\x00", 2),
        (b"o", 2),
        (b"p", 3),
        (b"zzzz", 3),
        (b"\xff\xff\xff", 3),
    ];
    for (key, want) in cases {
        let crate::RegionWithLeader {
            region: r, leader, ..
        } = pd.get_region(key).await.unwrap().unwrap();
        assert_eq!(r.id, *want, "key {key:?}");
        assert_eq!(leader, Some(leader_of(&r)));
    }
    assert_eq!(
        pd.get_region_by_id(2)
            .await
            .unwrap()
            .unwrap()
            .region
            .start_key,
        b"g"
    );
    assert_eq!(pd.get_region_by_id(42).await.unwrap(), None);

    let ids =
        |v: Vec<crate::RegionWithLeader>| v.into_iter().map(|r| r.region.id).collect::<Vec<_>>();
    assert_eq!(
        ids(pd.scan_regions(b"", b"", 0).await.unwrap()),
        vec![1, 2, 3]
    );
    assert_eq!(
        ids(pd.scan_regions(b"h", b"", 0).await.unwrap()),
        vec![2, 3]
    );
    assert_eq!(ids(pd.scan_regions(b"a", b"g", 0).await.unwrap()), vec![1]);
    assert_eq!(
        ids(pd.scan_regions(b"a", b"g\x00", 0).await.unwrap()),
        vec![1, 2]
    );
    assert_eq!(ids(pd.scan_regions(b"", b"", 2).await.unwrap()), vec![1, 2]);
    assert_eq!(ids(pd.scan_regions(b"q", b"", 5).await.unwrap()), vec![3]);
    assert_eq!(
        ids(pd.scan_regions(b"q", b"b", 0).await.unwrap()),
        Vec::<u64>::new()
    );

    // The tree is rebuilt from storage.
    drop(pd);
    let pd = open(dir.path(), 1000, 10_000);
    assert_eq!(pd.get_region(b"h").await.unwrap().unwrap().region.id, 2);
    assert_eq!(pd.get_region(b"zz").await.unwrap().unwrap().region.id, 3);
    assert_eq!(
        ids(pd.scan_regions(b"", b"", 0).await.unwrap()),
        vec![1, 2, 3]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hole_after_partial_split_report() {
    let dir = tempfile::tempdir().unwrap();
    let pd = bootstrapped(dir.path()).await;
    // Only the new right half reported so far: the old region is obsolete.
    let r2 = region(2, b"m", b"", 1, 2);
    pd.region_heartbeat(r2.clone(), leader_of(&r2))
        .await
        .unwrap();
    assert_eq!(pd.get_region(b"a").await.unwrap(), None);
    assert_eq!(pd.get_region_by_id(1).await.unwrap(), None);
    assert_eq!(pd.get_region(b"x").await.unwrap().unwrap().region.id, 2);
    let r1 = region(1, b"", b"m", 1, 2);
    pd.region_heartbeat(r1.clone(), leader_of(&r1))
        .await
        .unwrap();
    assert_eq!(pd.get_region(b"a").await.unwrap().unwrap().region.id, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_heartbeats_are_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let pd = bootstrapped(dir.path()).await;
    split_three(&pd).await;

    // Older version for a known region.
    let stale = region(2, b"g", b"z", 1, 2);
    pd.region_heartbeat(stale.clone(), leader_of(&stale))
        .await
        .unwrap();
    assert_eq!(
        pd.get_region_by_id(2)
            .await
            .unwrap()
            .unwrap()
            .region
            .end_key,
        b"p"
    );
    assert_eq!(pd.get_region(b"q").await.unwrap().unwrap().region.id, 3);

    // Older conf_ver, newer version: still stale.
    let mut stale = region(2, b"g", b"p", 0, 9);
    stale.peers.truncate(1);
    pd.region_heartbeat(stale.clone(), leader_of(&stale))
        .await
        .unwrap();
    assert_eq!(
        pd.get_region_by_id(2)
            .await
            .unwrap()
            .unwrap()
            .region
            .peers
            .len(),
        2
    );

    // The pre-split region 1 reported late by a lagging peer: overlaps
    // newer regions, ignored.
    let old = region(1, b"", b"", 1, 1);
    pd.region_heartbeat(old.clone(), leader_of(&old))
        .await
        .unwrap();
    assert_eq!(
        pd.get_region_by_id(1)
            .await
            .unwrap()
            .unwrap()
            .region
            .end_key,
        b"g"
    );
    // An unknown region overlapping a newer one.
    let ghost = region(7, b"h", b"i", 1, 2);
    pd.region_heartbeat(ghost.clone(), leader_of(&ghost))
        .await
        .unwrap();
    assert_eq!(pd.get_region_by_id(7).await.unwrap(), None);
    assert_eq!(pd.get_region(b"h").await.unwrap().unwrap().region.id, 2);

    // Same epoch, new leader: accepted.
    let r2 = region(2, b"g", b"p", 1, 3);
    pd.region_heartbeat(r2.clone(), r2.peers[1]).await.unwrap();
    assert_eq!(
        pd.get_region_by_id(2).await.unwrap().unwrap().leader,
        Some(r2.peers[1])
    );
    // Newer conf_ver: accepted and persisted.
    let mut r2b = region(2, b"g", b"p", 2, 3);
    r2b.peers.push(peer(23, 3));
    pd.region_heartbeat(r2b.clone(), leader_of(&r2b))
        .await
        .unwrap();
    drop(pd);
    let pd = open(dir.path(), 1000, 10_000);
    assert_eq!(pd.get_region_by_id(2).await.unwrap().unwrap().region, r2b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_validation() {
    let dir = tempfile::tempdir().unwrap();
    let pd = bootstrapped(dir.path()).await;
    let r = region(1, b"", b"", 1, 1);
    assert!(matches!(
        pd.region_heartbeat(r.clone(), peer(99, 9)).await,
        Err(PdError::InvalidArgument(_))
    ));
    let mut no_epoch = r.clone();
    no_epoch.region_epoch = None;
    assert!(matches!(
        pd.region_heartbeat(no_epoch, leader_of(&r)).await,
        Err(PdError::InvalidArgument(_))
    ));
    let empty = region(5, b"b", b"a", 1, 2);
    assert!(matches!(
        pd.region_heartbeat(empty.clone(), leader_of(&empty)).await,
        Err(PdError::InvalidArgument(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes() {
    let dir = tempfile::tempdir().unwrap();
    let pd = bootstrapped(dir.path()).await;
    pd.put_node(node(3)).await.unwrap();
    pd.put_node(node(2)).await.unwrap();
    let mut n3 = node(3);
    n3.client_urls = vec!["http://10.0.0.3:2379".into()];
    pd.put_node(n3.clone()).await.unwrap();
    assert_eq!(pd.get_node(3).await.unwrap(), Some(n3.clone()));
    assert_eq!(pd.get_node(4).await.unwrap(), None);
    let ids: Vec<u64> = pd
        .get_all_nodes()
        .await
        .unwrap()
        .iter()
        .map(|n| n.id)
        .collect();
    assert_eq!(ids, vec![1, 2, 3]);
    assert!(matches!(
        pd.put_node(node(0)).await,
        Err(PdError::InvalidArgument(_))
    ));

    let mut tomb = node(2);
    tomb.state = metapb::NodeState::Tombstone as i32;
    pd.put_node(tomb).await.unwrap();
    assert!(matches!(
        pd.put_node(node(2)).await,
        Err(PdError::InvalidArgument(_))
    ));

    drop(pd);
    let pd = open(dir.path(), 1000, 10_000);
    assert_eq!(pd.get_node(3).await.unwrap(), Some(n3));
    assert_eq!(pd.get_all_nodes().await.unwrap().len(), 3);
}

/// A data dir written by the single-member PD from before replication is
/// carried over: same cluster id and state, revisions above its mark.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_single_member_data_dir_is_carried_over() {
    use prost::Message as _;
    let dir = tempfile::tempdir().unwrap();
    {
        let mut opts = rocksdb::Options::default();
        opts.create_if_missing(true);
        let db = rocksdb::DB::open(&opts, dir.path()).unwrap();
        db.put(b"meta/cluster_id", 4242u64.to_be_bytes()).unwrap();
        db.put(b"meta/member_id", 77u64.to_be_bytes()).unwrap();
        db.put(b"meta/bootstrapped", [1u8]).unwrap();
        db.put(b"meta/id_high_water", 500u64.to_be_bytes()).unwrap();
        db.put(b"meta/revision_high_water", 9000u64.to_be_bytes())
            .unwrap();
        db.put(
            [b"node/".as_slice(), &1u64.to_be_bytes()].concat(),
            node(1).encode_to_vec(),
        )
        .unwrap();
        let r = region(1, b"", b"", 1, 1);
        db.put(
            [b"region/".as_slice(), &1u64.to_be_bytes()].concat(),
            r.encode_to_vec(),
        )
        .unwrap();
    }
    let pd = open(dir.path(), 10, 100);
    assert_eq!(pd.cluster_id(), 4242);
    assert!(pd.is_bootstrapped().await.unwrap());
    assert_eq!(pd.get_node(1).await.unwrap(), Some(node(1)));
    assert_eq!(pd.get_region(b"k").await.unwrap().unwrap().region.id, 1);
    assert!(pd.alloc_revisions(1).await.unwrap() > 9000);
    assert!(pd.alloc_id().await.unwrap() > 500);
    pd.close().await.unwrap();
    drop(pd);
    // And it reopens as a replicated data dir.
    let pd = open(dir.path(), 10, 100);
    assert_eq!(pd.cluster_id(), 4242);
    assert_eq!(pd.get_all_nodes().await.unwrap().len(), 1);
}
