//! The revision protocol under concurrency: many writers and readers on one
//! node. A linearizable read at revision R must contain every write
//! acknowledged before it started, and exactly the writes with revision
//! <= R: re-reading at R afterwards (when nothing is in flight any more)
//! must give the same answer. A read that raced past an in-flight write
//! with a smaller revision would fail the second check.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::GetOptions;
use test_support::{client, Node};

type Snapshot = BTreeMap<String, i64>;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reads_see_exactly_the_writes_at_or_below_their_revision() {
    let node = Node::start_dev();
    let c = client(&node.endpoint()).await;
    // (ack time, key, revision) of every acknowledged write.
    let acked: Arc<Mutex<Vec<(Instant, String, i64)>>> = Arc::default();
    let stop = Instant::now() + Duration::from_secs(4);

    let mut writers = Vec::new();
    for w in 0..6 {
        let mut c = c.clone();
        let acked = acked.clone();
        writers.push(tokio::spawn(async move {
            let mut i = 0;
            while Instant::now() < stop {
                let key = format!("inv/{w}/{}", i % 20);
                let r = c.put(key.clone(), format!("{i}"), None).await.unwrap();
                let rev = r.header().unwrap().revision();
                acked.lock().unwrap().push((Instant::now(), key, rev));
                i += 1;
            }
        }));
    }
    let mut readers = Vec::new();
    for _ in 0..3 {
        let mut c = c.clone();
        let acked = acked.clone();
        readers.push(tokio::spawn(async move {
            let mut reads: Vec<(i64, Snapshot)> = Vec::new();
            while Instant::now() < stop {
                let started = Instant::now();
                let before: Vec<(String, i64)> = acked
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|(t, _, _)| *t < started)
                    .map(|(_, k, r)| (k.clone(), *r))
                    .collect();
                let r = c
                    .get("inv/", Some(GetOptions::new().with_prefix()))
                    .await
                    .unwrap();
                let rev = r.header().unwrap().revision();
                let snap: Snapshot = r
                    .kvs()
                    .iter()
                    .map(|kv| (kv.key_str().unwrap().to_string(), kv.mod_revision()))
                    .collect();
                for (key, wrev) in before {
                    assert!(
                        wrev <= rev,
                        "write {key}@{wrev} acked before a read at {rev}"
                    );
                    let seen = snap.get(&key).copied().unwrap_or(0);
                    assert!(
                        seen >= wrev,
                        "read at {rev} misses {key}@{wrev} (saw {seen})"
                    );
                }
                reads.push((rev, snap));
            }
            reads
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    let mut c = c.clone();
    let mut checked = 0;
    for r in readers {
        for (rev, snap) in r.await.unwrap() {
            let again = c
                .get(
                    "inv/",
                    Some(GetOptions::new().with_prefix().with_revision(rev)),
                )
                .await
                .unwrap();
            let again: Snapshot = again
                .kvs()
                .iter()
                .map(|kv| (kv.key_str().unwrap().to_string(), kv.mod_revision()))
                .collect();
            assert_eq!(again, snap, "the read at revision {rev} changed afterwards");
            checked += 1;
        }
    }
    let writes = acked.lock().unwrap().len();
    assert!(
        checked > 10 && writes > 100,
        "too little load: {checked} reads, {writes} writes"
    );
    println!("{writes} writes, {checked} reads checked");
}
