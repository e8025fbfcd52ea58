//! What a proposal's answer claims, checked against schedules where the
//! claim is easy to get wrong: a proposal the replica lost track of is
//! answered "outcome unknown", never "did not apply" (which a router
//! retries); a command built in one term is refused in another.

use std::time::{Duration, Instant};

use proto::raft_cmdpb::RaftCmdRequest;
use raftstore::{Error, StoreOptions};
use test_support::raft_cluster::{write, Cluster, Filter};

/// Drops every message to node `0`: it still talks, nobody answers.
struct DropTo(u64);

impl Filter for DropTo {
    fn apply(&self, _from: u64, to: u64, copies: &mut Vec<Duration>) {
        if to == self.0 {
            copies.clear();
        }
    }
}

fn others(but: u64) -> Vec<u64> {
    [1, 2, 3].into_iter().filter(|&id| id != but).collect()
}

fn in_term(mut cmd: RaftCmdRequest, term: u64) -> RaftCmdRequest {
    if let Some(h) = cmd.header.as_mut() {
        h.term = term;
    }
    cmd
}

/// The leader replicates a proposal but hears no acknowledgement; the
/// others elect a new leader, which commits the proposal, writes on and
/// drops its log past the old leader, who then catches up by snapshot. The
/// snapshot may or may not hold the proposal (here it does): the old
/// leader must answer "outcome unknown". Answering "did not apply" (as it
/// once did) makes the router retry a write that applied — twice applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proposal_covered_by_a_snapshot_has_an_unknown_outcome() {
    let c = Cluster::with_options(
        3,
        StoreOptions {
            log_gc_threshold: 16,
            ..Default::default()
        },
    );
    let (old, h) = c.leader().await;
    let mut rev = 0;
    c.must_put(&mut rev, "before", "1").await;
    c.add_filter(DropTo(old));
    rev += 1;
    let pending = tokio::spawn({
        let h = h.clone();
        let cmd = write(rev, "p", "x");
        async move { h.propose(cmd).await }
    });
    let majority = others(old);
    // The others elect a new leader once the old one stops heartbeating
    // (check quorum); it has the proposal and commits it.
    let (new, _) = c.leader_among(&majority).await;
    c.must_get_on(&majority, "p", "x").await;
    for i in 0..40 {
        c.must_put(&mut rev, &format!("after{i}"), "y").await;
    }
    let truncated = c.handle(new).status().truncated_index;
    assert!(truncated > 16, "the new leader kept its log: {truncated}");
    assert!(
        !pending.is_finished(),
        "answered while cut off: {pending:?}"
    );
    c.heal();
    let res = tokio::time::timeout(Duration::from_secs(15), pending)
        .await
        .expect("answered once caught up")
        .unwrap();
    assert!(
        matches!(res, Err(Error::OutcomeUnknown(_))),
        "a proposal the snapshot covered was answered {res:?}"
    );
    c.must_get_on(&[1, 2, 3], "after39", "y").await;
    assert_eq!(c.get(old, "p").as_deref(), Some(&b"x"[..]));
}

/// A command evaluated by a leader in term T must not be proposed once
/// that replica leads again in a later term: its mutations were computed
/// from the state of term T, which another leader may have changed since.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_are_refused_outside_the_term_they_were_built_in() {
    let c = Cluster::new(3);
    let (first, h) = c.leader().await;
    let term = h.status().term;
    c.put(1, "k", "1").await.unwrap();
    // Leadership goes away and comes back: two more terms.
    let away = others(first)[0];
    h.transfer_leader(away).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.try_leader() != Some(away) {
        assert!(
            Instant::now() < deadline,
            "leadership never moved to {away}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    c.handle(away).transfer_leader(first).await.unwrap();
    while c.try_leader() != Some(first) {
        assert!(Instant::now() < deadline, "leadership never came back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let now = h.status().term;
    assert!(now >= term + 2, "term {term} -> {now}");
    let stale = h.propose(in_term(write(2, "k", "stale"), term)).await;
    assert!(
        matches!(stale, Err(Error::StaleCommand(_))),
        "a command of term {term} proposed in term {now}: {stale:?}"
    );
    h.propose(in_term(write(3, "k", "fresh"), now))
        .await
        .expect("a command of the current term");
    c.must_get_on(&[1, 2, 3], "k", "fresh").await;
}
