//! The replicas' consistency check (ComputeHash, hashes judged by
//! majority on the leader) on an in-process 3-node cluster with a short
//! check interval: healthy replicas pass check after check across writes,
//! a split and a compaction, and a merge, and none reports a difference; a
//! replica caught up by a snapshot neither; a version written into one
//! replica's RocksDB behind raft's back is found by the leader, which
//! names that replica's node, whether it is a follower or the leader
//! itself.

use std::time::{Duration, Instant};

use engine::WriteBatch;
use proto::raft_cmdpb::{
    mutation::Op, raft_cmd_request::Cmd, CommitMergeRequest, CompactRequest, Mutation,
    PrepareMergeRequest, SplitRequest,
};
use raftstore::{RegionHandle, StoreOptions};
use test_support::raft_cluster::{cmd_for, Cluster, REGION_ID};

const INTERVAL: Duration = Duration::from_millis(200);
const RIGHT: u64 = 100;

fn options() -> StoreOptions {
    StoreOptions {
        consistency_check_interval: INTERVAL,
        ..Default::default()
    }
}

async fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Puts `key` at the next revision through the leader of `region_id`.
async fn put(c: &Cluster, region_id: u64, rev: &mut i64, key: &str) {
    *rev += 1;
    let (_, h): (u64, RegionHandle) = c.region_leader(region_id).await;
    let mut cmd = test_support::raft_cluster::write_to(region_id, *rev, key, "v");
    if let Some(hdr) = cmd.header.as_mut() {
        hdr.region_epoch = h.status().region.region_epoch;
    }
    h.propose(cmd).await.expect("put");
}

fn passed(c: &Cluster) -> u64 {
    c.nodes()
        .iter()
        .map(|id| c.store(*id).consistency_checks_passed())
        .sum()
}

fn assert_no_inconsistency(c: &Cluster) {
    for id in c.nodes() {
        let found = c.store(id).inconsistencies().borrow().clone();
        assert!(found.is_empty(), "node {id} reported {found:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn healthy_replicas_pass_across_writes_split_and_compaction() {
    let c = Cluster::with_options(3, options());
    let mut rev = 1;
    for i in 0..20 {
        put(&c, REGION_ID, &mut rev, &format!("k{i:02}")).await;
    }
    // A check passes once every replica's hash reached the leader.
    wait_for("checks of the one region", || passed(&c) >= 2).await;

    split(&c).await;
    let before = passed(&c);
    let writes = async {
        for i in 0..30 {
            put(&c, REGION_ID, &mut rev, &format!("k0{i:02}")).await;
            put(&c, RIGHT, &mut rev, &format!("k9{i:02}")).await;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    writes.await;
    for region_id in [REGION_ID, RIGHT] {
        let (_, h) = c.region_leader(region_id).await;
        h.propose(cmd_for(
            &h.status().region,
            Cmd::Compact(CompactRequest { revision: rev - 5 }),
        ))
        .await
        .expect("compact");
    }
    put(&c, RIGHT, &mut rev, "k999").await;
    // Both regions are checked again, after the split and the compaction.
    wait_for("checks of both regions", || passed(&c) >= before + 4).await;
    assert_no_inconsistency(&c);
}

/// Splits region 1 at "k10" into [`RIGHT`] and waits for it everywhere.
async fn split(c: &Cluster) {
    let (_, h) = c.leader().await;
    let split = SplitRequest {
        split_key: b"k10".to_vec(),
        new_region_id: RIGHT,
        new_peer_ids: vec![101, 102, 103],
    };
    h.propose(cmd_for(&h.status().region, Cmd::Split(split)))
        .await
        .expect("split");
    for id in c.nodes() {
        wait_for("the split everywhere", || c.try_region(id, RIGHT).is_some()).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn healthy_replicas_pass_across_a_merge() {
    let c = Cluster::with_options(3, options());
    let mut rev = 1;
    for i in 0..20 {
        put(&c, REGION_ID, &mut rev, &format!("k{i:02}")).await;
    }
    split(&c).await;
    put(&c, RIGHT, &mut rev, "k50").await;
    let (_, source) = c.region_leader(REGION_ID).await;
    let (_, target) = c.region_leader(RIGHT).await;
    let prepare = PrepareMergeRequest {
        target: Some(target.status().region),
    };
    let applied = source
        .propose(cmd_for(&source.status().region, Cmd::PrepareMerge(prepare)))
        .await
        .expect("prepare");
    let frozen = source.status();
    wait_for("every replica has the prepare", || {
        source.status().min_matched >= applied.index
    })
    .await;
    let commit = CommitMergeRequest {
        source: Some(frozen.region.clone()),
        prepare_index: applied.index,
        prepare_term: frozen.term,
    };
    target
        .propose(cmd_for(&target.status().region, Cmd::CommitMerge(commit)))
        .await
        .expect("commit");
    for id in c.nodes() {
        wait_for("the merge everywhere", || {
            c.try_region(id, REGION_ID).is_none()
                && c.try_region(id, RIGHT)
                    .is_some_and(|h| h.status().region.start_key.is_empty())
        })
        .await;
    }
    let before = passed(&c);
    for i in 0..10 {
        put(&c, RIGHT, &mut rev, &format!("k0{i:02}")).await;
    }
    wait_for("checks of the merged region", || passed(&c) >= before + 2).await;
    assert_no_inconsistency(&c);
}

/// Writes a version of a key no raft entry wrote into `node`'s RocksDB.
fn tamper(c: &Cluster, node: u64) {
    let store = c.store(node);
    let mut wb = WriteBatch::default();
    store.mvcc().stage_changes(
        &mut wb,
        2,
        &[Mutation {
            op: Op::Put as i32,
            key: b"bogus".to_vec(),
            sub: 7,
            value: b"x".to_vec(),
            ..Default::default()
        }],
    );
    store.kv_engine().write(wb).expect("tamper");
}

/// Tampers with `victim` once checks pass, and waits for the leader
/// (`judge`) to name it; nobody else names anyone.
async fn victim_is_named(c: &Cluster, victim: u64, judge: u64) {
    let mut rev = 1;
    for i in 0..10 {
        put(c, REGION_ID, &mut rev, &format!("k{i}")).await;
    }
    wait_for("a first check", || passed(c) >= 1).await;
    assert_no_inconsistency(c);
    tamper(c, victim);

    wait_for("the leader to find the difference", || {
        !c.store(judge).inconsistencies().borrow().is_empty()
    })
    .await;
    let found = c.store(judge).inconsistencies().borrow().clone();
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].region_id, REGION_ID);
    assert_eq!(found[0].node_id, victim);
    let majority = found[0].majority_hash.expect("two healthy replicas agree");
    assert_ne!(found[0].hash, majority);
    for id in c.nodes().into_iter().filter(|id| *id != judge) {
        let found = c.store(id).inconsistencies().borrow().clone();
        assert!(found.is_empty(), "node {id} reported {found:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_follower_changed_behind_raft_is_named() {
    let c = Cluster::with_options(3, options());
    let (leader, _) = c.leader().await;
    let victim = c
        .nodes()
        .into_iter()
        .find(|id| *id != leader)
        .expect("a follower");
    victim_is_named(&c, victim, leader).await;
}

/// The leader's own state differs: its healthy followers agree, and it
/// names itself (comparing with the leader alone would blame them).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_changed_behind_raft_names_itself() {
    let c = Cluster::with_options(3, options());
    let (leader, _) = c.leader().await;
    victim_is_named(&c, leader, leader).await;
}

/// A replica that was down catches up by a region snapshot while checks
/// go on: no check compares it at an index it did not hash itself, and
/// none finds a difference.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_caught_up_by_snapshot_stays_consistent() {
    let c = Cluster::with_options(
        3,
        StoreOptions {
            log_gc_threshold: 8,
            ..options()
        },
    );
    let mut rev = 1;
    put(&c, REGION_ID, &mut rev, "a").await;
    let (leader, _) = c.leader().await;
    let down = c
        .nodes()
        .into_iter()
        .find(|id| *id != leader)
        .expect("a follower");
    c.stop_node(down);
    for i in 0..40 {
        put(&c, REGION_ID, &mut rev, &format!("k{i:02}")).await;
    }
    c.restart_node(down);
    // A check passes only once every replica reported: the restarted one
    // takes part.
    let before = passed(&c);
    wait_for("checks passed with the restarted node", || {
        passed(&c) >= before + 2
    })
    .await;
    wait_for("the restarted node's data", || c.get(down, "k39").is_some()).await;
    assert_no_inconsistency(&c);
}
