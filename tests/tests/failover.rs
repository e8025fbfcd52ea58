//! Failover of a real cluster of 3 PD members and 3 nodes: every node serves
//! every request; kill -9 of the node holding the region leader during a
//! write stream loses no acknowledged write and the restarted node converges
//! (HashKV); kill -9 of the PD leader does not stop the nodes serving.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::GetOptions;
use test_support::{client, Cluster, ProcessCluster};

/// An acknowledged write: key, revision, when sent, when acknowledged.
type Ack = (String, i64, Instant, Instant);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_node_serves_writes_and_linearizable_reads() {
    let cluster = ProcessCluster::start().await;
    let ids = cluster.member_ids();
    let mut clients = Vec::new();
    for endpoint in cluster.endpoints() {
        clients.push(client(&endpoint).await);
    }
    for i in 0..90usize {
        let (w, r) = (i % 3, (i + 1) % 3);
        let key = format!("k{i}");
        let put = clients[w].put(key.clone(), format!("v{i}"), None).await;
        let put = put.unwrap_or_else(|e| panic!("put {key} through node {w}: {e}"));
        // The serving node's member id, not the leader's.
        assert_eq!(put.header().unwrap().member_id(), ids[w]);
        let rev = put.header().unwrap().revision();
        // Read through another node right after the ack: must see it.
        let got = clients[r].get(key.clone(), None).await.unwrap();
        assert_eq!(
            got.kvs().len(),
            1,
            "{key} written via {w}, not seen via {r}"
        );
        assert_eq!(got.kvs()[0].mod_revision(), rev);
        assert!(got.header().unwrap().revision() >= rev);
        assert_eq!(got.header().unwrap().member_id(), ids[r]);
    }
    // etcd errors come back unchanged from whichever node serves.
    for c in clients.iter_mut() {
        let err = c
            .txn(etcd_client::Txn::new().and_then(vec![
                etcd_client::TxnOp::put("d", "1", None),
                etcd_client::TxnOp::put("d", "2", None),
            ]))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("etcdserver: duplicate key given in txn request"),
            "{err}"
        );
    }
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_node_kill9_loses_no_acknowledged_write() {
    let mut cluster = ProcessCluster::start().await;
    let leader = cluster.leader_index().await;

    // One writer per node, each through its own node only.
    let acked: Arc<Mutex<Vec<Ack>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for (w, endpoint) in cluster.endpoints().into_iter().enumerate() {
        let (acked, stop) = (acked.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut c = client(&endpoint).await;
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let key = format!("w{w}-{i:05}");
                i += 1;
                let sent = Instant::now();
                match c.put(key.clone(), "v", None).await {
                    Ok(r) => {
                        let rev = r.header().unwrap().revision();
                        acked.lock().unwrap().push((key, rev, sent, Instant::now()));
                    }
                    // Failed or unknown outcome: only acks are checked.
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before_kill = acked.lock().unwrap().len();
    assert!(before_kill > 0, "no write acknowledged before the kill");
    let killed_at = Instant::now();
    cluster.kill9(leader);
    // Keep writing until the survivors have accepted writes for a while.
    // Recovery is measured to the first ack of a write sent after the kill
    // (a write in flight at the kill may still be acknowledged at once).
    let deadline = killed_at + Duration::from_secs(30);
    let first_after = loop {
        let first = acked
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, _, sent, _)| *sent > killed_at)
            .map(|(_, _, _, at)| *at)
            .min();
        if let Some(t) = first {
            break t;
        }
        assert!(
            Instant::now() < deadline,
            "no write accepted after the kill"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    println!(
        "kill -9 of the leader's node to the first accepted write: {:?}",
        first_after - killed_at
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();

    // Revisions are unique, and those acknowledged after the kill are above
    // every one acknowledged before it.
    let mut revs: Vec<i64> = acked.iter().map(|(_, r, _, _)| *r).collect();
    revs.sort_unstable();
    revs.dedup();
    assert_eq!(revs.len(), acked.len(), "a revision was given twice");
    let max_before = acked
        .iter()
        .filter(|(_, _, _, at)| *at < killed_at)
        .map(|(_, r, _, _)| *r)
        .max()
        .unwrap();
    assert!(acked
        .iter()
        .filter(|(_, _, sent, _)| *sent > killed_at)
        .all(|(_, r, _, _)| *r > max_before));

    // Every acknowledged write is on every survivor, at its revision.
    let expected: HashMap<String, i64> = acked.iter().map(|(k, r, _, _)| (k.clone(), *r)).collect();
    for (i, endpoint) in cluster.endpoints().iter().enumerate() {
        if i == leader {
            continue;
        }
        let mut c = client(endpoint).await;
        let got = c
            .get("w", Some(GetOptions::new().with_prefix()))
            .await
            .unwrap();
        let found: HashMap<String, i64> = got
            .kvs()
            .iter()
            .map(|kv| (kv.key_str().unwrap().to_owned(), kv.mod_revision()))
            .collect();
        for (k, r) in &expected {
            assert_eq!(found.get(k), Some(r), "acked {k}@{r} missing on node {i}");
        }
    }

    // The killed node comes back, catches up, and all replicas hash equal.
    cluster.restart(leader);
    let mut c = client(&cluster.endpoints()[(leader + 1) % 3]).await;
    let rev = c
        .put("final", "v", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut hashes = Vec::new();
        for endpoint in cluster.endpoints() {
            let Ok(mut c) = etcd_client::Client::connect([endpoint], None).await else {
                continue;
            };
            if let Ok(h) = c.hash_kv(rev).await {
                hashes.push(h.hash());
            }
        }
        if hashes.len() == 3 && hashes.iter().all(|h| *h == hashes[0]) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "replicas did not converge at revision {rev}: {hashes:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_keep_serving_across_pd_leader_kill9() {
    let mut cluster = ProcessCluster::start().await;
    let leader = cluster.pd_leader_index().await;
    // etcd-client with all three node endpoints, as etcdctl would be.
    let node_eps = cluster.endpoints();
    let mut c = etcd_client::Client::connect(&node_eps, None).await.unwrap();
    let mut last = c
        .put("before", "v", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();

    let killed_at = Instant::now();
    cluster.kill9_pd(leader);
    let mut first_ok = None;
    let mut acked = 0;
    while acked < 50 {
        assert!(
            killed_at.elapsed() < Duration::from_secs(30),
            "writes did not resume after the PD leader died"
        );
        match c.put(format!("after{acked}"), "v", None).await {
            Ok(r) => {
                let rev = r.header().unwrap().revision();
                assert!(rev > last, "revision went back: {rev} after {last}");
                last = rev;
                acked += 1;
                first_ok.get_or_insert(killed_at.elapsed());
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    println!(
        "kill -9 of the PD leader to the first accepted write: {:?}",
        first_ok.unwrap()
    );
    cluster.restart_pd(leader);
    let r = c
        .get("after", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    assert_eq!(r.count(), 50);
}
