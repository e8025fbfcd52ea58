//! A one-voter region on real engines: proposals apply in order, survive a
//! restart (replayed from raft-engine), stale revisions and wrong epochs are
//! rejected, and the raft log is garbage-collected.

use std::time::{Duration, Instant};

use proto::metapb;
use proto::raft_cmdpb::{raft_cmd_request::Cmd, CompactRequest, RaftCmdRequest};
use raftstore::{Error, NodeIdent, RegionHandle, Store};

fn region() -> metapb::Region {
    metapb::Region {
        id: 2,
        start_key: vec![],
        end_key: vec![],
        region_epoch: Some(metapb::RegionEpoch {
            conf_ver: 1,
            version: 1,
        }),
        peers: vec![metapb::Peer {
            id: 3,
            node_id: 1,
            role: 0,
        }],
    }
}

fn write(rev: i64, key: &str, value: &str) -> RaftCmdRequest {
    test_support::raft_cluster::write_to(2, rev, key, value)
}

async fn leader(store: &Store) -> RegionHandle {
    let handle = store.region(2).expect("region 2 hosted");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !handle.status().ready_leader {
        assert!(
            Instant::now() < deadline,
            "no leader: {:?}",
            handle.status()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    handle
}

#[tokio::test]
async fn proposals_apply_and_survive_restart() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(dir.path()).unwrap();
        store
            .bootstrap(
                NodeIdent {
                    cluster_id: 7,
                    node_id: 1,
                },
                region(),
            )
            .unwrap();
        let h = leader(&store).await;
        for rev in 2..=6000 {
            h.propose(write(rev, &format!("k{}", rev % 10), "v"))
                .await
                .unwrap();
        }
        // A revision that is not above the applied one is a stale proposal.
        let err = h.propose(write(6000, "k", "v")).await.unwrap_err();
        assert!(matches!(err, Error::StaleCommand(_)), "{err}");
        // A command built for another epoch is refused.
        let mut cmd = write(6001, "k", "v");
        cmd.header.as_mut().unwrap().region_epoch = Some(metapb::RegionEpoch {
            conf_ver: 9,
            version: 9,
        });
        assert!(matches!(
            h.propose(cmd).await.unwrap_err(),
            Error::EpochNotMatch { .. }
        ));
        let status = h.status();
        assert_eq!(status.applied_revision, 6000);
        assert!(status.term >= 6);
        store.shutdown();
    }
    // The raft log was garbage-collected past the GC threshold.
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(
        store.node_ident().unwrap(),
        Some(NodeIdent {
            cluster_id: 7,
            node_id: 1
        })
    );
    let h = leader(&store).await;
    assert_eq!(h.status().applied_revision, 6000);
    let kv = store
        .mvcc()
        .snapshot()
        .get(b"k0", i64::MAX)
        .unwrap()
        .unwrap();
    assert_eq!(kv.mod_revision, 6000);
    h.propose(write(6001, "after", "restart")).await.unwrap();
    h.read_index().await.unwrap();
    // Compaction through raft, then its physical clean-up.
    h.propose(RaftCmdRequest {
        header: write(0, "", "").header,
        cmd: Some(Cmd::Compact(CompactRequest { revision: 5000 })),
    })
    .await
    .unwrap();
    tokio::time::timeout(Duration::from_secs(20), h.wait_physically_compacted(5000))
        .await
        .expect("compaction finishes")
        .unwrap();
    assert_eq!(h.status().compact_revision, 5000);
    assert!(
        store.mvcc().snapshot().get(b"k1", 4001).unwrap().is_none(),
        "superseded history is gone"
    );
    assert_eq!(
        store
            .mvcc()
            .snapshot()
            .get(b"k1", 5000)
            .unwrap()
            .unwrap()
            .mod_revision,
        4991
    );
    store.shutdown();
}

#[tokio::test]
async fn wait_applied_resolves_once_applied_and_fails_on_stop() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    store
        .bootstrap(
            NodeIdent {
                cluster_id: 7,
                node_id: 1,
            },
            region(),
        )
        .unwrap();
    let h = leader(&store).await;
    let applied = h.status().applied_index;
    // Already applied: immediate.
    h.wait_applied(applied).await.unwrap();
    // Ahead of the log: answered by the apply that reaches it.
    let waiter = tokio::spawn({
        let h = h.clone();
        async move { h.wait_applied(applied + 2).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!waiter.is_finished());
    h.propose(write(2, "a", "1")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        !waiter.is_finished(),
        "resolved before index {}",
        applied + 2
    );
    h.propose(write(3, "b", "1")).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("wait_applied resolves")
        .unwrap()
        .unwrap();
    assert!(h.status().applied_index >= applied + 2);
    // A replica that stops fails its waiters.
    let never = tokio::spawn({
        let h = h.clone();
        async move { h.wait_applied(u64::MAX).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    tokio::task::spawn_blocking(move || store.shutdown())
        .await
        .unwrap();
    let res = tokio::time::timeout(Duration::from_secs(5), never)
        .await
        .expect("waiter answered on stop")
        .unwrap();
    assert!(matches!(res, Err(Error::Stopped(2))), "{res:?}");
}
