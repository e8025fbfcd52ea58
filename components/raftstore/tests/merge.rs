//! Region merge on an in-process 3-node cluster, with the commands proposed
//! by hand (the router's driver is tested at its level): the target takes
//! the source's range on every node and the source's replicas stop; a
//! frozen source refuses writes and membership changes; a replica of the
//! source that has the prepare but never heard it committed is caught up
//! by its node's target; a node that was down through the merge comes back
//! with the merged region only; a refused merge is recorded, and a later
//! commit stays refused; a snapshot of the merged region replaces a stale
//! source replica.

use std::time::{Duration, Instant};

use proto::metapb;
use proto::raft_cmdpb::{
    raft_cmd_request::Cmd, CommitMergeRequest, PrepareMergeRequest, RaftCmdRequest,
    RejectMergeRequest, RollbackMergeRequest, SplitRequest,
};
use proto::raft_serverpb::RaftMessage;
use raft::eraftpb::ConfChangeType;
use raftstore::{Error, RegionHandle, StoreOptions};
use test_support::raft_cluster::{cmd_for, Cluster, Filter, REGION_ID};

/// Nodes whose replicas all share one thread.
fn one_poller() -> StoreOptions {
    StoreOptions {
        pollers: 1,
        ..Default::default()
    }
}

/// The right half after the split at "m": the merge target.
const TARGET: u64 = 100;

fn put_cmd(region: &metapb::Region, rev: i64, key: &str, value: &str) -> RaftCmdRequest {
    let mut cmd = test_support::raft_cluster::write_to(region.id, rev, key, value);
    if let Some(h) = cmd.header.as_mut() {
        h.region_epoch = region.region_epoch;
    }
    cmd
}

async fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Splits region 1 at "m" (region 1 keeps `[.., m)`, [`TARGET`] takes
/// `[m, ..)`) with a key on each side, and waits for both on every node.
async fn split(c: &Cluster, rev: &mut i64) {
    c.must_put(rev, "a", "a-1").await;
    c.must_put(rev, "q", "q-1").await;
    let (_, h) = c.leader().await;
    let split = SplitRequest {
        split_key: b"m".to_vec(),
        new_region_id: TARGET,
        new_peer_ids: vec![101, 102, 103],
    };
    h.propose(cmd_for(&h.status().region, Cmd::Split(split)))
        .await
        .unwrap();
    for id in c.nodes() {
        wait_for("the split everywhere", || {
            c.try_region(id, TARGET).is_some()
                && c.handle(id).status().region.end_key == b"m".to_vec()
        })
        .await;
    }
}

/// Proposes the prepare on the source's leader: its index and term.
async fn prepare(c: &Cluster) -> (u64, u64, metapb::Region) {
    let (_, source) = c.region_leader(REGION_ID).await;
    let (_, target) = c.region_leader(TARGET).await;
    let req = PrepareMergeRequest {
        target: Some(target.status().region),
    };
    let applied = within(source.propose(cmd_for(&source.status().region, Cmd::PrepareMerge(req))))
        .await
        .unwrap();
    let status = source.status();
    assert!(status.merging.is_some());
    (applied.index, status.term, status.region)
}

async fn commit(
    c: &Cluster,
    frozen: &metapb::Region,
    index: u64,
    term: u64,
) -> raftstore::Result<()> {
    let (_, target) = c.region_leader(TARGET).await;
    let req = CommitMergeRequest {
        source: Some(frozen.clone()),
        prepare_index: index,
        prepare_term: term,
    };
    within(target.propose(cmd_for(&target.status().region, Cmd::CommitMerge(req))))
        .await
        .map(|_| ())
}

/// `f`'s answer; panics if there is none within 20 s.
async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(20), f)
        .await
        .expect("no answer within 20 s")
}

async fn wait_merged(c: &Cluster, nodes: &[u64]) -> RegionHandle {
    for &id in nodes {
        wait_for("the merge on every node", || {
            c.try_region(id, REGION_ID).is_none()
                && c.try_region(id, TARGET)
                    .is_some_and(|h| h.status().region.start_key.is_empty())
        })
        .await;
    }
    c.region_leader(TARGET).await.1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_target_takes_the_source_over_on_every_node() {
    let c = Cluster::new(3);
    let mut rev = 1;
    split(&c, &mut rev).await;
    let (index, term, frozen) = prepare(&c).await;

    // Frozen: no write, no membership change, no second prepare.
    let (_, source) = c.region_leader(REGION_ID).await;
    rev += 1;
    let write = source.propose(put_cmd(&frozen, rev, "b", "b-1")).await;
    assert!(matches!(write, Err(Error::Merging(_))), "{write:?}");
    let peer = metapb::Peer {
        id: 9,
        node_id: 9,
        role: 0,
    };
    let change = source
        .change_peers(vec![(ConfChangeType::AddLearnerNode, peer)])
        .await;
    assert!(matches!(change, Err(Error::Merging(_))), "{change:?}");
    assert!(matches!(source.read_index().await, Err(Error::Merging(_))));

    wait_for("every replica has the prepare", || {
        source.status().min_matched >= index
    })
    .await;
    commit(&c, &frozen, index, term).await.unwrap();
    let target = wait_merged(&c, &c.nodes()).await;
    let merged = target.status();
    assert!(merged.region.end_key.is_empty());
    assert_eq!(merged.region.region_epoch.unwrap().version, 4);
    assert_eq!(merged.applied_revision, rev - 1);
    // A second commit of the same merge answers committed, changing
    // nothing; a reject answers the same.
    commit(&c, &frozen, index, term).await.unwrap();
    let reject = RejectMergeRequest {
        source_id: REGION_ID,
        prepare_index: index,
        source_end_key: b"m".to_vec(),
    };
    target
        .propose(cmd_for(&merged.region, Cmd::RejectMerge(reject)))
        .await
        .unwrap();

    // The merged region serves both halves, with the new epoch.
    let region = target.status().region;
    target
        .propose(put_cmd(&region, rev, "b", "b-2"))
        .await
        .unwrap();
    rev += 1;
    target
        .propose(put_cmd(&region, rev, "z", "z-2"))
        .await
        .unwrap();
    c.must_get_on(&c.nodes(), "b", "b-2").await;
    c.must_get_on(&c.nodes(), "a", "a-1").await;
    c.must_get_on(&c.nodes(), "q", "q-1").await;

    // A restart brings the merged region back, not the source.
    c.stop_node(2);
    c.restart_node(2);
    wait_merged(&c, &[2]).await;
    c.must_get_on(&[2], "z", "z-2").await;
}

/// Drops region 1's messages to node 3 that would tell it an index at or
/// above `from` is committed.
struct HideCommit {
    from: u64,
}

impl Filter for HideCommit {
    fn apply(&self, _: u64, _: u64, _: &mut Vec<Duration>) {}

    fn apply_msg(&self, msg: &RaftMessage, _: u64, to: u64, copies: &mut Vec<Duration>) {
        if msg.region_id != REGION_ID || to != 3 {
            return;
        }
        let Ok(m) = <raft::eraftpb::Message as protobuf::Message>::parse_from_bytes(&msg.message)
        else {
            return;
        };
        if m.commit >= self.from {
            copies.clear();
        }
    }
}

/// With one poller per node, node 3's target and source replicas share a
/// thread: the target's commit must not block on the source catching up.
/// (Waiting in the apply, as a replica on a thread of its own could, never
/// ended.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_replica_that_never_heard_the_prepare_committed_catches_up() {
    let c = Cluster::with_options(3, one_poller());
    let mut rev = 1;
    split(&c, &mut rev).await;
    // Node 1 leads the source, so node 3 is a follower the filter can
    // keep in the dark.
    let source = loop {
        let (id, h) = c.region_leader(REGION_ID).await;
        if id == 1 {
            break h;
        }
        let _ = h.transfer_leader(1).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let next = source.status().commit_index + 1;
    c.add_filter(HideCommit { from: next });
    let (index, term, frozen) = prepare(&c).await;
    assert!(index >= next);
    wait_for("every replica has the prepare", || {
        source.status().min_matched >= index
    })
    .await;
    let lagging = c.try_region(3, REGION_ID).unwrap();
    assert!(lagging.status().applied_index < index);
    commit(&c, &frozen, index, term).await.unwrap();
    wait_merged(&c, &c.nodes()).await;
    c.must_get_on(&[3], "a", "a-1").await;
}

/// The returning node's target replica gets a snapshot of the merged
/// region, which replaces its stale source replica; with one poller per
/// node they share a thread, so the target must not wait for the source to
/// go. (Waiting there, as a replica on a thread of its own could, never
/// ended.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_down_through_the_merge_comes_back_merged() {
    // A short log, so that the snapshot is needed.
    let c = Cluster::with_options(
        3,
        StoreOptions {
            log_gc_threshold: 5,
            ..one_poller()
        },
    );
    let mut rev = 1;
    split(&c, &mut rev).await;
    let (index, term, frozen) = prepare(&c).await;
    let (_, source) = c.region_leader(REGION_ID).await;
    wait_for("every replica has the prepare", || {
        source.status().min_matched >= index
    })
    .await;
    wait_for("node 3 applied the prepare", || {
        c.try_region(3, REGION_ID)
            .is_some_and(|h| h.status().applied_index >= index)
    })
    .await;
    c.stop_node(3);
    commit(&c, &frozen, index, term).await.unwrap();
    let target = wait_merged(&c, &[1, 2]).await;
    let region = target.status().region;
    for i in 0..20 {
        rev += 1;
        target
            .propose(put_cmd(&region, rev, &format!("k{i:02}"), "v"))
            .await
            .unwrap();
    }
    c.restart_node(3);
    wait_merged(&c, &[3]).await;
    c.must_get_on(&[3], "k19", "v").await;
    c.must_get_on(&[3], "a", "a-1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_merge_stays_refused_and_rolls_back() {
    let c = Cluster::new(3);
    let mut rev = 1;
    split(&c, &mut rev).await;
    let (index, term, frozen) = prepare(&c).await;
    let (_, target) = c.region_leader(TARGET).await;
    let reject = RejectMergeRequest {
        source_id: REGION_ID,
        prepare_index: index,
        source_end_key: b"m".to_vec(),
    };
    let answer = target
        .propose(cmd_for(&target.status().region, Cmd::RejectMerge(reject)))
        .await;
    assert!(matches!(answer, Err(Error::MergeRefused(_))), "{answer:?}");
    // The commit comes too late: refused, and nothing changes.
    let late = commit(&c, &frozen, index, term).await;
    assert!(matches!(late, Err(Error::MergeRefused(_))), "{late:?}");
    assert_eq!(target.status().region.start_key, b"m".to_vec());

    let (_, source) = c.region_leader(REGION_ID).await;
    let rollback = RollbackMergeRequest {
        prepare_index: index,
    };
    source
        .propose(cmd_for(&frozen, Cmd::RollbackMerge(rollback)))
        .await
        .unwrap();
    let region = source.status().region;
    assert!(source.status().merging.is_none());
    assert_eq!(region.region_epoch.unwrap().version, 4);
    rev += 1;
    source
        .propose(put_cmd(&region, rev, "b", "b-1"))
        .await
        .unwrap();
    c.must_get_on(&c.nodes(), "b", "b-1").await;
}
