//! Membership changes: a replica added on an empty node (as a learner)
//! catches up through a snapshot, is promoted to voter, and a voter is
//! removed; acknowledged writes stay on every current voter throughout and
//! the removed replica is gone for good (tombstoned).

use std::time::{Duration, Instant};

use proto::metapb::{self, PeerRole};
use raft::eraftpb::ConfChangeType;
use test_support::raft_cluster::{Cluster, REGION_ID};

fn peer(id: u64) -> metapb::Peer {
    metapb::Peer {
        id,
        node_id: id,
        role: 0,
    }
}

/// Polls `cond` until it holds, failing with `what` after 15 s.
async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !cond() {
        assert!(Instant::now() < deadline, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The role of peer `peer_id` in node `node`'s view of the region.
fn role_on(c: &Cluster, node: u64, peer_id: u64) -> Option<PeerRole> {
    let region = c.try_handle(node)?.status().region;
    region
        .peers
        .iter()
        .find(|p| p.id == peer_id)
        .map(|p| p.role())
}

fn conf_ver_on(c: &Cluster, node: u64) -> u64 {
    c.try_handle(node)
        .and_then(|h| h.status().region.region_epoch)
        .map_or(0, |e| e.conf_ver)
}

/// Writes `n` keys `{prefix}{i}` and records them in `acked`.
async fn write_keys(
    c: &Cluster,
    rev: &mut i64,
    prefix: &str,
    n: usize,
    acked: &mut Vec<(String, String)>,
) {
    for i in 0..n {
        let (k, v) = (format!("{prefix}{i}"), format!("v{prefix}{i}"));
        c.must_put(rev, &k, &v).await;
        acked.push((k, v));
    }
}

/// Every acknowledged write is on every node of `nodes`, and their states
/// hash the same at the leader's revision.
async fn assert_consistent(c: &Cluster, nodes: &[u64], acked: &[(String, String)]) {
    if let Some((k, v)) = acked.last() {
        c.must_get_on(nodes, k, v).await;
    }
    c.wait_same_applied(nodes).await;
    for &id in nodes {
        for (k, v) in acked {
            assert_eq!(
                c.get(id, k).as_deref(),
                Some(v.as_bytes()),
                "node {id}: {k}"
            );
        }
    }
    let (_, h) = c.leader_among(nodes).await;
    let s = h.status();
    let hashes: Vec<u32> = nodes
        .iter()
        .map(|&id| {
            let st = c.handle(id).status();
            assert_eq!(st.applied_revision, s.applied_revision, "node {id}");
            c.store(id)
                .mvcc()
                .snapshot()
                .hash(s.applied_revision, s.compact_revision, b"", b"")
                .unwrap()
        })
        .collect();
    assert!(
        hashes.iter().all(|&x| x == hashes[0]),
        "hashes differ on {nodes:?}: {hashes:?}"
    );
}

/// Adds node 4's peer as a learner and waits until it has the data.
async fn add_learner_4(c: &Cluster, acked: &[(String, String)]) {
    assert!(c.try_handle(4).is_none(), "the spare node starts empty");
    c.must_change_peers(vec![(ConfChangeType::AddLearnerNode, peer(4))])
        .await;
    wait_until("node 4 hosts the region", || {
        c.try_handle(4)
            .is_some_and(|h| h.status().applied_index > 0)
    })
    .await;
    let (k, v) = acked.last().unwrap();
    c.must_get_on(&[4], k, v).await;
}

/// Waits until node `node`'s replica, removed from the region, has
/// stopped, and checks that its data went with it.
async fn wait_gone(c: &Cluster, node: u64) {
    wait_until(&format!("node {node}'s removed replica goes"), || {
        c.try_handle(node).is_none()
    })
    .await;
    let everything = mvcc::KeyRange::from_etcd(b"\0", b"\0");
    let left = c
        .store(node)
        .mvcc()
        .snapshot()
        .range(&everything, i64::MAX, 0, false);
    assert_eq!(
        left.unwrap().count,
        0,
        "node {node} kept data of its removed replica"
    );
}

/// Gives node 4, whose replica (peer 4) was removed, the region again as
/// learner peer 5, and waits until peer 5 has the data.
async fn add_peer_5_on_node_4(c: &Cluster) {
    let again = metapb::Peer {
        id: 5,
        node_id: 4,
        role: PeerRole::Learner as i32,
    };
    c.must_change_peers(vec![(ConfChangeType::AddLearnerNode, again)])
        .await;
    wait_until("node 4 hosts peer 5", || {
        c.try_handle(4)
            .is_some_and(|h| h.status().peer_id == 5 && h.status().applied_index > 0)
    })
    .await;
}

/// Three voters holding ten keys, and node 4's replica added as a learner
/// and promoted: the cluster, the revision and the writes acknowledged.
async fn four_voters() -> (Cluster, i64, Vec<(String, String)>) {
    let c = Cluster::new_with_spare(3, 1);
    let mut rev = 0;
    let mut acked = Vec::new();
    write_keys(&c, &mut rev, "a", 10, &mut acked).await;
    add_learner_4(&c, &acked).await;
    c.must_change_peers(vec![(ConfChangeType::AddNode, peer(4))])
        .await;
    (c, rev, acked)
}

#[tokio::test]
async fn learner_catches_up_by_snapshot_and_does_not_vote() {
    let c = Cluster::new_with_spare(3, 1);
    let mut rev = 0;
    let mut acked = Vec::new();
    write_keys(&c, &mut rev, "a", 20, &mut acked).await;
    add_learner_4(&c, &acked).await;

    // The new replica started with an empty log: only a snapshot, at an
    // index past the bootstrap point, can have brought it the data.
    let s4 = c.handle(4).status();
    assert!(s4.truncated_index > 5, "{s4:?}");
    let (leader, h) = c.leader().await;
    assert_eq!(s4.region.start_key, h.status().region.start_key);
    assert_eq!(s4.region.end_key, h.status().region.end_key);
    for id in 1..=4 {
        wait_until(&format!("node {id} sees the learner"), || {
            conf_ver_on(&c, id) == 2 && role_on(&c, id, 4) == Some(PeerRole::Learner)
        })
        .await;
        for voter in 1..=3 {
            assert_eq!(role_on(&c, id, voter), Some(PeerRole::Voter), "node {id}");
        }
    }
    assert!(!c.handle(4).status().ready_leader);
    assert_consistent(&c, &[1, 2, 3, 4], &acked).await;

    // The learner is no part of the quorum: with it cut off and one voter
    // down, two of the three voters still commit. Were it a voter, two of
    // four could not.
    let follower = [1, 2, 3].into_iter().find(|&id| id != leader).unwrap();
    let rest: Vec<u64> = [1, 2, 3].into_iter().filter(|&id| id != follower).collect();
    c.partition(&[4], &[1, 2, 3]);
    c.stop_node(follower);
    write_keys(&c, &mut rev, "b", 10, &mut acked).await;
    assert_consistent(&c, &rest, &acked).await;
    assert!(!c.handle(4).status().ready_leader);

    c.heal();
    c.restart_node(follower);
    write_keys(&c, &mut rev, "c", 5, &mut acked).await;
    assert_consistent(&c, &[1, 2, 3, 4], &acked).await;
}

#[tokio::test]
async fn promote_learner_then_remove_a_voter() {
    let (c, mut rev, mut acked) = four_voters().await;
    for id in 1..=4 {
        wait_until(&format!("node {id} sees peer 4 promoted"), || {
            conf_ver_on(&c, id) == 3 && role_on(&c, id, 4) == Some(PeerRole::Voter)
        })
        .await;
    }
    write_keys(&c, &mut rev, "b", 10, &mut acked).await;
    assert_consistent(&c, &[1, 2, 3, 4], &acked).await;

    // Node 1 may be the leader: it then answers and steps out itself.
    c.must_change_peers(vec![(ConfChangeType::RemoveNode, peer(1))])
        .await;
    wait_gone(&c, 1).await;
    for id in 2..=4 {
        wait_until(&format!("node {id} sees peer 1 removed"), || {
            conf_ver_on(&c, id) == 4 && role_on(&c, id, 1).is_none()
        })
        .await;
        let region = c.handle(id).status().region;
        let mut ids: Vec<u64> = region.peers.iter().map(|p| p.id).collect();
        ids.sort_unstable();
        assert_eq!(ids, [2, 3, 4], "node {id}");
        assert!(region.peers.iter().all(|p| p.role() == PeerRole::Voter));
    }
    write_keys(&c, &mut rev, "c", 10, &mut acked).await;
    assert_consistent(&c, &[2, 3, 4], &acked).await;

    // Tombstoned: a restart does not bring the replica back.
    c.stop_node(1);
    c.restart_node(1);
    assert!(c.store(1).region(REGION_ID).is_none());
    write_keys(&c, &mut rev, "d", 5, &mut acked).await;
    assert!(c.store(1).region(REGION_ID).is_none());
    assert_consistent(&c, &[2, 3, 4], &acked).await;
}

#[tokio::test]
async fn invalid_changes_are_refused() {
    let c = Cluster::new_with_spare(3, 1);
    let (_, h) = c.leader().await;
    let invalid =
        |r: raftstore::Result<()>| matches!(r, Err(raftstore::Error::InvalidConfChange(_)));
    // Not a member.
    assert!(invalid(
        h.change_peers(vec![(ConfChangeType::RemoveNode, peer(9))])
            .await
    ));
    // A second replica on node 2.
    let twin = metapb::Peer {
        id: 9,
        node_id: 2,
        role: 0,
    };
    assert!(invalid(
        h.change_peers(vec![(ConfChangeType::AddLearnerNode, twin)])
            .await
    ));
    assert!(invalid(h.change_peers(Vec::new()).await));
    // A follower refuses with not-leader.
    let (leader, _) = c.leader().await;
    let follower = [1, 2, 3].into_iter().find(|&id| id != leader).unwrap();
    assert!(matches!(
        c.handle(follower)
            .change_peers(vec![(ConfChangeType::AddLearnerNode, peer(4))])
            .await,
        Err(raftstore::Error::NotLeader { .. })
    ));
    assert_eq!(conf_ver_on(&c, leader), 1);
}

#[tokio::test]
async fn removing_the_leader_hands_over() {
    let (c, mut rev, mut acked) = four_voters().await;
    let (leader, h) = c.leader().await;
    // Proposed on the leader itself, which applies it, answers, and stops.
    h.change_peers(vec![(ConfChangeType::RemoveNode, peer(leader))])
        .await
        .unwrap();
    wait_until("the old leader's replica stops", || {
        c.try_handle(leader).is_none()
    })
    .await;
    let rest: Vec<u64> = (1..=4).filter(|&id| id != leader).collect();
    write_keys(&c, &mut rev, "b", 10, &mut acked).await;
    let (new_leader, _) = c.leader().await;
    assert_ne!(new_leader, leader);
    for &id in &rest {
        wait_until(&format!("node {id} sees the old leader removed"), || {
            role_on(&c, id, leader).is_none()
        })
        .await;
    }
    assert_consistent(&c, &rest, &acked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_leader_hands_over_and_refuses_non_voters() {
    let c = Cluster::new(3);
    let mut rev = 1;
    c.must_put(&mut rev, "k", "v").await;
    let (old, handle) = c.leader().await;
    let target = c.running().into_iter().find(|n| *n != old).unwrap();
    handle.transfer_leader(target).await.unwrap();
    wait_until("the target leads", || {
        c.handle(target).status().ready_leader
    })
    .await;
    // Only a leader can hand over, and only to a voter.
    assert!(matches!(
        c.handle(old).transfer_leader(target).await,
        Err(raftstore::Error::NotLeader { .. })
    ));
    assert!(matches!(
        c.handle(target).transfer_leader(77).await,
        Err(raftstore::Error::InvalidConfChange(_))
    ));
    c.must_put(&mut rev, "k2", "v2").await;
    c.must_get_on(&[1, 2, 3], "k2", "v2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_reports_pending_and_down_peers() {
    let c = Cluster::new(3);
    let mut rev = 1;
    c.must_put(&mut rev, "k", "v").await;
    let (leader, _) = c.leader().await;
    let follower = c.running().into_iter().find(|n| *n != leader).unwrap();
    c.stop_node(follower);
    // Far enough behind to be pending...
    for i in 0..(raftstore::peer::PENDING_LAG + 10) {
        c.must_put(&mut rev, &format!("p{i}"), "v").await;
    }
    let h = c.handle(leader);
    assert!(h.status().pending_peers.contains(&follower));
    // ...and, once silent long enough, down; the live follower is neither.
    wait_until("the stopped follower is reported down", || {
        h.status().down_peers.contains(&follower)
    })
    .await;
    let status = h.status();
    assert_eq!(status.down_peers, vec![follower]);
    assert_eq!(status.pending_peers, vec![follower]);
    c.restart_node(follower);
    wait_until(
        "the restarted follower caught up and is heard again",
        || {
            let s = h.status();
            s.down_peers.is_empty() && s.pending_peers.is_empty()
        },
    )
    .await;
}

/// A voter cut off while it is removed never gets the entry that removes
/// it: the leader stops sending to a peer it removed. Once the partition
/// heals, its campaigns reach replicas that know it is gone; they answer
/// that it is, and it tombstones itself and deletes its data (before, it
/// campaigned for good, and the node routed reads of the region to it).
#[tokio::test]
async fn a_voter_removed_while_cut_off_learns_it_and_goes() {
    let (c, mut rev, mut acked) = four_voters().await;
    // Node 3 must not lead: it would apply its own removal.
    let (leader, h) = c.leader().await;
    if leader == 3 {
        h.transfer_leader(1).await.unwrap();
    }
    c.leader_among(&[1, 2, 4]).await;
    wait_until("node 3 sees peer 4 promoted", || conf_ver_on(&c, 3) == 3).await;
    c.partition(&[3], &[1, 2, 4]);
    c.must_change_peers(vec![(ConfChangeType::RemoveNode, peer(3))])
        .await;
    write_keys(&c, &mut rev, "b", 5, &mut acked).await;
    assert_eq!(conf_ver_on(&c, 3), 3, "node 3 heard of its removal");
    c.heal();
    wait_gone(&c, 3).await;
    write_keys(&c, &mut rev, "c", 5, &mut acked).await;
    assert_consistent(&c, &[1, 2, 4], &acked).await;
}

/// A learner removed while cut off never campaigns, so nobody tells it it
/// is gone; when its node is given the region again (a new peer id, a
/// newer membership), the first message to the new peer ends the old
/// replica, and the new one is created and catches up (before, the old
/// replica kept the region's place on the node and dropped every message
/// to the new peer).
#[tokio::test]
async fn a_node_given_a_region_again_drops_its_removed_replica() {
    let c = Cluster::new_with_spare(3, 1);
    let mut rev = 0;
    let mut acked = Vec::new();
    write_keys(&c, &mut rev, "a", 10, &mut acked).await;
    add_learner_4(&c, &acked).await;
    c.partition(&[4], &[1, 2, 3]);
    c.must_change_peers(vec![(ConfChangeType::RemoveNode, peer(4))])
        .await;
    write_keys(&c, &mut rev, "b", 5, &mut acked).await;
    c.heal();
    add_peer_5_on_node_4(&c).await;
    write_keys(&c, &mut rev, "c", 5, &mut acked).await;
    assert_consistent(&c, &[1, 2, 3, 4], &acked).await;
}

/// A voter cut off while a new voter is added, takes the lead, and the old
/// leader is removed, knows none of the replicas that now run the region
/// but itself and one other: the leader is a stranger to it. Once the
/// partition heals it must take the leader's messages (they come from a
/// newer membership) and catch up; it is then needed for the quorum
/// (before, it dropped every message from the new leader and never caught
/// up, and the region stopped once one more voter was lost).
#[tokio::test]
async fn a_voter_that_missed_its_leaders_addition_catches_up() {
    let c = Cluster::new_with_spare(3, 1);
    let mut rev = 0;
    let mut acked = Vec::new();
    write_keys(&c, &mut rev, "a", 10, &mut acked).await;
    let (leader, h) = c.leader().await;
    if leader == 3 {
        h.transfer_leader(1).await.unwrap();
    }
    let (old_leader, _) = c.leader_among(&[1, 2]).await;
    let other = if old_leader == 1 { 2 } else { 1 };
    c.partition(&[3], &[1, 2, 4]);
    add_learner_4(&c, &acked).await;
    c.must_change_peers(vec![(ConfChangeType::AddNode, peer(4))])
        .await;
    // A transfer may come to nothing (node 4 may not have applied its
    // promotion when told to campaign): ask again until it leads.
    let deadline = Instant::now() + Duration::from_secs(15);
    while !c.handle(4).status().ready_leader {
        assert!(Instant::now() < deadline, "node 4 never leads");
        let _ = c.handle(old_leader).transfer_leader(4).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    c.must_change_peers(vec![(ConfChangeType::RemoveNode, peer(old_leader))])
        .await;
    wait_gone(&c, old_leader).await;
    write_keys(&c, &mut rev, "b", 5, &mut acked).await;
    assert_eq!(conf_ver_on(&c, 3), 1, "node 3 heard of the changes");

    c.heal();
    wait_until("node 3 learns the membership", || conf_ver_on(&c, 3) == 4).await;
    assert_consistent(&c, &[other, 3, 4], &acked).await;
    // Node 3 is now part of every quorum.
    c.stop_node(other);
    write_keys(&c, &mut rev, "c", 5, &mut acked).await;
    assert_consistent(&c, &[3, 4], &acked).await;
}

/// A removed replica's data is deleted as it stops, in batches, while
/// requests that found its handle may still read through it: a read whose
/// view was taken once the removal applied must be refused, not answered
/// from whatever the deletion left (before, it read the region's keys as
/// missing). So must one once the node has a new replica of the region,
/// whose state is kept under the same region id (the history checker found
/// a serializable read through the old one answering from the new one's
/// smaller range).
#[tokio::test]
async fn a_removed_replica_serves_no_read() {
    let c = Cluster::new_with_spare(3, 1);
    let mut rev = 0;
    let mut acked = Vec::new();
    write_keys(&c, &mut rev, "a", 10, &mut acked).await;
    add_learner_4(&c, &acked).await;
    let h4 = c.handle(4);
    let store4 = c.store(4);
    assert!(h4.read_state(&store4.mvcc().snapshot()).is_ok());
    c.must_change_peers(vec![(ConfChangeType::RemoveNode, peer(4))])
        .await;
    wait_gone(&c, 4).await;
    assert!(matches!(
        h4.read_state(&store4.mvcc().snapshot()),
        Err(raftstore::Error::RegionNotFound(REGION_ID))
    ));

    add_peer_5_on_node_4(&c).await;
    assert!(c.handle(4).read_state(&store4.mvcc().snapshot()).is_ok());
    assert!(matches!(
        h4.read_state(&store4.mvcc().snapshot()),
        Err(raftstore::Error::RegionNotFound(REGION_ID))
    ));
}
