//! Writes over several regions (`router::txn`): one revision for all their
//! changes, all or nothing — also when the coordinator stops at any step
//! and under the raft faults of the history tests.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mvcc::exec::{WriteRequest, WriteResponse};
use parking_lot::Mutex;
use pd::PdClient;
use proto::etcdserverpb::{
    compare::{CompareResult, CompareTarget, TargetUnion},
    request_op::Request,
    Compare, DeleteRangeRequest, PutRequest, RangeRequest, RangeResponse, RequestOp, TxnRequest,
};
use proto::forwardpb::{
    txn_step_request::Step, txn_step_response, RequestHeader, TxnLock, TxnStatusRequest,
};
use proto::raft_cmdpb::{mutation::Op, KeySpan, Mutation, TxnCommitRequest, TxnLockRequest};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use router::Router;
use test_support::history;
use test_support::requests::{delete_op, put_op};
use test_support::router_cluster::must;
use test_support::{OracleFault, RaftFault, RaftNemesis, RaftNemesisConfig, RouterCluster};

fn txn(ops: Vec<RequestOp>) -> WriteRequest {
    WriteRequest::Txn(TxnRequest {
        success: ops,
        ..Default::default()
    })
}

fn scan(prefix: &str) -> RangeRequest {
    let mut end = prefix.as_bytes().to_vec();
    *end.last_mut().unwrap() += 1;
    RangeRequest {
        key: prefix.into(),
        range_end: end,
        ..Default::default()
    }
}

/// Every key from "a" on: all the keys of these tests.
fn from_a() -> RangeRequest {
    RangeRequest {
        key: b"a".to_vec(),
        range_end: vec![0],
        ..Default::default()
    }
}

/// A cluster of three nodes with regions split at `keys`.
async fn cluster_split_at(keys: &[&str]) -> Arc<RouterCluster> {
    let cluster = RouterCluster::new(3).await;
    cluster.leader().await;
    for key in keys {
        let deadline = Instant::now() + Duration::from_secs(30);
        while let Err(e) = cluster.split(key.as_bytes()).await {
            assert!(Instant::now() < deadline, "split at {key}: {e}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    cluster
}

fn kv_map(resp: &RangeResponse) -> HashMap<String, (String, i64)> {
    resp.kvs
        .iter()
        .map(|kv| {
            (
                String::from_utf8_lossy(&kv.key).into_owned(),
                (
                    String::from_utf8_lossy(&kv.value).into_owned(),
                    kv.mod_revision,
                ),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_over_regions_commit_at_one_revision() {
    let cluster = cluster_split_at(&["m"]).await;
    let router = cluster.router(1).unwrap();
    let req = txn(vec![put_op("a", "1"), put_op("z", "1")]);
    let resp = must("txn", || router.write(&req)).await;
    let WriteResponse::Txn(t) = resp else {
        panic!("{resp:?}")
    };
    let rev = t.header.unwrap().revision;
    for id in 1..=3 {
        let r = cluster.router(id).unwrap();
        let all = from_a();
        let both = must("range", || r.range(&all)).await;
        let kvs = kv_map(&both);
        assert_eq!(kvs["a"], ("1".into(), rev), "node {id}");
        assert_eq!(kvs["z"], ("1".into(), rev), "node {id}");
    }

    // A compare over both regions that fails changes nothing and takes no
    // revision; its Range op reads both regions.
    let cmp = WriteRequest::Txn(TxnRequest {
        compare: vec![Compare {
            key: b"a".to_vec(),
            range_end: vec![0],
            result: CompareResult::Equal as i32,
            target: CompareTarget::Value as i32,
            target_union: Some(TargetUnion::Value(b"2".to_vec())),
        }],
        success: vec![put_op("a", "x")],
        failure: vec![RequestOp {
            request: Some(Request::RequestRange(from_a())),
        }],
    });
    let WriteResponse::Txn(t) = must("compare txn", || router.write(&cmp)).await else {
        panic!()
    };
    assert!(!t.succeeded);
    assert_eq!(
        t.header.unwrap().revision,
        rev,
        "a failed compare took a revision"
    );

    // DeleteRange over both regions: one revision, both gone.
    let del = WriteRequest::DeleteRange(DeleteRangeRequest {
        key: b"a".to_vec(),
        range_end: vec![0],
        prev_kv: true,
    });
    let WriteResponse::DeleteRange(d) = must("delete", || router.write(&del)).await else {
        panic!()
    };
    assert_eq!(d.deleted, 2);
    assert_eq!(d.header.unwrap().revision, rev + 1);
    let all = from_a();
    let left = must("range", || router.range(&all)).await;
    assert_eq!(left.count, 0);
    // Nothing stays locked, and single-region writes go on.
    let put = WriteRequest::Put(PutRequest {
        key: b"z".to_vec(),
        value: b"2".to_vec(),
        ..Default::default()
    });
    let WriteResponse::Put(p) = must("put", || router.write(&put)).await else {
        panic!()
    };
    assert_eq!(p.header.unwrap().revision, rev + 2);
}

/// A Txn over two regions that changes nothing — one that only reads, and
/// one whose compare fails — answers the state at its header revision even
/// when it is slow: here the oracle stalls its call for a revision past the
/// lock TTL while a write of one of its keys goes through. (Answered from
/// values taken under transaction locks, it showed the state before that
/// write at a revision above it: the lock resolver had rolled its locks
/// back meanwhile, and nothing told the coordinator.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reads_over_regions_show_the_state_at_their_revision() {
    let cluster = cluster_split_at(&["m"]).await;
    let reader = cluster.router(2).unwrap();
    let writer = cluster.router(1).unwrap();
    let seed = txn(vec![put_op("a", "0"), put_op("z", "0")]);
    must("seed", || writer.write(&seed)).await;
    let both = || RequestOp {
        request: Some(Request::RequestRange(from_a())),
    };
    let read_only = WriteRequest::Txn(TxnRequest {
        success: vec![both()],
        ..Default::default()
    });
    let compare_fails = WriteRequest::Txn(TxnRequest {
        compare: vec![Compare {
            key: b"a".to_vec(),
            result: CompareResult::Equal as i32,
            target: CompareTarget::Value as i32,
            target_union: Some(TargetUnion::Value(b"never".to_vec())),
            ..Default::default()
        }],
        success: vec![put_op("a", "x"), put_op("z", "x")],
        failure: vec![both()],
    });
    for (round, (name, req)) in [("read-only", read_only), ("compare fails", compare_fails)]
        .into_iter()
        .enumerate()
    {
        let value = format!("w{round}");
        cluster
            .oracle(2)
            .set_fault(OracleFault::Stall(Duration::from_millis(3_900)));
        let read = {
            let reader = reader.clone();
            tokio::spawn(async move { reader.write(&req).await })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        cluster.oracle(2).set_fault(OracleFault::None);
        let put = WriteRequest::Put(PutRequest {
            key: b"z".to_vec(),
            value: value.clone().into_bytes(),
            ..Default::default()
        });
        let WriteResponse::Put(p) = must("put", || writer.write(&put)).await else {
            panic!()
        };
        let written = p.header.unwrap().revision;
        let resp = read
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let WriteResponse::Txn(t) = resp else {
            panic!("{resp:?}")
        };
        let at = t.header.unwrap().revision;
        let Some(proto::etcdserverpb::response_op::Response::ResponseRange(r)) =
            t.responses.first().and_then(|op| op.response.clone())
        else {
            panic!("{name}: {:?}", t.responses)
        };
        let z = kv_map(&r)["z"].clone();
        // The read's revision comes from the oracle once its stall is
        // over, after the write.
        assert!(at >= written, "{name}: read at {at}, write at {written}");
        assert_eq!(
            z,
            (value.clone(), written),
            "{name}: read at {at} misses the write of z at {written}"
        );
        println!("{name}: read at {at}, z written at {written}");
    }
}

/// A client that cancels its call to a Txn over two regions after the
/// locks are taken does not cut the coordinator short: it runs on, and the
/// locks go with its commit, not after the lock resolver's TTL (they
/// refuse writes, splits and merges of their keys meanwhile).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancelled_transaction_finishes_without_its_client() {
    let cluster = cluster_split_at(&["m"]).await;
    let router = cluster.router(2).unwrap();
    let seed = txn(vec![put_op("a", "0"), put_op("z", "0")]);
    must("seed", || router.write(&seed)).await;
    let started = Instant::now();
    // The coordinator's revision comes 1 s after its locks are applied.
    cluster
        .oracle(2)
        .set_fault(OracleFault::Stall(Duration::from_millis(1_000)));
    let both = txn(vec![put_op("a", "1"), put_op("z", "1")]);
    let cancelled = tokio::time::timeout(Duration::from_millis(300), router.write(&both)).await;
    assert!(
        cancelled.is_err(),
        "answered before the stall: {cancelled:?}"
    );
    cluster.oracle(2).set_fault(OracleFault::None);
    let locked = || {
        cluster
            .ids()
            .into_iter()
            .flat_map(|id| cluster.raft().store(id).regions())
            .flat_map(|h| h.locks().all())
            .count()
    };
    // Well before the lock TTL (3 s), which a resolver waits for.
    while locked() > 0 {
        assert!(
            started.elapsed() < Duration::from_millis(2_500),
            "the locks of a cancelled transaction stay"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let all = from_a();
    let r = must("read", || router.range(&all)).await;
    let kvs = kv_map(&r);
    assert_eq!(kvs["a"].0, kvs["z"].0, "half a transaction: {kvs:?}");
}

/// The leader of the region holding `key`: its node's router and the
/// header naming the region.
async fn leader_of(cluster: &RouterCluster, key: &[u8]) -> (Arc<Router>, RequestHeader) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        for id in cluster.ids() {
            let Some(router) = cluster.router(id) else {
                continue;
            };
            for h in router.store().regions() {
                let s = h.status();
                let holds = key >= s.region.start_key.as_slice()
                    && (s.region.end_key.is_empty() || key < s.region.end_key.as_slice());
                if holds && s.ready_leader {
                    return (
                        router.clone(),
                        RequestHeader {
                            region_id: s.region.id,
                            region_epoch: s.region.region_epoch,
                        },
                    );
                }
            }
        }
        assert!(Instant::now() < deadline, "no leader for {key:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn step(cluster: &RouterCluster, key: &str, step: Step) {
    let (router, header) = leader_of(cluster, key.as_bytes()).await;
    router
        .serve_txn_step(Some(&header), step)
        .await
        .unwrap_or_else(|e| panic!("step on {key}: {e}"));
}

fn lock(txn_id: u64, key: &str) -> Step {
    Step::Lock(TxnLock {
        lock: Some(TxnLockRequest {
            txn_id,
            primary_key: b"a".to_vec(),
            spans: vec![KeySpan {
                start: key.into(),
                end: Vec::new(),
                single: true,
            }],
        }),
        reads: Vec::new(),
    })
}

fn put_mutation(key: &str, value: &str, sub: u32) -> Mutation {
    Mutation {
        op: Op::Put as i32,
        key: key.into(),
        sub,
        version: 2,
        create_revision: 0,
        value: value.into(),
        ..Default::default()
    }
}

/// A coordinator that stops after each step of the protocol — primary
/// locked; both locked; decision written with the secondary pending — and
/// never comes back: readers of the keys wait, and the lock resolver ends
/// it all or nothing (rolled back before the decision, committed at the
/// decided revision after it).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn abandoned_transactions_end_all_or_nothing() {
    let cluster = cluster_split_at(&["m"]).await;
    let router = cluster.router(2).unwrap();
    let seed = txn(vec![put_op("a", "0"), put_op("z", "0")]);
    must("seed", || router.write(&seed)).await;
    let both = from_a();

    // 1. Only the primary locked.
    step(&cluster, "a", lock(101, "a")).await;
    let started = Instant::now();
    let r = must("read", || router.range(&both)).await;
    let kvs = kv_map(&r);
    assert_eq!((kvs["a"].0.as_str(), kvs["z"].0.as_str()), ("0", "0"));
    println!(
        "read waited {:?} for a rolled-back primary",
        started.elapsed()
    );

    // 2. Both locked, no decision.
    step(&cluster, "a", lock(102, "a")).await;
    step(&cluster, "z", lock(102, "z")).await;
    let r = must("read", || router.range(&both)).await;
    let kvs = kv_map(&r);
    assert_eq!((kvs["a"].0.as_str(), kvs["z"].0.as_str()), ("0", "0"));

    // 3. Both locked, decision written, the secondary never told.
    step(&cluster, "a", lock(103, "a")).await;
    step(&cluster, "z", lock(103, "z")).await;
    let pd = cluster.oracle(1);
    let revision = pd.alloc_revisions(1).await.unwrap();
    step(
        &cluster,
        "a",
        Step::Commit(TxnCommitRequest {
            txn_id: 103,
            revision,
            mutations: vec![put_mutation("a", "3", 0), put_mutation("z", "3", 1)],
            primary: true,
            primary_key: b"a".to_vec(),
            lock_spans: vec![key_span("a"), key_span("z")],
        }),
    )
    .await;
    let r = must("read", || router.range(&both)).await;
    let kvs = kv_map(&r);
    assert_eq!(kvs["a"], ("3".into(), revision));
    assert_eq!(kvs["z"], ("3".into(), revision));
    // The resolver committed the secondary; the decision goes too, and not
    // while the secondary's lock was there.
    decision_forgotten(&cluster, 103, "z").await;

    // The decision's status as the primary tells it.
    let (primary, header) = leader_of(&cluster, b"a").await;
    let status = primary
        .serve_txn_step(
            Some(&header),
            Step::Status(TxnStatusRequest {
                txn_id: 101,
                primary_key: b"a".to_vec(),
            }),
        )
        .await
        .unwrap();
    let Some(txn_step_response::Result::Status(s)) = status else {
        panic!("{status:?}")
    };
    assert_eq!(
        s.kind,
        proto::forwardpb::txn_status::Kind::RolledBack as i32
    );

    // Nothing stays locked: a write of both keys and a compaction go
    // through.
    let again = txn(vec![put_op("a", "4"), put_op("z", "4")]);
    must("txn", || router.write(&again)).await;
    let current = router.current_revision().await.unwrap();
    must("compact", || router.compact(current, false)).await;
}

/// A secondary whose neighbour merged into it after committing its own
/// part: the lock resolver commits the rest of the transaction from the
/// decision, with the mutations the lock covers. (It took the mutations of
/// the region's range, which since the merge held the neighbour's keys too,
/// and apply refused them as not locked, again and again: the lock stayed
/// for good, and with it every reader of its keys waiting.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_secondary_grown_by_a_merge_is_resolved() {
    let cluster = cluster_split_at(&["m", "t"]).await;
    let router = cluster.router(2).unwrap();
    let seed = txn(vec![put_op("a", "0"), put_op("n", "0"), put_op("z", "0")]);
    must("seed", || router.write(&seed)).await;
    // Locked everywhere, decided, the middle region committed; the last
    // one never hears of it.
    for key in ["a", "n", "z"] {
        step(&cluster, key, lock(104, key)).await;
    }
    let revision = cluster.oracle(1).alloc_revisions(1).await.unwrap();
    let mutations = vec![
        put_mutation("a", "4", 0),
        put_mutation("n", "4", 1),
        put_mutation("z", "4", 2),
    ];
    let commit = |key: &str, primary: bool| {
        Step::Commit(TxnCommitRequest {
            txn_id: 104,
            revision,
            mutations: if primary {
                mutations.clone()
            } else {
                mutations
                    .iter()
                    .filter(|m| m.key == key.as_bytes())
                    .cloned()
                    .collect()
            },
            primary,
            primary_key: b"a".to_vec(),
            lock_spans: if primary {
                vec![key_span("a"), key_span("n"), key_span("z")]
            } else {
                Vec::new()
            },
        })
    };
    step(&cluster, "a", commit("a", true)).await;
    step(&cluster, "n", commit("n", false)).await;
    // [m, t) merges into [t, ...), which holds the lock.
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Err(e) = cluster.merge(b"m").await {
        assert!(Instant::now() < deadline, "merge: {e}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let regions = || {
        cluster
            .ids()
            .into_iter()
            .flat_map(|id| cluster.raft().store(id).regions())
            .collect::<Vec<_>>()
    };
    // The last region starts at "m" once the merge applied.
    while !regions().iter().any(|h| {
        let region = h.status().region;
        region.start_key == b"m" && region.end_key.is_empty()
    }) {
        assert!(Instant::now() < deadline, "the merge did not finish");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        regions().iter().any(|h| h.locks().get(104).is_some()),
        "resolved before the merge: this run shows nothing"
    );
    let all = from_a();
    let r = must("read", || router.range(&all)).await;
    let kvs = kv_map(&r);
    for key in ["a", "n", "z"] {
        assert_eq!(kvs[key], ("4".into(), revision), "{key}");
    }
    // The lock of "z" moved with the merge, and is found there.
    decision_forgotten(&cluster, 104, "z").await;
}

/// Waits until the decision of `txn_id` (primary key "a") is forgotten
/// everywhere, checking meanwhile that it is never gone anywhere while the
/// leader of the region holding `secondary` still holds the transaction's
/// lock. (Decisions of secondaries the lock resolver committed were never
/// forgotten.)
async fn decision_forgotten(cluster: &RouterCluster, txn_id: u64, secondary: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = HashSet::new();
    loop {
        // The record first: a lock, once gone, cannot come back.
        let recorded = recorded_on(cluster, txn_id);
        if seen.iter().any(|id| !recorded.contains(id)) {
            let (leader, header) = leader_of(cluster, secondary.as_bytes()).await;
            let handle = leader.store().region(header.region_id).unwrap();
            assert!(
                handle.locks().get(txn_id).is_none(),
                "the decision of {txn_id} was forgotten while its lock on {secondary} is held"
            );
        }
        if recorded.is_empty() && !seen.is_empty() {
            return;
        }
        seen.extend(recorded);
        assert!(
            Instant::now() < deadline,
            "the decision of {txn_id} is never forgotten"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The nodes where the decision of `txn_id` (primary key "a") is recorded.
fn recorded_on(cluster: &RouterCluster, txn_id: u64) -> Vec<u64> {
    cluster
        .ids()
        .into_iter()
        .filter(|&id| {
            cluster.router(id).is_some_and(|r| {
                let mvcc = r.store().mvcc();
                let view = mvcc.snapshot();
                r.store()
                    .regions()
                    .iter()
                    .any(|h| matches!(h.txn_record(&view, b"a", txn_id), Ok(Some(_))))
            })
        })
        .collect()
}

fn key_span(key: &str) -> KeySpan {
    KeySpan {
        start: key.into(),
        end: Vec::new(),
        single: true,
    }
}

/// Hands the leadership of the region holding `key` to node `node`.
async fn lead_on(cluster: &RouterCluster, key: &str, node: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (router, header) = leader_of(cluster, key.as_bytes()).await;
        let handle = router.store().region(header.region_id).unwrap();
        let status = handle.status();
        let peer = status.region.peers.iter().find(|p| p.node_id == node);
        match peer {
            Some(p) if p.id == status.peer_id => return,
            Some(p) => {
                let _ = handle.transfer_leader(p.id).await;
            }
            None => panic!("node {node} has no replica of {key}"),
        }
        assert!(Instant::now() < deadline, "{key} not led by node {node}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether a lock of transaction `txn_id` is held on one of `nodes`.
fn locked_on(cluster: &RouterCluster, nodes: &[u64], txn_id: u64) -> bool {
    nodes.iter().any(|&id| {
        cluster.router(id).is_some_and(|r| {
            r.store()
                .regions()
                .iter()
                .any(|h| h.locks().get(txn_id).is_some())
        })
    })
}

/// Two abandoned locks in one region: the first one's primary cannot be
/// reached (its leader is cut off from the resolving node, and asking it
/// takes the router's whole retry time), the second one's can. The
/// resolver ends the second one all the same. (It resolved the locks of a
/// round one after another within one bound shorter than that retry time:
/// the first lock used up every round and the second stayed, refusing its
/// keys' writers and readers, for as long as the first could not be
/// resolved.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lock_that_cannot_be_resolved_holds_up_no_other() {
    let cluster = cluster_split_at(&["m", "t"]).await;
    lead_on(&cluster, "a", 2).await;
    lead_on(&cluster, "n", 1).await;
    lead_on(&cluster, "u", 1).await;
    let lock_in_t = |txn_id: u64, key: &str, primary: &str| {
        Step::Lock(TxnLock {
            lock: Some(TxnLockRequest {
                txn_id,
                primary_key: primary.into(),
                spans: vec![KeySpan {
                    start: key.into(),
                    end: Vec::new(),
                    single: true,
                }],
            }),
            reads: Vec::new(),
        })
    };
    step(&cluster, "u", lock_in_t(301, "u", "a")).await;
    step(&cluster, "v", lock_in_t(302, "v", "n")).await;
    // Node 1 leads [t, ...) and [m, t); [.., m) is led by node 2, which
    // node 1 cannot reach (node 3 reaches both: every region keeps its
    // quorum).
    cluster.raft().partition(&[1], &[2]);
    // Node 2 cannot hear from the leader of [t, ...): its replica keeps
    // the locks until the partition heals.
    let started = Instant::now();
    while locked_on(&cluster, &[1, 3], 302) {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the resolvable lock stays while the other cannot be resolved"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(locked_on(&cluster, &[1], 301), "this run shows nothing");
    cluster.raft().heal();
    let healed = Instant::now();
    while locked_on(&cluster, &[1, 2, 3], 301) || locked_on(&cluster, &[2], 302) {
        assert!(
            healed.elapsed() < Duration::from_secs(15),
            "a lock stays after the partition healed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let router = cluster.router(3).unwrap();
    let all = from_a();
    let r = must("read", || router.range(&all)).await;
    assert!(r.kvs.is_empty(), "rolled back: {:?}", kv_map(&r));
}

/// One writer per pair of keys in two regions, writing both keys in one
/// txn (or deleting both), while readers list all pairs at once — under
/// partitions, lost and delayed messages, restarts, leader moves and lost
/// forward replies (coordinators that never hear back). Every read sees
/// each pair whole (both values equal, at one revision), never a value of
/// a write that was refused, and never older than a write acknowledged
/// before the read started; at the end every pair holds its last
/// acknowledged write or a later unknown one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pairs_over_regions_stay_whole_under_faults() {
    let seed = history::seed("pairs_over_regions_stay_whole_under_faults");
    let cluster = cluster_split_at(&["p/m"]).await;
    cluster.set_lose_reply_percent(3);
    let nemesis = RaftNemesis::start(
        cluster.raft().clone(),
        RaftNemesisConfig {
            faults: RaftFault::ALL.to_vec(),
            seed: Some(seed),
            interval: (Duration::from_millis(800), Duration::from_millis(2000)),
            hold: (Duration::from_millis(300), Duration::from_millis(1500)),
            ..RaftNemesisConfig::default()
        },
        Instant::now(),
    );
    const PAIRS: usize = 4;
    let run_for = history::duration(Duration::from_secs(15));
    let stop = Instant::now() + run_for;
    // Per pair: (seq, outcome) of every write; seq 0 = absent.
    #[derive(Clone, Copy, PartialEq, Debug)]
    enum Outcome {
        Ok,
        Failed,
        Unknown,
    }
    /// One pair's writes in order: (seq, outcome); a delete has the top
    /// bit set.
    type WriteLog = Vec<(u64, Outcome)>;
    let writes: Arc<Mutex<Vec<WriteLog>>> = Arc::new(Mutex::new(vec![Vec::new(); PAIRS]));
    let mut tasks = Vec::new();
    for pair in 0..PAIRS {
        let cluster = cluster.clone();
        let writes = writes.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(seed.wrapping_add(pair as u64));
            let mut seq = 0u64;
            while Instant::now() < stop {
                seq += 1;
                let (a, z) = (format!("p/a{pair}"), format!("p/z{pair}"));
                let req = if rng.gen_range(0..5) == 0 {
                    txn(vec![delete_op(&a), delete_op(&z)])
                } else {
                    let v = format!("{seq}");
                    txn(vec![put_op(&a, &v), put_op(&z, &v)])
                };
                // A node being restarted has no router for a moment.
                let via = loop {
                    if let Some(r) = cluster.router(rng.gen_range(1..=3)) {
                        break r;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                };
                let res = tokio::time::timeout(Duration::from_secs(8), via.write(&req)).await;
                let outcome = match res {
                    Ok(Ok(_)) => Outcome::Ok,
                    Ok(Err(e)) if e.is_retryable() => Outcome::Failed,
                    Ok(Err(router::Error::Mvcc(_))) => Outcome::Failed,
                    _ => Outcome::Unknown,
                };
                let deleted = matches!(&req, WriteRequest::Txn(t)
                    if matches!(t.success[0].request, Some(Request::RequestDeleteRange(_))));
                let recorded = if deleted { seq | 1 << 63 } else { seq };
                writes.lock()[pair].push((recorded, outcome));
            }
        }));
    }
    let reads = Arc::new(Mutex::new(0usize));
    let failed_reads: Arc<Mutex<Vec<String>>> = Arc::default();
    for reader in 0..3u64 {
        let failed_reads = failed_reads.clone();
        let cluster = cluster.clone();
        let writes = writes.clone();
        let reads = reads.clone();
        tasks.push(tokio::spawn(async move {
            let mut last_rev = 0;
            while Instant::now() < stop {
                let floor: Vec<Option<u64>> = writes
                    .lock()
                    .iter()
                    .map(|w| {
                        w.iter()
                            .rev()
                            .find(|(_, o)| *o == Outcome::Ok)
                            .map(|(s, _)| *s & !(1 << 63))
                    })
                    .collect();
                let Some(via) = cluster.router(reader + 1) else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let resp = match tokio::time::timeout(
                    Duration::from_secs(8),
                    via.range(&scan("p/")),
                )
                .await
                {
                    Ok(Ok(resp)) => resp,
                    Ok(Err(e)) => {
                        failed_reads.lock().push(e.to_string());
                        continue;
                    }
                    Err(_) => {
                        failed_reads.lock().push("timed out".into());
                        continue;
                    }
                };
                let rev = resp.header.as_ref().map_or(0, |h| h.revision);
                assert!(
                    rev >= last_rev,
                    "read revisions went back: {rev} < {last_rev}"
                );
                last_rev = rev;
                let kvs = kv_map(&resp);
                let written = writes.lock().clone();
                for pair in 0..PAIRS {
                    let a = kvs.get(&format!("p/a{pair}"));
                    let z = kvs.get(&format!("p/z{pair}"));
                    assert_eq!(a, z, "pair {pair} seen half at revision {rev}");
                    // The write seen: its seq (a delete shows nothing).
                    if let Some((v, _)) = a {
                        let seq: u64 = v.parse().unwrap();
                        let outcome = written[pair]
                            .iter()
                            .find(|(s, _)| *s == seq)
                            .map(|(_, o)| *o);
                        assert_ne!(
                            outcome,
                            Some(Outcome::Failed),
                            "pair {pair}: a refused write {seq} is visible"
                        );
                        if let Some(floor) = floor[pair] {
                            assert!(seq >= floor, "pair {pair}: read {seq} after {floor} acked");
                        }
                    }
                }
                *reads.lock() += 1;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let log = nemesis.stop().await;
    println!("{log}");
    cluster.raft().heal();
    cluster.set_lose_reply_percent(0);
    let router = cluster.router(1).unwrap();
    let everything = scan("p/");
    let end = must("final read", || router.range(&everything)).await;
    let kvs = kv_map(&end);
    let written = writes.lock().clone();
    let mut committed = 0;
    for (pair, ws) in written.iter().enumerate() {
        let a = kvs.get(&format!("p/a{pair}"));
        let z = kvs.get(&format!("p/z{pair}"));
        assert_eq!(a, z, "pair {pair} ended half written");
        committed += ws.iter().filter(|(_, o)| *o == Outcome::Ok).count();
        let last_ok = ws.iter().rposition(|(_, o)| *o == Outcome::Ok);
        let seen = a.map(|(v, _)| v.parse::<u64>().unwrap());
        let seen_pos = match seen {
            Some(seq) => ws.iter().position(|(s, _)| *s == seq),
            // Absent: the last delete (or nothing written).
            None => ws
                .iter()
                .rposition(|(s, o)| *s & (1 << 63) != 0 && *o != Outcome::Failed),
        };
        if let Some(last_ok) = last_ok {
            let pos =
                seen_pos.unwrap_or_else(|| panic!("pair {pair}: final state {seen:?} unknown"));
            assert!(
                pos >= last_ok,
                "pair {pair}: final state older than the last acknowledged write"
            );
            assert!(
                ws[pos + 1..].iter().all(|(_, o)| *o != Outcome::Ok),
                "pair {pair}: a later acknowledged write is lost"
            );
        }
    }
    let failed = failed_reads.lock().clone();
    println!(
        "{committed} pair writes acknowledged, {} whole reads, {} failed reads (e.g. {:?})",
        *reads.lock(),
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(committed > 20, "too few pair writes: {committed}");
}

/// Serializable reads over several regions are answered by each node's own
/// replicas at the lowest resolved revision of the regions: while
/// transactions over both regions and single-key writes go on, every such
/// read sees each pair whole and equals a linearizable re-read at its
/// revision afterwards; once writes stop, the resolved revisions catch up
/// with the cluster's revision.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn serializable_reads_over_regions_use_resolved_revisions() {
    let cluster = cluster_split_at(&["m"]).await;
    let stop = Instant::now() + Duration::from_secs(6);
    let writer = tokio::spawn({
        let router = cluster.router(1).unwrap();
        async move {
            let mut seq = 0;
            while Instant::now() < stop {
                seq += 1;
                let v = seq.to_string();
                let _ = router
                    .write(&txn(vec![put_op("a", &v), put_op("z", &v)]))
                    .await;
                let single = WriteRequest::Put(PutRequest {
                    key: b"b".to_vec(),
                    value: v.into(),
                    ..Default::default()
                });
                let _ = router.write(&single).await;
            }
        }
    });
    let all = RangeRequest {
        key: b"a".to_vec(),
        range_end: vec![0],
        serializable: true,
        ..Default::default()
    };
    let mut seen = Vec::new();
    while Instant::now() < stop {
        for id in 1..=3 {
            let r = cluster.router(id).unwrap();
            if let Ok(resp) = r.range(&all).await {
                let kvs = kv_map(&resp);
                assert_eq!(kvs.get("a"), kvs.get("z"), "a pair seen half: {kvs:?}");
                seen.push((resp.header.unwrap().revision, resp.kvs));
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    writer.await.unwrap();
    let router = cluster.router(2).unwrap();
    for (rev, kvs) in &seen {
        let again = RangeRequest {
            revision: *rev,
            serializable: false,
            ..all.clone()
        };
        let resp = must("re-read", || router.range(&again)).await;
        assert_eq!(
            &resp.kvs, kvs,
            "serializable read at {rev} differs from a re-read"
        );
    }
    let current = router.current_revision().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let revs: Vec<i64> = futures::future::join_all((1..=3).map(|id| {
            let r = cluster.router(id).unwrap();
            let all = all.clone();
            async move { r.range(&all).await.map(|x| x.header.unwrap().revision) }
        }))
        .await
        .into_iter()
        .map(|r| r.unwrap_or(0))
        .collect();
        if revs.iter().all(|r| *r == current) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "resolved revisions stuck at {revs:?}, cluster at {current}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Served by the node's own replicas: a node cut off from the others
    // still answers, at the resolved revision.
    let others: Vec<u64> = vec![1, 2];
    cluster.raft().partition(&[3], &others);
    let cut_off = cluster.router(3).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(2), cut_off.range(&all))
        .await
        .expect("a serializable read on a cut-off node waited for the network")
        .expect("a serializable read on a cut-off node failed");
    assert_eq!(resp.header.unwrap().revision, current);
    cluster.raft().heal();
    println!("{} serializable reads over both regions", seen.len());
    assert!(seen.len() > 20);
}
