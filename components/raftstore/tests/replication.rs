//! A three-replica region over the in-process cluster: writes replicate to
//! every replica, survive leader isolation, message loss and node restarts,
//! and are acknowledged only once a quorum has them.

use std::time::Duration;

use raftstore::Error;
use test_support::raft_cluster::{write, Cluster, Delay, Duplicate, Loss};

fn others(all: &[u64], but: u64) -> Vec<u64> {
    all.iter().copied().filter(|&id| id != but).collect()
}

#[tokio::test]
async fn writes_apply_on_every_replica() {
    let c = Cluster::new(3);
    let (leader, _) = c.leader().await;
    for rev in 1..=50 {
        c.put(rev, &format!("k{rev}"), &format!("v{rev}"))
            .await
            .unwrap();
    }
    c.must_get_on(&[1, 2, 3], "k50", "v50").await;
    for id in 1..=3 {
        for rev in 1..=50 {
            assert_eq!(
                c.get(id, &format!("k{rev}")).as_deref(),
                Some(format!("v{rev}").as_bytes()),
                "node {id}"
            );
        }
    }
    let applied = c.wait_same_applied(&[1, 2, 3]).await;
    assert!(applied >= 50, "{applied}");
    for id in others(&[1, 2, 3], leader) {
        let s = c.handle(id).status();
        assert!(!s.ready_leader);
        assert_eq!(s.leader_peer_id, leader, "node {id} follows the leader");
        assert_eq!(s.applied_revision, 50);
    }
}

#[tokio::test]
async fn isolated_leader_loses_its_proposal() {
    let c = Cluster::new(3);
    let (old, h) = c.leader().await;
    let old_term = h.status().term;
    c.put(1, "before", "1").await.unwrap();
    let majority = others(&[1, 2, 3], old);
    c.partition(&[old], &majority);
    // Accepted: the old leader does not know yet that it is cut off.
    let mut stale = tokio::spawn({
        let h = h.clone();
        async move { h.propose(write(2, "lost", "x")).await }
    });
    let early = tokio::time::timeout(Duration::from_secs(2), &mut stale).await;
    assert!(
        !matches!(early, Ok(Ok(Ok(_)))),
        "an isolated leader committed a write: {early:?}"
    );

    let (_, nh) = c.leader_among(&majority).await;
    assert!(nh.status().term > old_term);
    for rev in 3..=12 {
        nh.propose(write(rev, &format!("m{rev}"), "y"))
            .await
            .unwrap();
    }
    // Check quorum makes it step down, after which it refuses to serve.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while h.status().ready_leader {
        assert!(
            std::time::Instant::now() < deadline,
            "isolated leader never stepped down"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(matches!(
        h.propose(write(100, "no", "no")).await,
        Err(Error::NotLeader { .. })
    ));

    c.heal();
    let res = tokio::time::timeout(Duration::from_secs(10), stale)
        .await
        .expect("the stale proposal is answered after heal")
        .unwrap();
    // Either the new leader's entries replaced it here (outcome unknown:
    // in general another replica might still hold it), or the entry that
    // took its slot was applied first (certainly not applied).
    assert!(
        matches!(res, Err(Error::StaleCommand(_) | Error::OutcomeUnknown(_))),
        "{res:?}"
    );
    c.must_get_on(&[1, 2, 3], "m12", "y").await;
    c.wait_same_applied(&[1, 2, 3]).await;
    for id in 1..=3 {
        assert_eq!(c.get(id, "lost"), None, "node {id}");
        assert_eq!(c.get(id, "before").as_deref(), Some(&b"1"[..]));
        assert_eq!(c.handle(id).status().applied_revision, 12);
    }
    let (_, leader) = c.leader().await;
    assert!(leader.status().term > old_term);
}

#[tokio::test]
async fn writes_survive_message_loss() {
    let c = Cluster::new(3);
    c.leader().await;
    c.add_filter(Loss { rate: 0.2 });
    let mut rev = 0;
    // Ten clients' worth in flight at a time, as under real load.
    let kvs: Vec<(String, String)> = (0..200)
        .map(|i| (format!("k{i}"), format!("v{i}")))
        .collect();
    for chunk in kvs.chunks(10) {
        c.must_put_all(&mut rev, chunk).await;
    }
    // Still lossy: raft's retries, not a healed network, bring them along.
    for i in 0..200 {
        c.must_get_on(&[1, 2, 3], &format!("k{i}"), &format!("v{i}"))
            .await;
    }
    c.wait_same_applied(&[1, 2, 3]).await;
}

#[tokio::test]
async fn writes_survive_delay_and_duplication() {
    let c = Cluster::new(3);
    c.leader().await;
    c.add_filter(Delay {
        max: Duration::from_millis(30),
    });
    c.add_filter(Duplicate { rate: 0.3 });
    let mut rev = 0;
    for i in 0..100 {
        c.must_put(&mut rev, &format!("k{i}"), &format!("v{i}"))
            .await;
    }
    for i in 0..100 {
        c.must_get_on(&[1, 2, 3], &format!("k{i}"), &format!("v{i}"))
            .await;
    }
    c.wait_same_applied(&[1, 2, 3]).await;
}

#[tokio::test]
async fn restarted_follower_catches_up_from_the_log() {
    let c = Cluster::new(3);
    let (leader, _) = c.leader().await;
    let mut rev = 0;
    for i in 0..10 {
        c.must_put(&mut rev, &format!("a{i}"), "1").await;
    }
    let follower = others(&[1, 2, 3], leader)[0];
    c.must_get_on(&[follower], "a9", "1").await;
    c.stop_node(follower);
    for i in 0..100 {
        c.must_put(&mut rev, &format!("b{i}"), "2").await;
    }
    c.restart_node(follower);
    assert_eq!(
        c.get(follower, "b0"),
        None,
        "restarted without the new writes"
    );
    c.must_get_on(&[follower], "b99", "2").await;
    for i in 0..100 {
        assert_eq!(
            c.get(follower, &format!("b{i}")).as_deref(),
            Some(&b"2"[..])
        );
    }
    c.wait_same_applied(&[1, 2, 3]).await;
    assert_eq!(c.handle(follower).status().applied_revision, rev);
}

#[tokio::test]
async fn writes_need_a_quorum() {
    let c = Cluster::new(3);
    let (l, h) = c.leader().await;
    let f = others(&[1, 2, 3], l);
    // One follower cut off: the other one makes a quorum.
    c.partition(&[l], &[f[0]]);
    tokio::time::timeout(Duration::from_secs(5), h.propose(write(1, "acked", "1")))
        .await
        .expect("a quorum of two answers")
        .unwrap();
    // The acknowledged write outlives its leader: the follower that took
    // it hands it to the other.
    c.stop_node(l);
    c.heal();
    let (l2, h2) = c.leader_among(&f).await;
    c.must_get_on(&f, "acked", "1").await;

    // With the leader cut off from both others (one stopped, one
    // partitioned), nothing can be acknowledged.
    let rest = others(&f, l2);
    c.partition(&[l2], &rest);
    let pending = tokio::spawn({
        let h2 = h2.clone();
        async move { h2.propose(write(2, "unacked", "2")).await }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !pending.is_finished(),
        "proposal answered without a quorum: {:?}",
        pending.await
    );
    for &id in &f {
        assert_eq!(c.get(id, "unacked"), None, "node {id}");
    }
}
