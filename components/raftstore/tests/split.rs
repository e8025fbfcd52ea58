//! Region split on an in-process 3-node cluster: the split applies on
//! every replica, the new region starts on every node with the data it
//! inherits and elects a leader, commands built for the old epoch are
//! refused, both regions survive restarts, and a replica that hears of the
//! new region before it applied the split gets it without ever owning a
//! key twice.

use std::time::{Duration, Instant};

use proto::metapb;
use proto::raft_cmdpb::{raft_cmd_request::Cmd, RaftCmdRequest, RaftRequestHeader, SplitRequest};
use raftstore::{Error, RegionHandle};
use test_support::raft_cluster::{write, write_to, BlockRegion, Cluster, REGION_ID};

const NEW_REGION: u64 = 100;

fn split_cmd(key: &str, version: u64) -> RaftCmdRequest {
    RaftCmdRequest {
        header: Some(RaftRequestHeader {
            region_id: REGION_ID,
            region_epoch: Some(metapb::RegionEpoch {
                conf_ver: 1,
                version,
            }),
            term: 0,
        }),
        cmd: Some(Cmd::Split(SplitRequest {
            split_key: key.into(),
            new_region_id: NEW_REGION,
            new_peer_ids: vec![101, 102, 103],
        })),
    }
}

/// A write to `region_id` at epoch version 2 (after one split).
fn write_after_split(region_id: u64, rev: i64, key: &str, value: &str) -> RaftCmdRequest {
    let mut cmd = write_to(region_id, rev, key, value);
    if let Some(h) = cmd.header.as_mut() {
        h.region_epoch = Some(metapb::RegionEpoch {
            conf_ver: 1,
            version: 2,
        });
    }
    cmd
}

async fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn range_of(h: &RegionHandle) -> (Vec<u8>, Vec<u8>, u64) {
    let r = h.status().region;
    (
        r.start_key,
        r.end_key,
        r.region_epoch.unwrap_or_default().version,
    )
}

async fn load(c: &Cluster, rev: &mut i64) {
    for k in ["a", "f", "m", "q", "z"] {
        c.must_put(rev, k, &format!("{k}-1")).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_divides_the_region_on_every_replica() {
    let c = Cluster::new(3);
    let mut rev = 1;
    load(&c, &mut rev).await;
    let (leader, h) = c.leader().await;
    h.propose(split_cmd("m", 1)).await.unwrap();

    for id in c.nodes() {
        wait_for("the new region on every node", || {
            c.try_region(id, NEW_REGION).is_some()
        })
        .await;
        let parent = c.handle(id);
        let child = c.try_region(id, NEW_REGION).unwrap();
        wait_for("the split applied", || range_of(&parent).2 == 2).await;
        assert_eq!(range_of(&parent), (vec![], b"m".to_vec(), 2));
        assert_eq!(range_of(&child), (b"m".to_vec(), vec![], 2));
        // The new region inherits the revisions of its history.
        assert_eq!(child.status().applied_revision, rev);
        let peers: Vec<_> = child
            .status()
            .region
            .peers
            .iter()
            .map(|p| (p.id, p.node_id))
            .collect();
        assert_eq!(peers, vec![(101, 1), (102, 2), (103, 3)]);
    }
    // The replica next to the old leader campaigns at once.
    let (child_leader, child) = c.region_leader(NEW_REGION).await;
    assert_eq!(child_leader, leader);

    // The old epoch is refused, on both sides of the split key.
    let (_, h) = c.leader().await;
    rev += 1;
    let stale = h.propose(write(rev, "b", "stale")).await;
    assert!(
        matches!(stale, Err(Error::EpochNotMatch { .. })),
        "{stale:?}"
    );
    // A key the region no longer owns is refused, whatever the epoch.
    let outside = h
        .propose(write_after_split(REGION_ID, rev, "q", "wrong"))
        .await;
    assert!(
        matches!(outside, Err(Error::StaleCommand(_))),
        "{outside:?}"
    );
    // New-epoch writes go to the region owning the key.
    h.propose(write_after_split(REGION_ID, rev, "b", "b-2"))
        .await
        .unwrap();
    rev += 1;
    child
        .propose(write_after_split(NEW_REGION, rev, "q", "q-2"))
        .await
        .unwrap();
    c.must_get_on(&c.nodes(), "b", "b-2").await;
    c.must_get_on(&c.nodes(), "q", "q-2").await;
    c.must_get_on(&c.nodes(), "z", "z-1").await;

    // Both regions come back after a restart of every node.
    for id in c.nodes() {
        c.stop_node(id);
        c.restart_node(id);
    }
    let (_, child) = c.region_leader(NEW_REGION).await;
    rev += 1;
    child
        .propose(write_after_split(NEW_REGION, rev, "z", "z-2"))
        .await
        .unwrap();
    let (_, parent) = c.region_leader(REGION_ID).await;
    assert_eq!(range_of(&parent), (vec![], b"m".to_vec(), 2));
    c.must_get_on(&c.nodes(), "z", "z-2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_with_a_key_outside_the_region_is_refused() {
    let c = Cluster::new(3);
    let (_, h) = c.leader().await;
    h.propose(split_cmd("m", 1)).await.unwrap();
    // Region 1 is now [, m): "q" is outside it, and the old epoch is stale.
    let (_, h) = c.region_leader(REGION_ID).await;
    let mut outside = split_cmd("q", 2);
    if let Some(Cmd::Split(s)) = outside.cmd.as_mut() {
        s.new_region_id = 200;
        s.new_peer_ids = vec![201, 202, 203];
    }
    assert!(matches!(
        h.propose(outside).await,
        Err(Error::StaleCommand(_))
    ));
    assert!(matches!(
        h.propose(split_cmd("c", 1)).await,
        Err(Error::EpochNotMatch { .. })
    ));
    assert!(c.try_region(1, 200).is_none());
}

/// Node 3 hears nothing of region 1 while the split and writes to the new
/// region happen: the new region's leader creates an empty replica on
/// node 3, whose snapshot must wait until node 3's region 1 has applied
/// the split (before, the two would own the same keys there).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_behind_the_split_gets_the_new_region_once_it_applied_it() {
    let c = Cluster::new(3);
    let mut rev = 1;
    load(&c, &mut rev).await;
    c.wait_same_applied(&c.nodes()).await;
    c.add_filter(BlockRegion {
        region_id: REGION_ID,
        to: 3,
    });
    let (leader, h) = c.leader_among(&[1, 2]).await;
    h.propose(split_cmd("m", 1)).await.unwrap();
    let (_, child) = c.region_leader(NEW_REGION).await;
    rev += 1;
    child
        .propose(write_after_split(NEW_REGION, rev, "q", "q-2"))
        .await
        .unwrap();
    // The new region's messages reach node 3 and create an empty replica,
    // whose snapshot is refused: node 3's region 1 still owns [, +inf).
    wait_for("an empty replica of the new region on node 3", || {
        c.try_region(3, NEW_REGION).is_some()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        c.try_region(3, NEW_REGION).unwrap().status().applied_index,
        0
    );
    assert_eq!(range_of(&c.handle(3)), (vec![], vec![], 1));
    assert_eq!(c.get(3, "q").as_deref(), Some(&b"q-1"[..]));

    c.heal();
    c.must_get_on(&[3], "q", "q-2").await;
    let child3 = c.try_region(3, NEW_REGION).unwrap();
    assert_eq!(range_of(&child3), (b"m".to_vec(), vec![], 2));
    assert_eq!(range_of(&c.handle(3)), (vec![], b"m".to_vec(), 2));
    let _ = leader;
}
