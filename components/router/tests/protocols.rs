//! Targeted schedules of the read and write protocols, each a hole that
//! once existed: a read that takes its revision after its barrier, waits
//! with no bound, a write retried after it may have applied.

use std::sync::Arc;
use std::time::{Duration, Instant};

use mvcc::exec::{WriteRequest, WriteResponse};
use proto::etcdserverpb::{PutRequest, RangeRequest, RangeResponse};
use router::Router;
use test_support::{OracleFault, RouterCluster};

fn put(key: &str, value: &str) -> WriteRequest {
    WriteRequest::Put(PutRequest {
        key: key.into(),
        value: value.into(),
        ..Default::default()
    })
}

fn get(key: &str) -> RangeRequest {
    RangeRequest {
        key: key.into(),
        ..Default::default()
    }
}

fn value(resp: &RangeResponse) -> Option<&[u8]> {
    resp.kvs.first().map(|kv| kv.value.as_slice())
}

async fn must_write(router: &Arc<Router>, req: WriteRequest) -> i64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match router.write(&req).await {
            Ok(WriteResponse::Put(p)) => return p.header.map_or(0, |h| h.revision),
            Ok(other) => panic!("{other:?}"),
            Err(e) => {
                assert!(Instant::now() < deadline, "write failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// A linearizable read on a leader that is about to be deposed, whose
/// oracle call hangs: meanwhile the others elect a new leader, which
/// acknowledges a new value. Had the read confirmed its leadership first
/// and asked the oracle afterwards, it would get a revision above the new
/// value's and answer the old value at it — a client listing at that
/// revision and watching from the next would never see the new value. With
/// the revision taken first, its barrier fails instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_read_takes_its_revision_before_its_barrier() {
    let cluster = RouterCluster::new(3).await;
    let old = cluster.leader().await;
    let old_router = cluster.router(old).unwrap();
    must_write(&old_router, put("k", "old")).await;
    cluster
        .oracle(old)
        // Shorter than the read's bound on the oracle (4 s), longer than
        // an election and a write.
        .set_fault(OracleFault::Stall(Duration::from_millis(3500)));
    let read = tokio::spawn(async move { old_router.range(&get("k")).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let others: Vec<u64> = cluster.ids().into_iter().filter(|&i| i != old).collect();
    cluster.raft().partition(&[old], &others);
    // A new leader among the others acknowledges a new value.
    let deadline = Instant::now() + Duration::from_secs(20);
    let acked = loop {
        let via = cluster.router(others[0]).unwrap();
        match tokio::time::timeout(Duration::from_secs(1), via.write(&put("k", "new"))).await {
            Ok(Ok(WriteResponse::Put(p))) => break p.header.map_or(0, |h| h.revision),
            _ => assert!(
                Instant::now() < deadline,
                "the majority never took the write"
            ),
        }
    };
    assert!(!read.is_finished(), "the read did not wait for the oracle");
    match read.await.unwrap() {
        // Refused or timed out: fine.
        Err(_) => {}
        Ok(resp) => {
            let rev = resp.header.as_ref().map_or(0, |h| h.revision);
            assert!(
                rev < acked || value(&resp) == Some(b"new"),
                "a read answered {:?} at revision {rev} though \"new\" was acknowledged at {acked}",
                value(&resp).map(String::from_utf8_lossy)
            );
        }
    }
    cluster.oracle(old).set_fault(OracleFault::None);
    cluster.raft().heal();
}

/// An oracle that hangs does not hang the node's clients: reads and writes
/// answer "request timed out" (outcome unknown) within their bounds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_oracle_times_requests_out() {
    let cluster = RouterCluster::new(1).await;
    cluster.leader().await;
    let router: Arc<Router> = cluster.router(1).unwrap();
    must_write(&router, put("k", "v")).await;
    cluster
        .oracle(1)
        .set_fault(OracleFault::Stall(Duration::from_secs(60)));
    let started = Instant::now();
    let read = tokio::time::timeout(Duration::from_secs(20), router.range(&get("k"))).await;
    assert!(
        matches!(read, Ok(Err(router::Error::OutcomeUnknown(_)))),
        "{read:?} after {:?}",
        started.elapsed()
    );
    let write = tokio::time::timeout(Duration::from_secs(20), router.write(&put("k", "w"))).await;
    assert!(
        matches!(write, Ok(Err(router::Error::OutcomeUnknown(_)))),
        "{write:?}"
    );
    cluster.oracle(1).set_fault(OracleFault::None);
}

/// A write forwarded by a follower whose reply is lost may have applied:
/// the follower answers "outcome unknown" and does not send it again — a
/// retry would apply it twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_write_whose_reply_is_lost_is_not_retried() {
    let cluster = RouterCluster::new(3).await;
    let leader = cluster.leader().await;
    let follower = cluster.ids().into_iter().find(|&i| i != leader).unwrap();
    let via = cluster.router(follower).unwrap();
    must_write(&via, put("k", "0")).await;
    cluster.set_lose_reply_percent(100);
    let res = via
        .write(&WriteRequest::Txn(proto::etcdserverpb::TxnRequest {
            success: vec![proto::etcdserverpb::RequestOp {
                request: Some(proto::etcdserverpb::request_op::Request::RequestPut(
                    PutRequest {
                        key: b"k".to_vec(),
                        value: b"once".to_vec(),
                        prev_kv: true,
                        ..Default::default()
                    },
                )),
            }],
            ..Default::default()
        }))
        .await;
    cluster.set_lose_reply_percent(0);
    assert!(
        matches!(res, Err(router::Error::OutcomeUnknown(_))),
        "{res:?}"
    );
    // It did apply, exactly once: version 2 (after "0"), not 3.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = via.range(&get("k")).await.unwrap();
        if value(&r) == Some(b"once") {
            assert_eq!(r.kvs[0].version, 2, "applied more than once");
            break;
        }
        assert!(Instant::now() < deadline, "the write never applied");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A compaction whose leader waits for the oracle while the region splits:
/// proposed with the region's new epoch it would compact only the left
/// part, while the router counts the whole old range as done — the new
/// region would keep its history below the compaction revision, and a
/// historical read there would not answer "compacted". Proposed with the
/// epoch the router located the region by, it is refused and the router
/// compacts both regions.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_split_during_a_compaction_leaves_no_region_behind() {
    let cluster = RouterCluster::new(1).await;
    cluster.leader().await;
    let router = cluster.router(1).unwrap();
    for key in ["a", "b", "m", "x"] {
        must_write(&router, put(key, "1")).await;
        must_write(&router, put(key, "2")).await;
    }
    let revision = router.current_revision().await.unwrap();
    cluster
        .oracle(1)
        .set_fault(OracleFault::Stall(Duration::from_millis(1500)));
    let compaction = tokio::spawn({
        let router = router.clone();
        async move { router.compact(revision, false).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    cluster.split(b"m").await.expect("split");
    cluster.oracle(1).set_fault(OracleFault::None);
    compaction.await.unwrap().expect("compaction");
    for handle in router.store().regions() {
        let status = handle.status();
        assert_eq!(
            status.compact_revision,
            revision,
            "region {:?}..{:?} not compacted",
            String::from_utf8_lossy(&status.region.start_key),
            String::from_utf8_lossy(&status.region.end_key)
        );
    }
    let old = RangeRequest {
        revision: revision - 1,
        ..get("x")
    };
    assert!(matches!(
        router.range(&old).await,
        Err(router::Error::Mvcc(mvcc::Error::Compacted))
    ));
}

/// A HashKV that located its regions before a split hashes again over the
/// regions as they are now: a piece that no longer lies in one region is
/// a changed layout, not an error for the client ("leader changed" once
/// came back from a cluster splitting under a consistency check).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_split_during_a_hash_kv_hashes_the_new_regions() {
    let cluster = RouterCluster::new(1).await;
    cluster.leader().await;
    let router = cluster.router(1).unwrap();
    for key in ["a", "b", "m", "x"] {
        must_write(&router, put(key, "1")).await;
    }
    let before = router.hash_kv(0).await.expect("hash before the split");
    cluster
        .oracle(1)
        .set_fault(OracleFault::Stall(Duration::from_millis(1500)));
    let hashing = tokio::spawn({
        let router = router.clone();
        async move { router.hash_kv(0).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    cluster.split(b"m").await.expect("split");
    cluster.oracle(1).set_fault(OracleFault::None);
    let during = hashing.await.unwrap().expect("hash across the split");
    assert_eq!(during, before, "a split changes no key nor revision");
}

/// Every replica's compaction revision of the region holding `key`, on
/// every node.
fn compaction_revisions(cluster: &RouterCluster, key: &[u8]) -> Vec<i64> {
    cluster
        .ids()
        .into_iter()
        .filter_map(|id| cluster.router(id))
        .flat_map(|r| r.store().regions())
        .map(|h| h.status())
        .filter(|s| {
            key >= s.region.start_key.as_slice()
                && (s.region.end_key.is_empty() || key < s.region.end_key.as_slice())
        })
        .map(|s| s.compact_revision)
        .collect()
}

/// Whether a read of `key` below `revision` answers "compacted" through
/// every node.
async fn compacted_everywhere(cluster: &RouterCluster, key: &str, revision: i64) -> bool {
    for id in cluster.ids() {
        let router = cluster.router(id).unwrap();
        let old = RangeRequest {
            revision: revision - 1,
            ..get(key)
        };
        match router.range(&old).await {
            Err(router::Error::Mvcc(mvcc::Error::Compacted)) => {}
            _ => return false,
        }
    }
    true
}

/// Moves the leadership of the region holding `key` to node `to`.
async fn lead_region_from(cluster: &RouterCluster, key: &[u8], to: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        for id in cluster.ids() {
            let router = cluster.router(id).unwrap();
            for h in router.store().regions() {
                let s = h.status();
                let holds = key >= s.region.start_key.as_slice()
                    && (s.region.end_key.is_empty() || key < s.region.end_key.as_slice());
                if !holds || !s.ready_leader {
                    continue;
                }
                if id == to {
                    return;
                }
                let peer = s.region.peers.iter().find(|p| p.node_id == to).unwrap();
                let _ = h.transfer_leader(peer.id).await;
            }
        }
        assert!(Instant::now() < deadline, "node {to} never took the lead");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Compact(R) whose last region's leader cannot serve it (its oracle
/// hangs): the call fails, R is recorded in PD, the first region refuses
/// reads below R. Once the leader serves again, the region catches up by
/// itself, and a read below R answers "compacted" in every region through
/// every node. A Compact at or below R then answers "compacted" too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_region_that_missed_a_compaction_catches_up() {
    let cluster = RouterCluster::new(3).await;
    let first = cluster.leader().await;
    let router = cluster.router(first).unwrap();
    for key in ["a", "x"] {
        must_write(&router, put(key, "1")).await;
        must_write(&router, put(key, "2")).await;
    }
    cluster.split(b"m").await.expect("split");
    let other = cluster.ids().into_iter().find(|&i| i != first).unwrap();
    lead_region_from(&cluster, b"a", first).await;
    lead_region_from(&cluster, b"x", other).await;
    let revision = router.current_revision().await.unwrap();
    must_write(&router, put("a", "3")).await;
    must_write(&router, put("x", "3")).await;

    cluster
        .oracle(other)
        .set_fault(OracleFault::Stall(Duration::from_secs(8)));
    let res = router.compact(revision, false).await;
    assert!(res.is_err(), "{res:?}");
    assert!(compaction_revisions(&cluster, b"x")
        .iter()
        .all(|&c| c < revision));
    let old_a = RangeRequest {
        revision: revision - 1,
        ..get("a")
    };
    assert!(matches!(
        router.range(&old_a).await,
        Err(router::Error::Mvcc(mvcc::Error::Compacted))
    ));

    cluster.oracle(other).set_fault(OracleFault::None);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !compaction_revisions(&cluster, b"x")
        .iter()
        .all(|&c| c == revision)
    {
        assert!(Instant::now() < deadline, "region x.. never caught up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for key in ["a", "x"] {
        assert!(compacted_everywhere(&cluster, key, revision).await, "{key}");
        // Reads at R still work.
        let at = RangeRequest {
            revision,
            ..get(key)
        };
        let resp = router.range(&at).await.unwrap();
        assert_eq!(value(&resp), Some(&b"2"[..]));
    }
    assert!(matches!(
        router.compact(revision, false).await,
        Err(router::Error::Mvcc(mvcc::Error::Compacted))
    ));
    assert!(matches!(
        router.compact(revision + 1_000_000, false).await,
        Err(router::Error::Mvcc(mvcc::Error::FutureRev))
    ));
}
