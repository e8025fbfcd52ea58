//! The nemesis proves itself against MetaStore (3 PD members behind proxies
//! and 3 nodes) and against a real 3-member etcd, in turn: with every fault
//! the cluster can take enabled, 4 clients put unique values and read
//! linearizably for ~15 s; afterwards every acknowledged put is readable at
//! its revision, no two acks share a revision, the healed cluster serves
//! through every member, and the log shows every enabled fault injected.
//!
//! Only the fault driver is on trial here: a full history checker is
//! separate.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{ConnectOptions, GetOptions};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use test_support::{
    Cluster, EtcdCluster, Fault, Nemesis, NemesisConfig, ProcessCluster, ProcessClusterOptions,
};

const CLIENTS: usize = 4;
const KEYS: usize = 8;
/// The workload runs at least this long, and on until every enabled fault
/// was injected (at most [`MAX_WORKLOAD`]).
const WORKLOAD: Duration = Duration::from_secs(15);
const MAX_WORKLOAD: Duration = Duration::from_secs(60);

/// An acknowledged put.
#[derive(Clone, Debug)]
struct Ack {
    key: String,
    value: String,
    revision: i64,
    /// Since the workload's start.
    at: Duration,
}

#[derive(Default)]
struct Counts {
    puts_failed: AtomicU64,
    gets_ok: AtomicU64,
    gets_failed: AtomicU64,
}

/// All three endpoints, per-call timeouts of 1–2 s (by client).
async fn connect(endpoints: &[String], call_timeout: Duration) -> etcd_client::Client {
    let options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(1))
        .with_timeout(call_timeout);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match etcd_client::Client::connect(endpoints, Some(options.clone())).await {
            Ok(c) => return c,
            Err(e) => {
                assert!(Instant::now() < deadline, "connect {endpoints:?}: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// One client: puts of unique values and linearizable gets over a few
/// keys, until `stop`.
async fn client_loop(
    id: usize,
    endpoints: Vec<String>,
    epoch: Instant,
    stop: Arc<AtomicBool>,
    acks: Arc<Mutex<Vec<Ack>>>,
    counts: Arc<Counts>,
) {
    let call_timeout = Duration::from_millis(1000 + 250 * id as u64);
    let mut c = connect(&endpoints, call_timeout).await;
    let mut rng = StdRng::seed_from_u64(id as u64);
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let key = format!("k{}", rng.gen_range(0..KEYS));
        // The outer timeout only backs up the per-call one.
        let limit = call_timeout + Duration::from_millis(500);
        if rng.gen_bool(0.7) {
            seq += 1;
            let value = format!("c{id}-{seq}");
            match tokio::time::timeout(limit, c.put(key.clone(), value.clone(), None)).await {
                Ok(Ok(r)) => acks.lock().unwrap().push(Ack {
                    key,
                    value,
                    revision: r.header().expect("header").revision(),
                    at: epoch.elapsed(),
                }),
                _ => {
                    counts.puts_failed.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        } else {
            match tokio::time::timeout(limit, c.get(key, None)).await {
                Ok(Ok(_)) => counts.gets_ok.fetch_add(1, Ordering::Relaxed),
                _ => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    counts.gets_failed.fetch_add(1, Ordering::Relaxed)
                }
            };
        }
    }
}

/// Reads every ack back at its revision; returns the mismatches.
async fn verify_acks(endpoints: &[String], acks: &[Ack]) -> Vec<String> {
    let chunk = acks.len().div_ceil(CLIENTS).max(1);
    let mut tasks = Vec::new();
    for part in acks.chunks(chunk) {
        let part = part.to_vec();
        let endpoints = endpoints.to_vec();
        tasks.push(tokio::spawn(async move {
            let mut c = connect(&endpoints, Duration::from_secs(5)).await;
            let mut bad = Vec::new();
            for a in part {
                let opts = GetOptions::new().with_revision(a.revision);
                let mut attempt = 0;
                let got = loop {
                    attempt += 1;
                    match c.get(a.key.clone(), Some(opts.clone())).await {
                        Ok(r) => break Ok(r),
                        Err(e) if attempt >= 5 => break Err(e),
                        Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                    }
                };
                match got {
                    Ok(r) => match r.kvs().first() {
                        Some(kv)
                            if kv.value() == a.value.as_bytes()
                                && kv.mod_revision() == a.revision => {}
                        other => bad.push(format!(
                            "ack {a:?}: at its revision the key holds {:?}",
                            other.map(|kv| (
                                kv.value_str().unwrap_or("?").to_owned(),
                                kv.mod_revision()
                            ))
                        )),
                    },
                    Err(e) => bad.push(format!("ack {a:?}: read failed: {e}")),
                }
            }
            bad
        }));
    }
    let mut bad = Vec::new();
    for t in tasks {
        bad.extend(t.await.unwrap());
    }
    bad
}

/// Waits up to 30 s until a put through all endpoints succeeds, then reads
/// it linearizably through each member alone.
async fn serves_again(endpoints: &[String]) {
    let mut c = connect(endpoints, Duration::from_secs(2)).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let rev = loop {
        match c.put("after-heal", "v", None).await {
            Ok(r) => break r.header().unwrap().revision(),
            Err(e) => {
                assert!(Instant::now() < deadline, "no put after healing: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    for ep in endpoints {
        let mut one = connect(std::slice::from_ref(ep), Duration::from_secs(2)).await;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match one.get("after-heal", None).await {
                Ok(r) => {
                    assert_eq!(r.kvs().first().map(|kv| kv.mod_revision()), Some(rev));
                    break;
                }
                Err(e) => {
                    assert!(
                        Instant::now() < deadline,
                        "{ep} does not serve after healing: {e}"
                    );
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }
}

async fn run<C: Cluster + 'static>(name: &str, mut cluster: C) {
    let faults = Fault::all_supported_by(&mut cluster);
    let endpoints = cluster.endpoints();
    let config = NemesisConfig {
        faults: faults.clone(),
        // Tighter than the default, so ~15 s deal every fault.
        interval: (Duration::from_millis(500), Duration::from_millis(1500)),
        hold: (Duration::from_millis(500), Duration::from_secs(2)),
        ..NemesisConfig::default()
    };
    let epoch = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let acks: Arc<Mutex<Vec<Ack>>> = Arc::default();
    let counts: Arc<Counts> = Arc::default();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|id| {
            tokio::spawn(client_loop(
                id,
                endpoints.clone(),
                epoch,
                stop.clone(),
                acks.clone(),
                counts.clone(),
            ))
        })
        .collect();
    let nemesis = Nemesis::start(cluster, config, epoch);
    tokio::time::sleep(WORKLOAD).await;
    while faults.iter().any(|f| nemesis.injected(*f) == 0) && epoch.elapsed() < MAX_WORKLOAD {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let workload = epoch.elapsed();
    let (cluster, log) = nemesis.stop().await;
    println!("{name}: {log}");
    for i in 0..cluster.size() {
        assert!(
            cluster.is_running(i) && !cluster.is_paused(i),
            "{name}: member {i} not healed"
        );
    }

    let acks = acks.lock().unwrap().clone();
    let injected: Vec<(Fault, usize)> = faults.iter().map(|f| (*f, log.injected(*f))).collect();
    println!(
        "{name}: {} acked puts, {} failed or unknown; {} gets ok, {} failed; over {workload:?}; injected {injected:?}",
        acks.len(),
        counts.puts_failed.load(Ordering::Relaxed),
        counts.gets_ok.load(Ordering::Relaxed),
        counts.gets_failed.load(Ordering::Relaxed),
    );
    assert!(!acks.is_empty(), "{name}: no put acknowledged");

    // No two acks share a revision.
    let mut by_rev: HashMap<i64, &Ack> = HashMap::new();
    for a in &acks {
        if let Some(other) = by_rev.insert(a.revision, a) {
            panic!(
                "{name}: revision {} acknowledged twice: {other:?} and {a:?}; nemesis around: {:#?}",
                a.revision,
                log.around(a.at, Duration::from_secs(3))
            );
        }
    }

    // The healed cluster serves, through every member.
    serves_again(&endpoints).await;

    // Every ack is readable at its revision.
    let bad = verify_acks(&endpoints, &acks).await;
    assert!(
        bad.is_empty(),
        "{name}: {} of {} acks not readable at their revision, first: {}",
        bad.len(),
        acks.len(),
        bad[..bad.len().min(10)].join("\n")
    );

    for (f, n) in injected {
        assert!(n >= 1, "{name}: {f} never injected:\n{log}");
    }
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nemesis_injects_every_fault_into_metastore_and_etcd() {
    let metastore = ProcessCluster::start_with(ProcessClusterOptions { pd_proxies: true }).await;
    run("metastore", metastore).await;
    let etcd = EtcdCluster::start().await;
    run("etcd", etcd).await;
}
