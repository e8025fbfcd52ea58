//! Real processes judged by the history checker (linearizability per key +
//! etcd's revision rules + multi-key atomicity), clients speaking etcd's
//! protocol through the etcd-client crate and cancelling calls at random
//! points:
//! * a dev node with compare-and-swap chains from 16 clients;
//! * 3 PD members (behind proxies) and 3 nodes under the nemesis: kill -9
//!   and restart of a node, SIGSTOP/SIGCONT of the leader's node, leader
//!   transfers in a loop, kill -9 of the PD leader, a slow or stalled
//!   oracle;
//! * the same workload and the faults etcd can take against a real
//!   3-member etcd, where the checker must find nothing (calibration);
//! * a paused leader woken up with read-only txns queued for it.
//!
//! The first three runs also record watches through the same faults (one
//! per node of the workload's prefix, a sub-range and a single key, with
//! prev_kv, progress notifications and filters; resumed after breaks) and
//! check them against the history (`test_support::watch_recorder`:
//! ordered, unique, atomic, reliable, valid, bookmarkable, prev_kv,
//! filtered, resumable); against etcd, a calibration of that checker.
//!
//! Each run prints its seeds: `METASTORE_SEED=<seed>` replays the workload,
//! `NEMESIS_SEED=<seed>` the fault choices (timing still varies).

use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{GetOptions, Txn, TxnOp, TxnOpResponse};
use test_support::history::{self, RunConfig};
use test_support::{
    client, Claims, Cluster, EtcdCluster, EtcdExecutor, Fault, Nemesis, NemesisConfig, Node,
    ProcessCluster, ProcessClusterOptions,
};

/// The reproduction: CAS chains (`If mod_revision(k) == m Then
/// Put(k, v)`) from 16 clients, most calls with a deadline of 1–10 ms. A
/// cancelled call must not let its retry evaluate against a state that
/// misses the first write (the same version written twice).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dev_node_cas_chains_with_cancelling_clients() {
    let seed = history::seed("dev_node_cas_chains_with_cancelling_clients");
    let node = Node::start_dev_with(&[PROGRESS_NOTIFY_INTERVAL, "500ms"]);
    let executor = Arc::new(EtcdExecutor::connect(&[node.endpoint()], Claims::MetaStore).await);
    let mut cfg = RunConfig::cas_chains(seed, "cas", 60);
    cfg.duration = history::duration(Duration::from_secs(8));
    let (hist, watches) = history::run_watched(executor.clone(), &cfg).await;
    let report = history::check(executor.as_ref(), &hist, "dev_node_cas").await;
    println!("{report}");
    assert!(report.is_ok(), "seed {seed}:\n{report}");
    assert!(report.ok > 300, "too few operations completed: {report}");
    let watched = watches.check(&hist, "dev_node_cas").await;
    assert!(watched.is_ok(), "seed {seed}:\n{watched}");
}

/// MetaStore's flag for periodic progress notifications (to watches that
/// ask for them), set low so the recorded watches get some.
const PROGRESS_NOTIFY_INTERVAL: &str = "--experimental-watch-progress-notify-interval";

/// A workload under the nemesis with every fault `cluster` takes, MultiPuts
/// (one Txn over several keys) and RangeAlls (a prefix Range) mixed in,
/// watches recorded next to it; checks the history and the watches, that
/// enough multi-key operations completed and that every fault was
/// injected.
async fn under_nemesis<C: Cluster + 'static>(name: &str, cluster: C, claims: Claims) -> C {
    let seed = history::seed(name);
    let mut cluster = cluster;
    let faults = Fault::all_supported_by(&mut cluster);
    let executor = Arc::new(EtcdExecutor::connect(&cluster.endpoints(), claims).await);
    let epoch = Instant::now();
    let nemesis = Nemesis::start(
        cluster,
        NemesisConfig {
            faults: faults.clone(),
            seed: Some(seed),
            interval: (Duration::from_millis(500), Duration::from_millis(1500)),
            hold: (Duration::from_millis(500), Duration::from_secs(2)),
            ..NemesisConfig::default()
        },
        epoch,
    );
    let mut cfg = RunConfig::new(seed, name);
    cfg.workload = cfg.workload.with_multi_key(20, 15);
    cfg.clients = 12;
    cfg.duration = history::duration(Duration::from_secs(25));
    cfg.cancel_percent = 10;
    cfg.deadline = Duration::from_secs(5);
    let (hist, watches) = history::run_watched(executor.clone(), &cfg).await;
    let (cluster, log) = nemesis.stop().await;
    println!("{log}");
    cluster.leader_index().await;
    let report = history::check(executor.as_ref(), &hist, name).await;
    println!("{report}");
    assert!(
        report.is_ok(),
        "{name} seed {seed}:\n{report}\nfaults:\n{log}"
    );
    assert!(report.ok > 300, "too few operations completed: {report}");
    assert!(
        report.multi_puts > 50 && report.range_alls > 40,
        "too few multi-key operations completed: {report}"
    );
    let watched = watches.check(&hist, name).await;
    assert!(
        watched.is_ok(),
        "{name} seed {seed}:\n{watched}\nfaults:\n{log}"
    );
    for f in faults {
        assert!(log.injected(f) > 0, "{f} was never injected:\n{log}");
    }
    cluster
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metastore_cluster_under_nemesis() {
    let cluster = ProcessCluster::start_with(ProcessClusterOptions {
        pd_proxies: true,
        node_args: vec![PROGRESS_NOTIFY_INTERVAL.into(), "500ms".into()],
    })
    .await;
    under_nemesis("metastore_nemesis", cluster, Claims::MetaStore).await;
}

/// Calibration: the same workload and faults against etcd itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn etcd_cluster_under_nemesis() {
    let cluster = EtcdCluster::start().await;
    under_nemesis("etcd_nemesis", cluster, Claims::Etcd).await;
}

/// A leader paused with SIGSTOP while the others elect a new leader and
/// acknowledge a new value; read-only txns sent to the paused node wait in
/// its socket buffers. Once woken it still believes it leads; it must not
/// answer them from its stale state (before the fix: 5 of 25 did).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn paused_leader_answers_no_stale_read_only_txns() {
    let mut cluster = ProcessCluster::start().await;
    let endpoints = cluster.endpoints();
    let mut clients = Vec::new();
    for ep in &endpoints {
        clients.push(client(ep).await);
    }
    for round in 0..5 {
        let key = format!("paused/{round}");
        let leader = cluster.leader_index().await;
        let other = (leader + 1) % endpoints.len();
        clients[other].put(key.as_str(), "old", None).await.unwrap();
        // The leader has it too before it is paused.
        let got = clients[leader].get(key.as_str(), None).await.unwrap();
        assert_eq!(got.kvs()[0].value(), b"old");
        cluster.pause(leader);
        // The others elect a new leader and acknowledge a new value.
        let deadline = Instant::now() + Duration::from_secs(20);
        let acked = loop {
            match tokio::time::timeout(
                Duration::from_secs(2),
                clients[other].put(key.as_str(), "new", None),
            )
            .await
            {
                Ok(Ok(r)) => break r.header().map_or(0, |h| h.revision()),
                _ => assert!(Instant::now() < deadline, "no new leader took the write"),
            }
        };
        // Read-only txns queued for the paused node.
        let mut reads = Vec::new();
        for _ in 0..5 {
            let mut c = clients[leader].clone();
            let key = key.clone();
            reads.push(tokio::spawn(async move {
                let txn = Txn::new().and_then([TxnOp::get(key, Some(GetOptions::new()))]);
                tokio::time::timeout(Duration::from_secs(15), c.txn(txn)).await
            }));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        cluster.resume(leader);
        for r in reads {
            let Ok(Ok(resp)) = r.await.unwrap() else {
                continue; // an error is fine, a stale answer is not
            };
            let rev = resp.header().map_or(0, |h| h.revision());
            let value = match resp.op_responses().first() {
                Some(TxnOpResponse::Get(g)) => g.kvs().first().map(|kv| kv.value().to_vec()),
                _ => None,
            };
            assert_eq!(
                value.as_deref(),
                Some(&b"new"[..]),
                "round {round}: a read-only txn through the woken old leader answered \
                 {value:?} at revision {rev}, after \"new\" was acknowledged at {acked}"
            );
            assert!(
                rev >= acked,
                "round {round}: header revision {rev} < {acked}"
            );
        }
        cluster.leader_index().await;
    }
}
