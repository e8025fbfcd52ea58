//! kill -9 in the middle of a write stream: every acknowledged write is
//! there after a restart with its revision, and revisions keep increasing.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::GetOptions;
use test_support::{client, Node};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_kill9() {
    let mut node = Node::start_dev();
    let endpoint = node.endpoint();
    let acked: Arc<Mutex<BTreeMap<String, (String, i64)>>> = Arc::default();
    for round in 0..3 {
        let c = client(&endpoint).await;
        let mut writers = Vec::new();
        for w in 0..4 {
            let mut c = c.clone();
            let acked = acked.clone();
            writers.push(tokio::spawn(async move {
                for i in 0.. {
                    let key = format!("crash/{round}/{w}/{}", i % 50);
                    let value = format!("{round}-{w}-{i}");
                    match c.put(key.clone(), value.clone(), None).await {
                        Ok(r) => {
                            let rev = r.header().map_or(0, |h| h.revision());
                            acked.lock().unwrap().insert(key, (value, rev));
                        }
                        // The node died under us; outcome unknown.
                        Err(_) => return i,
                    }
                }
                0
            }));
        }
        tokio::time::sleep(Duration::from_millis(700 + 300 * round as u64)).await;
        // On a loaded machine the first writes of a round can take longer:
        // the kill must land in the middle of the stream, not before it.
        let before = acked.lock().unwrap().len();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while acked.lock().unwrap().len() < before + 20 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        node.kill9();
        let mut total = 0;
        for w in writers {
            total += w.await.unwrap();
        }
        assert!(total > 0, "no write went through before the kill");
        node.restart();

        let mut c = client(&endpoint).await;
        let r = c
            .get("crash/", Some(GetOptions::new().with_prefix()))
            .await
            .unwrap();
        let restart_rev = r.header().unwrap().revision();
        let found: BTreeMap<String, (String, i64)> = r
            .kvs()
            .iter()
            .map(|kv| {
                (
                    kv.key_str().unwrap().to_string(),
                    (kv.value_str().unwrap().to_string(), kv.mod_revision()),
                )
            })
            .collect();
        let acked = acked.lock().unwrap().clone();
        let max_acked = acked.values().map(|(_, r)| *r).max().unwrap_or(0);
        for (key, (value, rev)) in &acked {
            let (got_value, got_rev) = found
                .get(key)
                .unwrap_or_else(|| panic!("acknowledged {key}@{rev} lost after kill -9"));
            // A later write to the same key may have landed without its
            // acknowledgement reaching us; it must then be newer.
            assert!(
                got_rev >= rev,
                "{key}: acknowledged rev {rev}, found {got_rev}"
            );
            if got_rev == rev {
                assert_eq!(got_value, value);
            }
        }
        assert!(
            restart_rev >= max_acked,
            "revision went back: {restart_rev} < {max_acked}"
        );
        // The next write continues the sequence: right after what a reader sees.
        let next = c.put("crash/next", "x", None).await.unwrap();
        assert_eq!(next.header().unwrap().revision(), restart_rev + 1);
        println!(
            "round {round}: {} acknowledged writes intact, max acked rev {max_acked}, read rev after restart {restart_rev}",
            acked.len()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_restart_keeps_keys_and_exact_revision() {
    let mut node = Node::start_dev();
    let mut c = client(&node.endpoint()).await;
    for i in 0..20 {
        c.put(format!("k{i}"), "v", None).await.unwrap();
    }
    assert!(node.stop().success(), "clean shutdown exits 0");
    node.restart();
    let mut c = client(&node.endpoint()).await;
    let r = c
        .get("k", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    assert_eq!(r.count(), 20);
    assert_eq!(r.header().unwrap().revision(), 21);
    let p = c.put("after", "v", None).await.unwrap();
    assert_eq!(p.header().unwrap().revision(), 22);
}
