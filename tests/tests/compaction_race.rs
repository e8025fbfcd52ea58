//! Readers racing physical compactions. A read is checked against the
//! compaction revision and must then see the state of that moment for as
//! long as it reads, while the clean-up deletes superseded versions
//! underneath: each read takes one RocksDB snapshot and checks the
//! compaction revision stored in that same snapshot.
//!
//! HashKV is the sharpest probe (one request reads every version of every
//! key, value by value): while compactions run one after another, each
//! HashKV at a fixed revision must equal the hash that a quiet store gives
//! for the compaction revision it reports — never a mix of two states.
//! Historical ranges are checked alongside.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use etcd_client::{CompactionOptions, GetOptions, Txn, TxnOp};
use test_support::{client, Node};

const KEYS: usize = 3000;
const GENERATIONS: usize = 6;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hash_kv_and_ranges_race_physical_compactions() {
    let node = Node::start_dev();
    let mut c = client(&node.endpoint()).await;
    // Generation g of every key ends at revision ends[g].
    let mut ends = Vec::new();
    for gen in 0..GENERATIONS {
        let mut last = 0;
        for start in (0..KEYS).step_by(100) {
            let ops: Vec<TxnOp> = (start..start + 100)
                .map(|i| TxnOp::put(format!("c/{i:05}"), format!("g{gen}"), None))
                .collect();
            last = c
                .txn(Txn::new().and_then(ops))
                .await
                .unwrap()
                .header()
                .unwrap()
                .revision();
        }
        ends.push(last);
    }
    let at = *ends.last().unwrap();
    let mut reference: HashMap<i64, u32> = HashMap::new();
    let h = c.hash_kv(at).await.unwrap();
    reference.insert(h.compact_version(), h.hash());

    let done = Arc::new(AtomicBool::new(false));
    let mut readers = Vec::new();
    for i in 0..3 {
        let mut c = c.clone();
        let done = done.clone();
        let ends = ends.clone();
        readers.push(tokio::spawn(async move {
            let mut hashes = Vec::new();
            let mut n = 0;
            while !done.load(Ordering::Relaxed) {
                n += 1;
                if i == 0 {
                    // A historical range at some generation's end.
                    let gen = n % GENERATIONS;
                    let opts = GetOptions::new().with_prefix().with_revision(ends[gen]);
                    match c.get("c/", Some(opts)).await {
                        Ok(r) => {
                            let want = format!("g{gen}");
                            let ok = r.kvs().iter().filter(|kv| kv.value() == want.as_bytes());
                            let ok = ok.count();
                            assert!(
                                r.kvs().len() == KEYS && ok == KEYS,
                                "a range at {} saw {} keys, {ok} of them as of then",
                                ends[gen],
                                r.kvs().len()
                            );
                        }
                        Err(e) => assert!(e.to_string().contains("compacted"), "{e}"),
                    }
                } else {
                    let h = c.hash_kv(at).await.unwrap();
                    hashes.push((h.compact_version(), h.hash()));
                }
            }
            hashes
        }));
    }
    for &end in &ends[..GENERATIONS - 1] {
        c.compact(end, Some(CompactionOptions::new().with_physical()))
            .await
            .unwrap();
        let h = c.hash_kv(at).await.unwrap();
        assert_eq!(h.compact_version(), end);
        reference.insert(end, h.hash());
    }
    done.store(true, Ordering::Relaxed);
    let mut checked = 0;
    for r in readers {
        for (compacted, hash) in r.await.unwrap() {
            let expected = reference
                .get(&compacted)
                .unwrap_or_else(|| panic!("HashKV reported compaction revision {compacted}"));
            assert_eq!(
                hash, *expected,
                "HashKV at {at} with compaction revision {compacted} mixed two states"
            );
            checked += 1;
        }
    }
    println!(
        "{checked} HashKV results checked over {} compactions",
        GENERATIONS - 1
    );
}
