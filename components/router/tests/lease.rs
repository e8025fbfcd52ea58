//! Leases with keys over several regions (`router::lease`): an expired
//! lease's keys vanish at one revision, exactly once, while its region's
//! old leader is cut off, and a lease kept alive on the other side keeps
//! its key.

use std::sync::Arc;
use std::time::{Duration, Instant};

use mvcc::exec::WriteRequest;
use mvcc::KeyRange;
use proto::etcdserverpb::PutRequest;
use proto::mvccpb::event::EventType;
use router::lease::{LeaseAnswer, LeaseOp};
use router::Router;
use test_support::router_cluster::must;
use test_support::RouterCluster;

fn leased_put(key: &str, lease: i64) -> WriteRequest {
    WriteRequest::Put(PutRequest {
        key: key.into(),
        value: b"v".to_vec(),
        lease,
        ..Default::default()
    })
}

async fn lease(router: &Arc<Router>, op: LeaseOp) -> router::Result<LeaseAnswer> {
    router.lease(op).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn expired_keys_over_regions_vanish_at_one_revision_once() {
    let cluster = RouterCluster::new(3).await;
    cluster.leader().await;
    // Keys "a" and "z" in two regions, the leases' owner keys in a third.
    for key in [&b"m"[..], b"\xff\xfe"] {
        let deadline = Instant::now() + Duration::from_secs(30);
        while let Err(e) = cluster.split(key).await {
            assert!(Instant::now() < deadline, "split: {e}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let r1 = cluster.router(1).expect("node 1");
    for (id, ttl) in [(7, 3), (8, 3)] {
        must("grant", || lease(&r1, LeaseOp::Grant { id, ttl })).await;
    }
    for (key, id) in [("a", 7), ("z", 7), ("b", 8)] {
        let req = leased_put(key, id);
        must("put", || r1.write(&req)).await;
    }

    // Node 1 leads every region, then is cut off: its clock cannot revoke
    // (nothing it proposes commits); the others elect leaders that
    // promote the leases, and lease 8 is kept alive there.
    cluster.transfer_all_leaders(1).await;
    cluster.raft().partition(&[1], &[2, 3]);
    let r2 = cluster.router(2).expect("node 2");
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(9) {
        let _ = lease(&r2, LeaseOp::Renew(8)).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    cluster.raft().heal();
    let keys = must("keys of 8", || lease(&r2, LeaseOp::Keys(8))).await;
    assert_eq!(keys, LeaseAnswer::Keys(vec![b"b".to_vec()]));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !matches!(
        lease(&r2, LeaseOp::Keys(7)).await,
        Err(router::Error::Mvcc(mvcc::Error::LeaseNotFound))
    ) {
        assert!(Instant::now() < deadline, "lease 7 never expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Every node's history: one delete of each of a and z, at one
    // revision; b untouched.
    let all = KeyRange::from_etcd(b"a", b"\xff");
    for id in cluster.ids() {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mvcc = cluster.raft().store(id).mvcc();
            let events = mvcc
                .snapshot()
                .events(&all, 1, i64::MAX, 0, false)
                .expect("history");
            let deletes: Vec<_> = events
                .iter()
                .filter(|e| e.r#type() == EventType::Delete)
                .filter_map(|e| e.kv.as_ref().map(|kv| (kv.key.clone(), kv.mod_revision)))
                .collect();
            if deletes.len() >= 2 {
                assert_eq!(deletes.len(), 2, "node {id}: {deletes:?}");
                assert_eq!(deletes[0].0, b"a".to_vec(), "node {id}: {deletes:?}");
                assert_eq!(deletes[1].0, b"z".to_vec(), "node {id}: {deletes:?}");
                assert_eq!(deletes[0].1, deletes[1].1, "node {id}: one revision");
                break;
            }
            assert!(Instant::now() < deadline, "node {id}: {deletes:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let get_b = proto::etcdserverpb::RangeRequest {
        key: b"b".to_vec(),
        ..Default::default()
    };
    let b = must("get b", || r1.range(&get_b)).await;
    assert_eq!(b.kvs.first().map(|kv| kv.lease), Some(8), "{b:?}");
}

/// Puts with one lease race its revoke, in one region and with the lease
/// in another region than the keys: afterwards no key carries the lease
/// (each put either came before the revoke, which deleted its key, or
/// failed with "requested lease not found").
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn puts_racing_a_revoke_leave_no_key_on_it() {
    let cluster = RouterCluster::new(3).await;
    cluster.leader().await;
    let router = cluster.router(1).expect("node 1");
    for (round, split) in [(1, None), (2, Some(&b"\xff\xfe"[..]))] {
        if let Some(key) = split {
            let deadline = Instant::now() + Duration::from_secs(30);
            while let Err(e) = cluster.split(key).await {
                assert!(Instant::now() < deadline, "split: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        let id = 100 + round;
        must("grant", || lease(&router, LeaseOp::Grant { id, ttl: 600 })).await;
        let writers: Vec<_> = (0..4)
            .map(|w| {
                let router = router.clone();
                tokio::spawn(async move {
                    let mut written = 0;
                    for i in 0.. {
                        let req = leased_put(&format!("r{round}/w{w}/{i:04}"), id);
                        match router.write(&req).await {
                            Ok(_) => written += 1,
                            Err(router::Error::Mvcc(mvcc::Error::LeaseNotFound)) => break,
                            Err(_) => {}
                        }
                    }
                    written
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(500)).await;
        must("revoke", || lease(&router, LeaseOp::Revoke(id))).await;
        let mut written = 0;
        for w in writers {
            written += w.await.expect("writer");
        }
        assert!(
            written > 0,
            "round {round}: nothing written before the revoke"
        );
        let all = proto::etcdserverpb::RangeRequest {
            key: format!("r{round}/").into_bytes(),
            range_end: format!("r{round}0").into_bytes(),
            ..Default::default()
        };
        let left = must("range", || router.range(&all)).await;
        let on_lease: Vec<_> = left.kvs.iter().filter(|kv| kv.lease == id).collect();
        assert!(
            on_lease.is_empty(),
            "round {round}: {} of {written} keys outlived their lease",
            on_lease.len()
        );
    }
}
