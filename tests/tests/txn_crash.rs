//! Transactions over several regions on real processes (3 PD members, 3
//! nodes splitting into small regions) while nodes are killed with
//! `kill -9` and restarted: a killed node may be the coordinator of a
//! transaction (the node the client sent it to) at any step, or lead a
//! participant region. Writers put both keys of a pair in one txn (or
//! delete both), the keys far apart so they live in different regions;
//! readers list every pair at once. Every read must see each pair whole,
//! at one revision, never older than a write acknowledged before it
//! started; at the end each pair holds its last acknowledged write or a
//! later one whose outcome was unknown.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{Client, ConnectOptions, GetOptions, Txn, TxnOp};
use parking_lot::Mutex;
use pd::{PdClient, RpcPdClient, RpcPdClientConfig};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use test_support::{ProcessCluster, ProcessClusterOptions};

const PAIRS: usize = 4;

fn keys(pair: usize) -> (String, String) {
    (format!("t/a/{pair}"), format!("t/z/{pair}"))
}

async fn connect(endpoint: &str) -> Option<Client> {
    let options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_millis(500))
        .with_timeout(Duration::from_secs(8));
    Client::connect([endpoint], Some(options)).await.ok()
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Outcome {
    Ok,
    Unknown,
}

/// One pair's writes in order: (seq, outcome); a delete has the top bit
/// set.
type WriteLog = Vec<(u64, Outcome)>;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pairs_stay_whole_when_nodes_are_killed() {
    let seed: u64 = std::env::var("METASTORE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("seed {seed} (replay with METASTORE_SEED={seed})");
    let cluster = ProcessCluster::start_with(ProcessClusterOptions {
        node_args: vec![
            "--region-max-keys".into(),
            "2".into(),
            "--split-check-interval".into(),
            "200ms".into(),
        ],
        ..Default::default()
    })
    .await;
    let endpoints: Vec<String> = cluster.nodes().iter().map(|n| n.endpoint()).collect();
    // Filler keys between the pairs' halves, so the splits put them in
    // different regions.
    let mut c = connect(&endpoints[0]).await.expect("connect");
    for i in 0..12 {
        let deadline = Instant::now() + Duration::from_secs(30);
        while c.put(format!("t/m/{i:02}"), "filler", None).await.is_err() {
            assert!(Instant::now() < deadline, "filler put failed");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // The two halves of every pair in different regions.
    let pd = RpcPdClient::connect(&cluster.pd_endpoints(), RpcPdClientConfig::default())
        .await
        .expect("connect to PD");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let regions = pd.scan_regions(b"", b"", 0).await.expect("scan regions");
        let region_of = |key: &str| {
            regions.iter().position(|r| {
                key.as_bytes() >= r.region.start_key.as_slice()
                    && (r.region.end_key.is_empty() || key.as_bytes() < r.region.end_key.as_slice())
            })
        };
        let split = (0..PAIRS).all(|p| {
            let (a, z) = keys(p);
            matches!((region_of(&a), region_of(&z)), (Some(x), Some(y)) if x != y)
        });
        if split {
            println!("{} regions", regions.len());
            break;
        }
        assert!(Instant::now() < deadline, "pairs not split over regions");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    let cluster = Arc::new(tokio::sync::Mutex::new(cluster));
    let run_for = Duration::from_secs(
        std::env::var("TXN_CRASH_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(25),
    );
    let stop = Instant::now() + run_for;
    // Per pair, in order: (seq, outcome); seq with the top bit = a delete.
    let writes: Arc<Mutex<Vec<WriteLog>>> = Arc::new(Mutex::new(vec![Vec::new(); PAIRS]));
    let mut tasks = Vec::new();
    for pair in 0..PAIRS {
        let endpoints = endpoints.clone();
        let writes = writes.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(seed.wrapping_add(pair as u64));
            let (a, z) = keys(pair);
            let mut seq = 0u64;
            while Instant::now() < stop {
                let endpoint = &endpoints[rng.gen_range(0..endpoints.len())];
                let Some(mut c) = connect(endpoint).await else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                seq += 1;
                let delete = rng.gen_range(0..5) == 0;
                let txn = if delete {
                    Txn::new().and_then([
                        TxnOp::delete(a.as_str(), None),
                        TxnOp::delete(z.as_str(), None),
                    ])
                } else {
                    let v = seq.to_string();
                    Txn::new().and_then([
                        TxnOp::put(a.as_str(), v.as_str(), None),
                        TxnOp::put(z.as_str(), v.as_str(), None),
                    ])
                };
                // Recorded before it is sent: a reader may see it while in
                // flight.
                let recorded = if delete { seq | 1 << 63 } else { seq };
                writes.lock()[pair].push((recorded, Outcome::Unknown));
                if c.txn(txn).await.is_ok() {
                    // A failed call may have applied or not: the client
                    // cannot tell a refusal from a lost answer.
                    if let Some(last) = writes.lock()[pair].last_mut() {
                        last.1 = Outcome::Ok;
                    }
                }
            }
        }));
    }
    let whole_reads = Arc::new(Mutex::new(0usize));
    for endpoint in endpoints.clone() {
        let writes = writes.clone();
        let whole_reads = whole_reads.clone();
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
                            .map(|(s, _)| *s)
                    })
                    .collect();
                let Some(mut c) = connect(&endpoint).await else {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                };
                let Ok(resp) = c.get("t/", Some(GetOptions::new().with_prefix())).await else {
                    continue;
                };
                let rev = resp.header().map_or(0, |h| h.revision());
                let kvs: HashMap<String, (String, i64)> = resp
                    .kvs()
                    .iter()
                    .map(|kv| {
                        (
                            kv.key_str().unwrap_or_default().to_string(),
                            (kv.value_str().unwrap_or_default().to_string(), kv.mod_revision()),
                        )
                    })
                    .collect();
                let written = writes.lock().clone();
                for pair in 0..PAIRS {
                    let (a, z) = keys(pair);
                    assert_eq!(
                        kvs.get(&a),
                        kvs.get(&z),
                        "seed {seed}: pair {pair} seen half at revision {rev}"
                    );
                    let Some(floor) = floor[pair] else { continue };
                    let seen = kvs.get(&a).map(|(v, _)| v.parse::<u64>().unwrap_or(0));
                    let pos = |s: u64| written[pair].iter().position(|(w, _)| *w == s);
                    let floor_pos = pos(floor).unwrap_or(0);
                    let seen_pos = match seen {
                        Some(s) => pos(s),
                        None => written[pair]
                            .iter()
                            .rposition(|(w, _)| *w & (1 << 63) != 0)
                            .filter(|p| *p >= floor_pos),
                    };
                    if let Some(seen_pos) = seen_pos {
                        assert!(
                            seen_pos >= floor_pos,
                            "seed {seed}: pair {pair} read {seen:?} after write #{floor_pos} was acknowledged"
                        );
                    } else {
                        assert!(
                            floor & (1 << 63) != 0,
                            "seed {seed}: pair {pair} read {seen:?}, which no write wrote after #{floor_pos}"
                        );
                    }
                }
                assert!(rev >= last_rev, "seed {seed}: reads went back in revision");
                last_rev = rev;
                *whole_reads.lock() += 1;
            }
        }));
    }
    // kill -9 a node every few seconds, and bring it back.
    let killer = tokio::spawn({
        let cluster = cluster.clone();
        async move {
            let mut rng = StdRng::seed_from_u64(seed.wrapping_add(99));
            let mut kills = 0;
            while Instant::now() + Duration::from_secs(4) < stop {
                tokio::time::sleep(Duration::from_millis(rng.gen_range(1000..3000))).await;
                let i = rng.gen_range(0..3);
                let mut c = cluster.lock().await;
                c.node_mut(i).kill9();
                kills += 1;
                drop(c);
                tokio::time::sleep(Duration::from_millis(rng.gen_range(200..1500))).await;
                cluster.lock().await.node_mut(i).restart();
            }
            kills
        }
    });
    for t in tasks {
        t.await.expect("worker");
    }
    let kills = killer.await.expect("killer");

    // Every node back; every pair whole, holding its last acknowledged
    // write or a later one.
    let deadline = Instant::now() + Duration::from_secs(60);
    let final_kvs = loop {
        if let Some(mut c) = connect(&endpoints[1]).await {
            if let Ok(resp) = c.get("t/", Some(GetOptions::new().with_prefix())).await {
                break resp
                    .kvs()
                    .iter()
                    .map(|kv| {
                        (
                            kv.key_str().unwrap_or_default().to_string(),
                            kv.value_str().unwrap_or_default().to_string(),
                        )
                    })
                    .collect::<HashMap<_, _>>();
            }
        }
        assert!(Instant::now() < deadline, "no final read");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let written = writes.lock().clone();
    let mut acked = 0;
    for (pair, ws) in written.iter().enumerate() {
        let (a, z) = keys(pair);
        assert_eq!(
            final_kvs.get(&a),
            final_kvs.get(&z),
            "seed {seed}: pair {pair} ended half written"
        );
        acked += ws.iter().filter(|(_, o)| *o == Outcome::Ok).count();
        let Some(last_ok) = ws.iter().rposition(|(_, o)| *o == Outcome::Ok) else {
            continue;
        };
        let pos = match final_kvs.get(&a) {
            Some(v) => ws
                .iter()
                .position(|(w, _)| *w == v.parse::<u64>().unwrap_or(0)),
            None => ws.iter().rposition(|(w, _)| *w & (1 << 63) != 0),
        };
        let pos = pos.unwrap_or_else(|| panic!("seed {seed}: pair {pair} holds an unknown write"));
        assert!(
            pos >= last_ok,
            "seed {seed}: pair {pair} lost acknowledged write #{last_ok} (holds #{pos})"
        );
    }
    println!(
        "{kills} kills, {acked} pair writes acknowledged, {} whole reads",
        *whole_reads.lock()
    );
    assert!(kills >= 3, "only {kills} kills");
    assert!(acked >= 20, "too few acknowledged pair writes: {acked}");
}
