//! Leases on an in-process 3-node cluster (the `lease` module's
//! contract): the region's leader expires a lease through raft unless it
//! is renewed; a new leader gives the leases it takes over their whole
//! TTL, or their checkpointed remainder; a follower that caught up by a
//! region snapshot holds the records; keys attached by writes travel with
//! the lease, keep a key-less revoke out, are deleted with it by a write,
//! and an expired lease with keys is handed over rather than revoked.

use std::time::{Duration, Instant};

use mvcc::lease::owner_key;
use proto::raft_cmdpb::{
    lease_request::Op, mutation, raft_cmd_request::Cmd, LeaseGrant, LeaseRequest, LeaseRevoke,
    Mutation, WriteRequest,
};
use raftstore::lease::ClockError;
use raftstore::{RegionHandle, StoreOptions};
use test_support::raft_cluster::{cmd_for, Cluster, REGION_ID};

async fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn lease_cmd(h: &RegionHandle, op: Op) -> raftstore::Result<()> {
    let cmd = cmd_for(
        &h.status().region,
        Cmd::Lease(LeaseRequest { op: Some(op) }),
    );
    h.propose(cmd).await.map(|_| ())
}

/// Whether `node`'s replica holds lease `id` (not while it cannot be
/// read: installing a snapshot).
fn held(c: &Cluster, node: u64, id: i64) -> bool {
    let h = c.handle(node);
    let mvcc = c.store(node).mvcc();
    let view = mvcc.snapshot();
    h.lease_records(&view)
        .is_ok_and(|records| records.iter().any(|r| r.id == id))
}

/// A leader whose clock runs (it may take a tick after the election).
async fn running_leader(c: &Cluster) -> (u64, RegionHandle) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (id, h) = c.leader().await;
        if h.lease_time_to_live(i64::MAX) == Err(ClockError::NotFound) {
            return (id, h);
        }
        assert!(Instant::now() < deadline, "no leader runs the clock");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leases_expire_through_raft_unless_renewed() {
    let c = Cluster::new(3);
    let (leader, h) = running_leader(&c).await;
    lease_cmd(&h, Op::Grant(LeaseGrant { id: 7, ttl: 2 }))
        .await
        .expect("grant");
    lease_cmd(&h, Op::Grant(LeaseGrant { id: 8, ttl: 2 }))
        .await
        .expect("grant");
    let again = lease_cmd(&h, Op::Grant(LeaseGrant { id: 7, ttl: 5 })).await;
    assert!(
        matches!(again, Err(raftstore::Error::Mvcc(mvcc::Error::LeaseExists))),
        "{again:?}"
    );
    assert_eq!(h.lease_time_to_live(7), Ok((2, 2)));
    // A follower answers nothing of the clock.
    let follower = c
        .nodes()
        .into_iter()
        .find(|n| *n != leader)
        .expect("a follower");
    assert_eq!(
        c.handle(follower).renew_lease(7),
        Err(ClockError::NotRunning)
    );

    // Lease 8 is renewed every 500 ms, lease 7 not.
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(4) {
        h.renew_lease(8).expect("renew 8");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for n in c.nodes() {
        wait_for("lease 7 revoked everywhere", Duration::from_secs(5), || {
            !held(&c, n, 7)
        })
        .await;
        assert!(held(&c, n, 8), "renewed lease 8 is gone on node {n}");
    }
    assert_eq!(h.lease_time_to_live(7), Err(ClockError::NotFound));
    assert_eq!(h.renew_lease(7), Err(ClockError::NotFound));
    lease_cmd(&h, Op::Revoke(LeaseRevoke { id: 8 }))
        .await
        .expect("revoke");
    let again = lease_cmd(&h, Op::Revoke(LeaseRevoke { id: 8 })).await;
    assert!(
        matches!(
            again,
            Err(raftstore::Error::Mvcc(mvcc::Error::LeaseNotFound))
        ),
        "{again:?}"
    );
}

/// A new leader starts the leases it takes over at their whole TTL
/// (etcd's promote): a lease a new leader takes over does not expire
/// before its TTL from the change.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_leader_promotes_the_leases() {
    let c = Cluster::new(3);
    let (old, h) = running_leader(&c).await;
    lease_cmd(&h, Op::Grant(LeaseGrant { id: 3, ttl: 4 }))
        .await
        .expect("grant");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let target = c
        .nodes()
        .into_iter()
        .find(|n| *n != old)
        .expect("another node");
    let peer_id = c.handle(target).status().peer_id;
    h.transfer_leader(peer_id).await.expect("transfer");
    let moved = Instant::now();
    wait_for("the new leader's clock", Duration::from_secs(10), || {
        c.handle(target).lease_time_to_live(3).is_ok()
    })
    .await;
    let (ttl, left) = c.handle(target).lease_time_to_live(3).expect("ttl");
    assert_eq!(ttl, 4);
    assert!(left >= 3, "promoted to its whole TTL, {left} s left");
    // Still there 3 s after the change (2 s + 3 s past the grant).
    tokio::time::sleep(Duration::from_secs(3).saturating_sub(moved.elapsed())).await;
    assert!(held(&c, target, 3));
    wait_for("the expiry", Duration::from_secs(5), || {
        !held(&c, target, 3)
    })
    .await;
}

/// With checkpoints, a new leader starts a lease at its checkpointed
/// remaining TTL, not its whole TTL; a renewal resets the checkpoint
/// first.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_checkpoint_keeps_the_remaining_ttl_across_leaders() {
    let c = Cluster::with_options(
        3,
        StoreOptions {
            lease_checkpoint_interval: Duration::from_millis(300),
            ..Default::default()
        },
    );
    let (old, h) = running_leader(&c).await;
    lease_cmd(&h, Op::Grant(LeaseGrant { id: 5, ttl: 600 }))
        .await
        .expect("grant");
    let view_has_checkpoint = |node: u64| {
        let mvcc = c.store(node).mvcc();
        let view = mvcc.snapshot();
        c.handle(node)
            .lease_records(&view)
            .expect("records")
            .iter()
            .any(|r| r.id == 5 && r.remaining_ttl > 0)
    };
    for n in c.nodes() {
        wait_for("a checkpoint everywhere", Duration::from_secs(10), || {
            view_has_checkpoint(n)
        })
        .await;
    }
    let renewal = h.renew_lease(5).expect("renew");
    assert!(renewal.reset_checkpoint, "the checkpoint is to be reset");

    let target = c
        .nodes()
        .into_iter()
        .find(|n| *n != old)
        .expect("another node");
    // Another checkpoint: the record holds a remainder below 600 once
    // time passed; the new leader takes it.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let peer_id = c.handle(target).status().peer_id;
    h.transfer_leader(peer_id).await.expect("transfer");
    wait_for("the new leader's clock", Duration::from_secs(10), || {
        c.handle(target).lease_time_to_live(5).is_ok()
    })
    .await;
    let (ttl, left) = c.handle(target).lease_time_to_live(5).expect("ttl");
    assert_eq!(ttl, 600);
    assert!(
        left < 600,
        "promoted at the checkpoint's remainder, {left} s left"
    );
}

/// A cluster whose log is truncated early, its leader's clock running,
/// and a follower stopped: the cluster, the leader, the follower.
async fn a_follower_down() -> (Cluster, RegionHandle, u64) {
    let c = Cluster::with_options(
        3,
        StoreOptions {
            log_gc_threshold: 8,
            ..Default::default()
        },
    );
    let (leader, h) = running_leader(&c).await;
    let down = c
        .nodes()
        .into_iter()
        .find(|n| *n != leader)
        .expect("a follower");
    c.stop_node(down);
    (c, h, down)
}

/// Writes past the log's truncation (from revision `rev`) and restarts
/// the stopped follower `down`, which catches up by a region snapshot.
async fn catch_up_by_snapshot(c: &Cluster, down: u64, rev: &mut i64) {
    for i in 0..40 {
        c.must_put(rev, &format!("k{i:02}"), "v").await;
    }
    let before = c.router.snapshots_delivered();
    c.restart_node(down);
    wait_for("a snapshot", Duration::from_secs(20), || {
        c.router.snapshots_delivered() > before
    })
    .await;
}

/// A follower far behind gets the region by snapshot, lease records
/// included, and runs them once it leads.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_region_snapshot_carries_the_leases() {
    let (c, h, down) = a_follower_down().await;
    lease_cmd(&h, Op::Grant(LeaseGrant { id: 11, ttl: 600 }))
        .await
        .expect("grant");
    catch_up_by_snapshot(&c, down, &mut 1).await;
    wait_for(
        "the lease on the restarted node",
        Duration::from_secs(20),
        || c.try_region(down, REGION_ID).is_some() && held(&c, down, 11),
    )
    .await;
    let peer_id = c.handle(down).status().peer_id;
    h.transfer_leader(peer_id).await.expect("transfer");
    wait_for("its clock", Duration::from_secs(10), || {
        c.handle(down).lease_time_to_live(11).is_ok()
    })
    .await;
}

/// The leader is cut off from the others: it cannot revoke (its revokes
/// never commit, and are refused in any later term), the majority's new
/// leader promotes the leases, and renewals there keep a lease alive
/// across the partition and the heal; the lease left alone expires once,
/// on the majority's side.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_partitioned_leader_cannot_expire_a_renewed_lease() {
    let c = Cluster::new(3);
    let (old, h) = running_leader(&c).await;
    lease_cmd(&h, Op::Grant(LeaseGrant { id: 21, ttl: 3 }))
        .await
        .expect("grant");
    lease_cmd(&h, Op::Grant(LeaseGrant { id: 22, ttl: 3 }))
        .await
        .expect("grant");
    let majority: Vec<u64> = c.nodes().into_iter().filter(|n| *n != old).collect();
    for n in &majority {
        wait_for("the grants everywhere", Duration::from_secs(5), || {
            held(&c, *n, 21) && held(&c, *n, 22)
        })
        .await;
    }
    c.partition(&[old], &majority);

    // Renew 21 every 500 ms on whichever replica of the majority runs the
    // clock, for 8 s (well past its TTL and the old leader's deadline).
    let started = Instant::now();
    let mut renewed = 0;
    while started.elapsed() < Duration::from_secs(8) {
        for n in &majority {
            if c.handle(*n).renew_lease(21).is_ok() {
                renewed += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(renewed >= 8, "renewed {renewed} times");
    for n in &majority {
        wait_for(
            "lease 22 expired on the majority",
            Duration::from_secs(5),
            || !held(&c, *n, 22),
        )
        .await;
        assert!(held(&c, *n, 21), "renewed lease 21 is gone on node {n}");
    }
    // The cut-off leader never applied a revoke of 21.
    assert!(held(&c, old, 21));

    c.heal();
    let (_, leader) = c.leader_among(&majority).await;
    leader.renew_lease(21).expect("renew after the heal");
    for n in c.nodes() {
        wait_for("lease 22 gone everywhere", Duration::from_secs(10), || {
            !held(&c, n, 22)
        })
        .await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    for n in c.nodes() {
        assert!(held(&c, n, 21), "renewed lease 21 is gone on node {n}");
    }
}

/// A write at `rev` of `key` (put with `lease`, or deleted with `lease`
/// 0) and the lease changes `changes` (op, lease id, attached key).
async fn write_with(
    h: &RegionHandle,
    rev: i64,
    key: &str,
    lease: i64,
    changes: &[(mutation::Op, i64, &str)],
) -> raftstore::Result<()> {
    let op = if lease == 0 {
        mutation::Op::Delete
    } else {
        mutation::Op::Put
    };
    let mut mutations = vec![Mutation {
        op: op as i32,
        key: key.into(),
        version: 1,
        lease,
        value: b"v".to_vec(),
        ..Default::default()
    }];
    mutations.extend(changes.iter().map(|(op, id, key)| Mutation {
        op: *op as i32,
        key: owner_key(*id),
        lease: *id,
        value: key.as_bytes().to_vec(),
        ..Default::default()
    }));
    let cmd = cmd_for(
        &h.status().region,
        Cmd::Write(WriteRequest {
            revision: rev,
            mutations,
        }),
    );
    h.propose(cmd).await.map(|_| ())
}

/// The keys attached to lease `id` on `node`'s replica (none while it
/// cannot be read).
fn keys_of(c: &Cluster, node: u64, id: i64) -> Vec<Vec<u8>> {
    let mvcc = c.store(node).mvcc();
    let view = mvcc.snapshot();
    c.handle(node).lease_keys(&view, id).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn attached_keys_travel_with_the_lease_and_go_with_its_revoke() {
    use mutation::Op::{Attach, Revoke};
    let (c, h, down) = a_follower_down().await;
    lease_cmd(&h, Op::Grant(LeaseGrant { id: 31, ttl: 600 }))
        .await
        .expect("grant");
    let mut rev = 1;
    // A lease the region does not hold: the whole write is refused.
    rev += 1;
    let refused = write_with(&h, rev, "k", 32, &[(Attach, 32, "k")]).await;
    assert!(
        matches!(
            refused,
            Err(raftstore::Error::Mvcc(mvcc::Error::LeaseNotFound))
        ),
        "{refused:?}"
    );
    write_with(&h, rev, "k", 31, &[(Attach, 31, "k")])
        .await
        .expect("attach");
    // A revoke without keys is refused while keys are attached.
    let keyless = lease_cmd(&h, Op::Revoke(LeaseRevoke { id: 31 })).await;
    assert!(
        matches!(
            keyless,
            Err(raftstore::Error::Mvcc(mvcc::Error::LeaseKeysChanged))
        ),
        "{keyless:?}"
    );
    // The follower catches up by snapshot, attachment included.
    catch_up_by_snapshot(&c, down, &mut rev).await;
    wait_for("the attachment there", Duration::from_secs(20), || {
        c.try_region(down, REGION_ID).is_some() && keys_of(&c, down, 31) == vec![b"k".to_vec()]
    })
    .await;
    // The revoke: the key deleted and the record and attachment dropped
    // in one write.
    rev += 1;
    write_with(&h, rev, "k", 0, &[(Revoke, 31, "")])
        .await
        .expect("revoke");
    for n in c.nodes() {
        wait_for("the revoke everywhere", Duration::from_secs(10), || {
            !held(&c, n, 31) && keys_of(&c, n, 31).is_empty()
        })
        .await;
    }
    rev += 1;
    let again = write_with(&h, rev, "k", 0, &[(Revoke, 31, "")]).await;
    assert!(
        matches!(
            again,
            Err(raftstore::Error::Mvcc(mvcc::Error::LeaseNotFound))
        ),
        "{again:?}"
    );
}

/// An expired lease with keys is not revoked by the clock (its keys must
/// go at a revision): it is handed over, once per retry, until revoked.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_expired_lease_with_keys_is_handed_over() {
    let c = Cluster::new(3);
    let (leader, h) = running_leader(&c).await;
    lease_cmd(&h, Op::Grant(LeaseGrant { id: 41, ttl: 2 }))
        .await
        .expect("grant");
    write_with(&h, 2, "k", 41, &[(mutation::Op::Attach, 41, "k")])
        .await
        .expect("attach");
    let mut handed = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        handed.extend(h.take_expired_leases());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        (2..=5).contains(&handed.len()) && handed.iter().all(|id| *id == 41),
        "handed over {handed:?}"
    );
    assert!(held(&c, leader, 41), "revoked by the clock");
    write_with(&h, 3, "k", 0, &[(mutation::Op::Revoke, 41, "")])
        .await
        .expect("revoke");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(h.take_expired_leases().is_empty());
}
