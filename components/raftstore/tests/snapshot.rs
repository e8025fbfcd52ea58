//! Replicas that fell behind the leader's log GC catch up through a region
//! snapshot: afterwards their data equals the leader's, including keys the
//! leader deleted meanwhile, and normal replication resumes.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use proto::metapb;
use proto::raft_cmdpb::{raft_cmd_request::Cmd, CompactRequest, RaftCmdRequest};
use proto::raft_serverpb::RaftMessage;
use raftstore::{ConfChangeType, StoreOptions};
use test_support::raft_cluster::{delete, write, Cluster, Filter};

const GC_THRESHOLD: u64 = 50;

fn cluster() -> Cluster {
    Cluster::with_options(
        3,
        StoreOptions {
            log_gc_threshold: GC_THRESHOLD,
            // Installs in many batches.
            install_batch_bytes: 64 * 1024,
            ..Default::default()
        },
    )
}

fn others(all: &[u64], but: u64) -> Vec<u64> {
    all.iter().copied().filter(|&id| id != but).collect()
}

/// Waits until node `id` has applied revision `rev`.
async fn wait_revision(c: &Cluster, id: u64, rev: i64) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while c.handle(id).status().applied_revision < rev {
        assert!(
            Instant::now() < deadline,
            "node {id} never reached revision {rev}: {:?}",
            c.handle(id).status()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Asserts every node's state hashes the same at the leader's revision.
async fn assert_same_hash(c: &Cluster) {
    let applied = c.wait_same_applied(&[1, 2, 3]).await;
    let (_, h) = c.leader().await;
    let s = h.status();
    let hashes: Vec<u32> = (1..=3)
        .map(|id| {
            let st = c.handle(id).status();
            assert_eq!(st.applied_revision, s.applied_revision, "node {id}");
            assert_eq!(st.compact_revision, s.compact_revision, "node {id}");
            c.store(id)
                .mvcc()
                .snapshot()
                .hash(s.applied_revision, s.compact_revision, b"", b"")
                .unwrap()
        })
        .collect();
    assert!(
        hashes.iter().all(|&x| x == hashes[0]),
        "hashes differ at index {applied}: {hashes:?}"
    );
}

/// Stops a follower, writes `n` entries so the leader's log GC passes the
/// follower, and returns the follower and its applied index when stopped.
async fn leave_behind(c: &Cluster, rev: &mut i64, n: usize) -> (u64, u64) {
    let (leader, _) = c.leader().await;
    let follower = others(&[1, 2, 3], leader)[0];
    c.wait_same_applied(&[1, 2, 3]).await;
    let stopped_at = c.handle(follower).status().applied_index;
    c.stop_node(follower);
    for i in 0..n {
        c.must_put(rev, &format!("b{i}"), &format!("v{i}")).await;
    }
    let running = others(&[1, 2, 3], follower);
    c.wait_same_applied(&running).await;
    for id in running {
        let truncated = c.handle(id).status().truncated_index;
        assert!(
            truncated > stopped_at,
            "node {id} kept its log from {truncated}, the follower stopped at {stopped_at}"
        );
    }
    (follower, stopped_at)
}

#[tokio::test]
async fn lagging_follower_catches_up_by_snapshot() {
    let c = cluster();
    c.leader().await;
    let mut rev = 0;
    for i in 0..10 {
        c.must_put(&mut rev, &format!("a{i}"), "old").await;
    }
    let (follower, stopped_at) = leave_behind(&c, &mut rev, 150).await;
    // Overwrite some keys and compact, so the snapshot carries history
    // and a compaction point.
    for i in 0..5 {
        c.must_put(&mut rev, &format!("a{i}"), "new").await;
    }
    let (_, h) = c.leader().await;
    h.propose(RaftCmdRequest {
        header: write(0, "", "").header,
        cmd: Some(Cmd::Compact(CompactRequest { revision: rev - 2 })),
    })
    .await
    .unwrap();

    c.restart_node(follower);
    wait_revision(&c, follower, rev).await;
    let st = c.handle(follower).status();
    assert!(
        st.truncated_index > stopped_at,
        "the follower's log restarts after the snapshot: {st:?}"
    );
    for i in 0..150 {
        assert_eq!(
            c.get(follower, &format!("b{i}")),
            Some(format!("v{i}").into_bytes()),
            "b{i}"
        );
    }
    for i in 0..10 {
        let want = if i < 5 { "new" } else { "old" };
        assert_eq!(
            c.get(follower, &format!("a{i}")).as_deref(),
            Some(want.as_bytes())
        );
    }
    assert_same_hash(&c).await;

    // Normal replication resumes from the log after the snapshot.
    for i in 0..20 {
        c.must_put(&mut rev, &format!("c{i}"), "after").await;
    }
    c.must_get_on(&[follower], "c19", "after").await;
    assert_same_hash(&c).await;

    // The installed state (log, hard and conf state) survives a restart.
    c.stop_node(follower);
    c.restart_node(follower);
    assert_eq!(c.get(follower, "b149").as_deref(), Some(&b"v149"[..]));
    c.must_put(&mut rev, "d", "restarted").await;
    c.must_get_on(&[follower], "d", "restarted").await;
    assert_same_hash(&c).await;
}

#[tokio::test]
async fn snapshot_removes_keys_deleted_meanwhile() {
    let c = cluster();
    c.leader().await;
    let mut rev = 0;
    c.must_put(&mut rev, "gone", "1").await;
    c.must_put(&mut rev, "kept", "1").await;
    c.must_get_on(&[1, 2, 3], "kept", "1").await;
    let (leader, _) = c.leader().await;
    let follower = others(&[1, 2, 3], leader)[0];
    c.wait_same_applied(&[1, 2, 3]).await;
    let stopped_at = c.handle(follower).status().applied_index;
    c.stop_node(follower);
    loop {
        rev += 1;
        let (_, h) = c.leader().await;
        if h.propose(delete(rev, "gone")).await.is_ok() {
            break;
        }
    }
    for i in 0..120 {
        c.must_put(&mut rev, &format!("b{i}"), "x").await;
    }
    // Compacted past the delete, the leader no longer has even a tombstone
    // of `gone`: only deleting the follower's own data removes its copy.
    let (l, h) = c.leader().await;
    h.propose(RaftCmdRequest {
        header: write(0, "", "").header,
        cmd: Some(Cmd::Compact(CompactRequest { revision: rev })),
    })
    .await
    .unwrap();
    tokio::time::timeout(Duration::from_secs(10), h.wait_physically_compacted(rev))
        .await
        .expect("compaction finishes")
        .unwrap();
    assert!(
        c.handle(l).status().truncated_index > stopped_at,
        "the leader's log no longer holds what the follower needs"
    );
    assert_eq!(c.get(l, "gone"), None);

    c.restart_node(follower);
    assert_eq!(c.get(follower, "gone").as_deref(), Some(&b"1"[..]));
    wait_revision(&c, follower, rev).await;
    assert_eq!(
        c.get(follower, "gone"),
        None,
        "stale key survived the snapshot"
    );
    assert_eq!(c.get(follower, "kept").as_deref(), Some(&b"1"[..]));
    assert_same_hash(&c).await;
}

/// The snapshot files in node `id`'s snapshot directory.
fn snapshot_files(c: &Cluster, id: u64) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(c.data_dir(id).join("snap"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Drops the first `drop` region snapshots sent to node `to`, and sends
/// every later one `copies` times.
struct SnapshotFaults {
    to: u64,
    drop: AtomicUsize,
    copies: usize,
}

impl Filter for SnapshotFaults {
    fn apply(&self, _: u64, _: u64, _: &mut Vec<Duration>) {}

    fn apply_msg(&self, msg: &RaftMessage, _: u64, to: u64, copies: &mut Vec<Duration>) {
        let Ok(m) = <raft::eraftpb::Message as protobuf::Message>::parse_from_bytes(&msg.message)
        else {
            return;
        };
        if to != self.to || m.get_msg_type() != raft::eraftpb::MessageType::MsgSnapshot {
            return;
        }
        let dropped = self
            .drop
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if dropped {
            copies.clear();
        } else {
            *copies = vec![Duration::ZERO; self.copies];
        }
    }
}

/// A snapshot many times the transport's chunk travels as a file, is
/// installed whole, and leaves no file behind on the follower; one the
/// transport lost is sent again (raft hears of the loss).
#[tokio::test]
async fn large_snapshots_travel_as_files_and_lost_ones_are_resent() {
    snapshot_under_faults(2, 1).await;
}

/// Copies of one snapshot arrive under one file name, possibly while the
/// first is kept for installing: dropping a copy must not delete the file
/// the first is installed from.
#[tokio::test]
async fn duplicated_snapshots_are_installed_once() {
    snapshot_under_faults(0, 3).await;
}

async fn snapshot_under_faults(drop: usize, copies: usize) {
    let c = cluster();
    c.leader().await;
    let mut rev = 0;
    let (leader, _) = c.leader().await;
    let follower = others(&[1, 2, 3], leader)[0];
    c.wait_same_applied(&[1, 2, 3]).await;
    c.stop_node(follower);
    // About 1.2 MiB of values: 19 chunks of the in-process transport.
    let value = "v".repeat(8 * 1024);
    for i in 0..150 {
        c.must_put(&mut rev, &format!("big{i:03}"), &value).await;
    }
    c.add_filter(SnapshotFaults {
        to: follower,
        drop: AtomicUsize::new(drop),
        copies,
    });
    c.restart_node(follower);
    wait_revision(&c, follower, rev).await;
    for i in [0, 77, 149] {
        assert_eq!(
            c.get(follower, &format!("big{i:03}")).as_deref(),
            Some(value.as_bytes())
        );
    }
    assert_same_hash(&c).await;
    assert_eq!(snapshot_files(&c, follower), Vec::<String>::new());
    let (leader, _) = c.leader().await;
    let generated = snapshot_files(&c, leader);
    assert!(
        generated.len() <= 1 && generated.iter().all(|f| f.ends_with(".gen")),
        "the leader keeps its newest generated snapshot only: {generated:?}"
    );
}

/// A snapshot generated before a replica joined has a configuration
/// without it, which the new replica refuses: it must get a newer one,
/// not that one again and again.
#[tokio::test]
async fn a_replica_added_after_a_snapshot_was_generated_gets_a_newer_one() {
    let c = Cluster::with_spare_and_options(
        3,
        1,
        StoreOptions {
            log_gc_threshold: GC_THRESHOLD,
            ..Default::default()
        },
    );
    c.leader().await;
    let mut rev = 0;
    // A follower behind the log GC makes the leader generate a snapshot.
    let (follower, _) = leave_behind(&c, &mut rev, 150).await;
    c.restart_node(follower);
    wait_revision(&c, follower, rev).await;
    let learner = metapb::Peer {
        id: 4,
        node_id: 4,
        role: metapb::PeerRole::Learner as i32,
    };
    c.must_change_peers(vec![(ConfChangeType::AddLearnerNode, learner)])
        .await;
    c.must_get_on(&[4], "b149", "v149").await;
}
