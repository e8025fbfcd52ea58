//! Watches over many regions (`router::watch`): every change of the
//! watched range exactly once, in revision order, each revision's changes
//! together — while regions split under the writes and transactions span
//! regions; history replay from a past revision, prev_kv, and the end of a
//! watch that starts below the compaction revision.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mvcc::exec::WriteRequest;
use mvcc::KeyRange;
use proto::etcdserverpb::{PutRequest, TxnRequest};
use proto::mvccpb::{event::EventType, Event};
use router::watch::{Watch, WatchUpdate};
use router::Router;
use test_support::requests::{delete_op, put_op};
use test_support::{history, RaftFault, RaftNemesis, RaftNemesisConfig, RouterCluster};

fn put(key: &str, value: &str) -> WriteRequest {
    WriteRequest::Put(PutRequest {
        key: key.into(),
        value: value.into(),
        ..Default::default()
    })
}

/// Retries what certainly did not apply (elections, splits) for a while.
async fn must_write(router: &Arc<Router>, req: WriteRequest) -> i64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match router.write(&req).await {
            Ok(resp) => return resp.revision(),
            Err(e) if e.is_retryable() && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("write failed: {e}"),
        }
    }
}

/// Splits at `key` once the region holding it has a ready leader.
async fn must_split(cluster: &RouterCluster, key: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while let Err(e) = cluster.split(key.as_bytes()).await {
        assert!(Instant::now() < deadline, "split at {key}: {e}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn prefix(p: &str) -> KeyRange {
    let mut end = p.as_bytes().to_vec();
    *end.last_mut().unwrap() += 1;
    KeyRange {
        start: p.as_bytes().to_vec(),
        end: Some(end),
    }
}

/// (revision, key, put value or None for a delete) of an event.
type Change = (i64, Vec<u8>, Option<Vec<u8>>);

fn change(e: &Event) -> Change {
    let kv = e.kv.clone().unwrap_or_default();
    let value = (e.r#type == EventType::Put as i32).then_some(kv.value);
    (kv.mod_revision, kv.key, value)
}

/// Reads `watch` until it delivered `revision`; every update's changes,
/// one list per update.
async fn collect_until(watch: &mut Watch, revision: i64) -> Vec<Vec<Event>> {
    let mut updates = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // In this order: what was delivered up to `delivered` is all
        // taken once the queue is empty.
        let delivered = watch.delivered();
        if delivered >= revision && watch.is_drained() {
            return updates;
        }
        assert!(
            Instant::now() < deadline,
            "watch delivered up to {delivered} only, not {revision}"
        );
        tokio::select! {
            next = watch.next() => match next {
                Some(Ok(WatchUpdate::Events { events, .. })) => updates.push(events),
                other => panic!("watch ended: {other:?}"),
            },
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    }
}

/// Every change of `range` in (`from`..=`to`) as node `router` stores it.
fn history(router: &Router, range: &KeyRange, from: i64, to: i64) -> Vec<Change> {
    let mvcc = mvcc::MvccStore::new(router.store().kv_engine().clone());
    let view = mvcc.snapshot();
    view.events(range, from, to, 0, false)
        .unwrap()
        .iter()
        .map(change)
        .collect()
}

/// Checks a watch's updates against the history: the same changes in
/// the same order, revisions never going back, and no revision split
/// over two updates.
fn check(updates: &[Vec<Event>], expected: &[Change]) {
    let got: Vec<Change> = updates.iter().flatten().map(change).collect();
    assert_eq!(got.len(), expected.len(), "changes delivered vs stored");
    assert_eq!(got, expected, "delivered changes differ from the history");
    let mut seen_in: BTreeMap<i64, usize> = BTreeMap::new();
    for (i, update) in updates.iter().enumerate() {
        for e in update {
            let rev = e.kv.as_ref().unwrap().mod_revision;
            let first = *seen_in.entry(rev).or_insert(i);
            assert_eq!(
                first, i,
                "revision {rev} split over updates {first} and {i}"
            );
        }
    }
}

/// Writers put and delete single keys and run transactions over keys
/// far apart while the range splits three times; a watch from the first
/// revision, started before, sees exactly the stored history of its
/// range — and so does one started afterwards from a past revision (a
/// replay from MVCC).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_watch_over_splitting_regions_sees_every_change_once_in_order() {
    let cluster = RouterCluster::new(3).await;
    let leader = cluster.leader().await;
    let router = cluster.router(leader).unwrap();
    let first = must_write(&router, put("w/a/0", "start")).await;
    let range = prefix("w/");
    // Watch on a follower's node: its replicas apply after the leader's.
    let watcher_node = cluster.ids().into_iter().find(|id| *id != leader).unwrap();
    let watcher = cluster.router(watcher_node).unwrap();
    let mut live = watcher.watch(range.clone(), first, false).await.unwrap();

    let writers: Vec<_> = (0..3)
        .map(|w| {
            let router = router.clone();
            tokio::spawn(async move {
                for i in 0..40 {
                    let key = format!("w/{}/{i:02}", ["a", "h", "q"][w]);
                    let req = match i % 4 {
                        0 => WriteRequest::Txn(TxnRequest {
                            success: vec![
                                put_op(&format!("w/a/t{w}{i}"), "txn"),
                                put_op(&format!("w/z/t{w}{i}"), "txn"),
                                delete_op(&format!("w/h/{:02}", i.max(1) - 1)),
                            ],
                            ..Default::default()
                        }),
                        _ => put(&key, &format!("v{i}")),
                    };
                    must_write(&router, req).await;
                }
            })
        })
        .collect();
    for key in ["w/h", "w/q", "w/z"] {
        tokio::time::sleep(Duration::from_millis(150)).await;
        must_split(&cluster, key).await;
    }
    for w in writers {
        w.await.unwrap();
    }
    let last = must_write(&router, put("w/q/last", "end")).await;
    // Outside the range: not delivered.
    must_write(&router, put("x", "outside")).await;

    let updates = collect_until(&mut live, last).await;
    let expected = history(&router, &range, first, last);
    assert!(expected.len() > 100, "{} changes", expected.len());
    check(&updates, &expected);

    let mut replay = watcher.watch(range.clone(), first, false).await.unwrap();
    let updates = collect_until(&mut replay, last).await;
    check(&updates, &expected);
}

/// prev_kv: each event carries the key's version before it (none for a
/// key created by the event); a watch from revision 0 sees only what is
/// written after it started.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prev_kv_and_a_watch_from_now() {
    let cluster = RouterCluster::new(1).await;
    cluster.leader().await;
    let router = cluster.router(1).unwrap();
    must_write(&router, put("p/k", "old")).await;
    let mut watch = router.watch(prefix("p/"), 0, true).await.unwrap();
    let rev = must_write(&router, put("p/k", "new")).await;
    let created = must_write(&router, put("p/n", "fresh")).await;
    let updates = collect_until(&mut watch, created).await;
    let events: Vec<&Event> = updates.iter().flatten().collect();
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(events[0].kv.as_ref().unwrap().mod_revision, rev);
    assert_eq!(events[0].prev_kv.as_ref().unwrap().value, b"old");
    assert!(events[1].prev_kv.is_none());
}

/// A watch starting below the compaction revision ends with the
/// compaction revision, as etcd cancels it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_watch_below_the_compaction_revision_ends_compacted() {
    let cluster = RouterCluster::new(1).await;
    cluster.leader().await;
    let router = cluster.router(1).unwrap();
    let first = must_write(&router, put("c/k", "1")).await;
    let compacted = must_write(&router, put("c/k", "2")).await;
    router.compact(compacted, false).await.unwrap();
    let mut watch = router.watch(prefix("c/"), first, false).await.unwrap();
    let end = tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .expect("an answer");
    assert_eq!(
        end.unwrap().unwrap(),
        WatchUpdate::Compacted {
            compact_revision: compacted
        }
    );
    // At the compaction revision itself the history is there.
    let mut watch = router.watch(prefix("c/"), compacted, false).await.unwrap();
    let updates = collect_until(&mut watch, compacted).await;
    assert_eq!(updates.concat().len(), 1);
}

/// Under partitions, message loss, delays, duplicates and leader
/// isolation, with regions applying out of step on each node (a lagging
/// replica catches up by snapshot, which resets its feed): a watch on
/// every node still delivers exactly its node's stored history of the
/// range, in order, each revision whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watches_on_every_node_stay_exact_under_raft_faults() {
    let seed = history::seed("watches_on_every_node_stay_exact_under_raft_faults");
    let cluster = RouterCluster::new(3).await;
    let leader = cluster.leader().await;
    let router = cluster.router(leader).unwrap();
    let first = must_write(&router, put("f/a", "start")).await;
    for key in ["f/g", "f/n", "f/t"] {
        must_split(&cluster, key).await;
    }
    let range = prefix("f/");
    let mut watches = Vec::new();
    for id in cluster.ids() {
        let node = cluster.router(id).unwrap();
        watches.push((id, node.watch(range.clone(), first, false).await.unwrap()));
    }
    let nemesis = RaftNemesis::start(
        cluster.raft().clone(),
        RaftNemesisConfig {
            faults: vec![
                RaftFault::IsolateLeader,
                RaftFault::Partition,
                RaftFault::Loss,
                RaftFault::Delay,
                RaftFault::Duplicate,
            ],
            seed: Some(seed),
            interval: (Duration::from_millis(500), Duration::from_millis(1500)),
            hold: (Duration::from_millis(300), Duration::from_millis(1500)),
            ..RaftNemesisConfig::default()
        },
        Instant::now(),
    );
    let run_for = history::duration(Duration::from_secs(10));
    let writers: Vec<_> = cluster
        .ids()
        .into_iter()
        .enumerate()
        .map(|(w, id)| {
            let router = cluster.router(id).unwrap();
            tokio::spawn(async move {
                let end = Instant::now() + run_for;
                let mut i = 0;
                while Instant::now() < end {
                    i += 1;
                    let key = |p: &str| format!("f/{p}/{w}-{i}");
                    let req = if i % 3 == 0 {
                        WriteRequest::Txn(TxnRequest {
                            success: vec![
                                put_op(&key("b"), "txn"),
                                put_op(&key("p"), "txn"),
                                put_op(&key("z"), "txn"),
                            ],
                            ..Default::default()
                        })
                    } else {
                        put(&key(["c", "h", "u"][i % 3]), "v")
                    };
                    // Failures and unknown outcomes are fine: the
                    // stored history is the truth.
                    let _ = router.write(&req).await;
                }
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    drop(nemesis);
    cluster.raft().heal();
    let last = must_write(&router, put("f/zz", "end")).await;
    for (id, watch) in &mut watches {
        let updates = collect_until(watch, last).await;
        let node = cluster.router(*id).unwrap();
        let expected = history(&node, &range, first, last);
        println!("node {id}: {} changes (seed {seed})", expected.len());
        check(&updates, &expected);
    }
}

/// A node holding no replica of the watched regions serves the watch
/// through their leaders' nodes; once a replica moves onto it, it follows
/// that one instead — exact history throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_without_replicas_watches_through_the_leaders() {
    let cluster = RouterCluster::with_spare(3, 1, Default::default()).await;
    let leader = cluster.leader().await;
    let router = cluster.router(leader).unwrap();
    let first = must_write(&router, put("s/a", "start")).await;
    must_split(&cluster, "s/m").await;
    let spare = cluster.router(4).unwrap();
    assert!(spare.store().regions().is_empty());
    let range = prefix("s/");
    let mut watch = spare.watch(range.clone(), first, true).await.unwrap();
    let writer = tokio::spawn({
        let router = router.clone();
        async move {
            for i in 0..60 {
                let req = if i % 5 == 0 {
                    WriteRequest::Txn(TxnRequest {
                        success: vec![
                            put_op(&format!("s/b{i}"), "t"),
                            put_op(&format!("s/x{i}"), "t"),
                        ],
                        ..Default::default()
                    })
                } else {
                    put(&format!("s/{}", ["c", "y"][i % 2]), &format!("v{i}"))
                };
                must_write(&router, req).await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    let region = cluster
        .router(leader)
        .unwrap()
        .store()
        .regions()
        .into_iter()
        .find(|h| h.status().region.start_key.is_empty())
        .unwrap()
        .region_id();
    let from = cluster
        .ids()
        .into_iter()
        .find(|id| *id != 4 && *id != leader)
        .unwrap();
    cluster
        .move_replica(region, from, 4)
        .await
        .expect("move a replica");
    writer.await.unwrap();
    let last = must_write(&router, put("s/z", "end")).await;
    let updates = collect_until(&mut watch, last).await;
    let expected = history(&router, &range, first, last);
    check(&updates, &expected);
    assert!(!spare.store().regions().is_empty(), "the replica moved");
}

/// A watch nobody reads while thousands of writes apply (its queue fills,
/// its feeds fall more than their capacity behind) holds up no writer,
/// and once read delivers the whole history, caught up from MVCC in
/// batches that never cut a revision; so does a watch started afterwards
/// from the first revision.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_watch_read_late_misses_nothing() {
    let cluster = RouterCluster::new(1).await;
    cluster.leader().await;
    let router = cluster.router(1).unwrap();
    let first = must_write(&router, put("slow/a", "start")).await;
    must_split(&cluster, "slow/m").await;
    let range = prefix("slow/");
    let mut watch = router.watch(range.clone(), first, true).await.unwrap();
    let mut last = first;
    for i in 0..(raftstore::feed::FEED_CAPACITY + 500) {
        // Three changes a revision, on both sides of the split: a batch
        // of 1,024 ends inside one (the replay below: 1 + 3 × 341).
        let ops = ["slow/b", "slow/t", "slow/x"]
            .iter()
            .map(|k| put_op(&format!("{k}{}", i % 7), &format!("v{i}")))
            .collect();
        let req = WriteRequest::Txn(TxnRequest {
            success: ops,
            ..Default::default()
        });
        last = must_write(&router, req).await;
    }
    let expected = history(&router, &range, first, last);
    let updates = collect_until(&mut watch, last).await;
    check(&updates, &expected);
    let mut replay = router.watch(range.clone(), first, true).await.unwrap();
    let updates = collect_until(&mut replay, last).await;
    check(&updates, &expected);
}

/// Watches of one range from now share one aggregator: the fast ones
/// stay in its stream; one that stops reading falls more than the
/// stream's backlog behind and catches up alone; one from a past
/// revision runs its own from the start. Each sees exactly the stored
/// history from its start revision, a revision never split.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watchers_of_a_range_share_an_aggregator_and_a_slow_one_goes_alone() {
    let cluster = RouterCluster::new(1).await;
    cluster.leader().await;
    let router = cluster.router(1).unwrap();
    let first = must_write(&router, put("s/a", "0")).await;
    let range = prefix("s/");
    let mut fast = Vec::new();
    for _ in 0..10 {
        fast.push(router.watch(range.clone(), 0, false).await.unwrap());
    }
    let mut slow = router.watch(range.clone(), 0, false).await.unwrap();
    let mut past = router.watch(range.clone(), first, false).await.unwrap();
    assert!(fast.iter().all(|w| w.progress().is_shared()));
    assert!(slow.progress().is_shared());
    assert!(
        !past.progress().is_shared(),
        "a watch from the past runs alone"
    );
    let mut fast_updates = vec![Vec::new(); fast.len()];
    let mut last = first;
    for chunk in 0..6 {
        for i in 0..50 {
            let key = format!("s/k{}", i % 7);
            last = must_write(&router, put(&key, &format!("{chunk}.{i}"))).await;
        }
        for (w, updates) in fast.iter_mut().zip(fast_updates.iter_mut()) {
            updates.extend(collect_until(w, last).await);
        }
    }
    let expected = history(&router, &range, first + 1, last);
    for (w, updates) in fast.iter().zip(&fast_updates) {
        check(updates, &expected);
        assert!(w.progress().is_shared(), "a fast watch left the stream");
    }
    let slow_updates = collect_until(&mut slow, last).await;
    check(&slow_updates, &expected);
    assert!(
        !slow.progress().is_shared(),
        "the slow watch kept its place"
    );
    let past_updates = collect_until(&mut past, last).await;
    check(&past_updates, &history(&router, &range, first, last));
}
