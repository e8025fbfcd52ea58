//! The router's write and read protocols under faults, judged by the
//! history checker (linearizability per key + etcd's revision rules +
//! multi-key atomicity): whole node storage stacks in process
//! (`test_support::RouterCluster`), clients that cancel calls at random
//! points, and a fault driver. The fault runs mix in MultiPuts (one Txn
//! over several keys) and RangeAlls (a Range over all the workload's
//! keys); where region boundaries fall between the keys (the split and
//! merge runs) those are two-phase commits and multi-region reads.
//!
//! Every run also records watches (one per node of the workload's prefix,
//! a sub-range and a single key; resumed after breaks) through the same
//! faults, and checks them against the history
//! (`test_support::watch_recorder`: ordered, unique, atomic, reliable,
//! valid, bookmarkable, prev_kv, resumable).
//!
//! Each run prints its seed; `METASTORE_SEED=<seed>` replays the same
//! workload and fault choices (timing still varies).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use checker::History;
use proto::metapb;
use raftstore::StoreOptions;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use test_support::history::{self, RunConfig};
use test_support::{
    OracleFault, RaftFault, RaftNemesis, RaftNemesisConfig, RouterCluster, RouterExecutor,
    WatchRecorder,
};

/// One node, compare-and-swap chains from 16 clients, 40 % of calls
/// cancelled after 1–10 ms, a slow oracle (so many calls are cancelled
/// while their write waits for its revision). A cancelled call must not
/// release its write's latches early: a retried CAS would then evaluate
/// against a state without the first one and both would apply — the same
/// version written twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cas_chains_with_cancelling_clients() {
    let seed = history::seed("cas_chains_with_cancelling_clients");
    let cluster = RouterCluster::new(1).await;
    cluster.leader().await;
    cluster
        .oracle(1)
        .set_fault(OracleFault::Slow(Duration::from_millis(4)));
    let mut cfg = RunConfig::cas_chains(seed, "cas", 40);
    cfg.duration = history::duration(Duration::from_secs(6));
    cfg.deadline = Duration::from_secs(5);
    let executor = Arc::new(RouterExecutor::new(cluster.clone()));
    let (hist, watches) = history::run_watched(executor.clone(), &cfg).await;
    cluster.oracle(1).set_fault(OracleFault::None);
    let report = history::check(executor.as_ref(), &hist, "cas_chains").await;
    println!("{report}");
    assert!(report.is_ok(), "seed {seed}:\n{report}");
    assert!(report.ok > 300, "too few operations completed: {report}");
    let watched = watches.check(&hist, "cas_chains").await;
    assert!(watched.is_ok(), "seed {seed}:\n{watched}");
}

/// Three nodes; the raft network partitions the leader or another node,
/// loses, delays and duplicates messages, restarts nodes; leadership is
/// moved around; each node's oracle is now and then slow or stalled;
/// forwarded requests sometimes lose their reply; clients cancel calls;
/// MultiPuts and RangeAlls are mixed in (one region: they must still be
/// atomic).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_under_faults() {
    let seed = history::seed("three_nodes_under_faults");
    let cluster = RouterCluster::new(3).await;
    cluster.leader().await;
    cluster.set_lose_reply_percent(3);
    let epoch = Instant::now();
    let nemesis = every_raft_fault(
        &cluster,
        seed,
        (Duration::from_millis(500), Duration::from_millis(1500)),
        (Duration::from_millis(500), Duration::from_millis(2000)),
        epoch,
    );
    let run_for = history::duration(Duration::from_secs(20));
    let stop = Instant::now() + run_for;
    let chaos = tokio::spawn({
        let cluster = cluster.clone();
        async move {
            let mut rng = StdRng::seed_from_u64(seed.wrapping_add(1));
            while Instant::now() < stop {
                tokio::time::sleep(Duration::from_millis(rng.gen_range(300..1200))).await;
                let node = rng.gen_range(1..=3);
                match rng.gen_range(0..4) {
                    0 => cluster.transfer_leader(node).await,
                    1 => cluster
                        .oracle(node)
                        .set_fault(OracleFault::Slow(Duration::from_millis(30))),
                    2 => cluster
                        .oracle(node)
                        .set_fault(OracleFault::Stall(Duration::from_millis(1500))),
                    _ => {
                        cluster.clear_oracle_faults();
                    }
                }
            }
            cluster.clear_oracle_faults();
        }
    });
    let mut cfg = RunConfig::new(seed, "faults");
    cfg.workload = cfg.workload.with_multi_key(MULTI_PUT, RANGE_ALL);
    cfg.clients = 12;
    cfg.duration = run_for;
    cfg.cancel_percent = 15;
    cfg.deadline = Duration::from_secs(5);
    let executor = Arc::new(RouterExecutor::new(cluster.clone()));
    let (hist, watches) = history::run_watched(executor.clone(), &cfg).await;
    let _ = chaos.await;
    judge(
        &cluster,
        nemesis,
        &executor,
        &hist,
        watches,
        "three_nodes",
        seed,
    )
    .await;
}

/// Weights of MultiPut and RangeAll in the runs that mix them in (the
/// single-key kinds weigh 100 together).
const MULTI_PUT: u32 = 20;
const RANGE_ALL: u32 = 15;
/// The weights in the split and merge runs, where MultiPuts are two-phase
/// commits over several regions and RangeAlls reads over several regions.
/// Here they found a MultiPut committed on its primary region and never on
/// a merge target (a lock planned for a region that merged away was taken
/// in the merge target, which was the next participant too), and a
/// read-only Txn over several regions answering a state older than its
/// revision (its locks rolled back by the resolver while it was slow).
const LAYOUT_MULTI_KEY: (u32, u32) = (8, 8);

/// Three nodes whose replicas keep only 16 applied log entries, under the
/// faults above: a follower cut off or restarted for more than a few
/// writes catches up by region snapshot while the workload goes on, so
/// snapshots are generated, sent (lost, delayed, duplicated), and
/// installed in many small batches while that node serves reads. An install must
/// lose no write and no read may see a half-installed region.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn snapshots_under_load_and_faults() {
    let seed = history::seed("snapshots_under_load_and_faults");
    let options = StoreOptions {
        log_gc_threshold: 16,
        // Every install in several batches.
        install_batch_bytes: 256,
        ..StoreOptions::default()
    };
    let cluster = RouterCluster::with_options(3, options).await;
    cluster.leader().await;
    let epoch = Instant::now();
    let nemesis = every_raft_fault(
        &cluster,
        seed,
        (Duration::from_millis(500), Duration::from_millis(1500)),
        (Duration::from_millis(500), Duration::from_millis(2000)),
        epoch,
    );
    let mut cfg = RunConfig::new(seed, "snap");
    cfg.clients = 12;
    cfg.duration = history::duration(Duration::from_secs(15));
    cfg.cancel_percent = 15;
    cfg.deadline = Duration::from_secs(5);
    let executor = Arc::new(RouterExecutor::new(cluster.clone()));
    let (hist, watches) = history::run_watched(executor.clone(), &cfg).await;
    judge(
        &cluster,
        nemesis,
        &executor,
        &hist,
        watches,
        "snapshots",
        seed,
    )
    .await;
    let delivered = cluster.raft().router.snapshots_delivered();
    println!("region snapshots delivered: {delivered}");
    assert!(delivered > 0, "no follower caught up by snapshot");
}

/// Three nodes, the faults above, and the region split again and again
/// under the workload: each hot key ends up in a region of its own, while
/// leadership moves region by region and the oracle is now and then slow
/// (writes wait in the sequencer while a split is proposed). Splits must lose no write, let no
/// write apply in two regions or skip its latches, and keep every read at
/// one revision.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn splits_under_load_and_faults() {
    let seed = history::seed("splits_under_load_and_faults");
    let (cluster, splits) = with_layout_changes(
        seed,
        "split",
        LAYOUT_MULTI_KEY,
        0,
        |cluster, keys, mut rng, stop| async move {
            let mut splits = 0;
            let mut refused: BTreeMap<String, usize> = BTreeMap::new();
            while Instant::now() < stop {
                tokio::time::sleep(Duration::from_millis(rng.gen_range(200..800))).await;
                match rng.gen_range(0..10) {
                    0..=5 => {
                        let key = &keys[rng.gen_range(0..keys.len())];
                        let done = retry_while_locked(&mut refused, || cluster.split(key)).await;
                        splits += usize::from(done);
                    }
                    6 | 7 => cluster.transfer_all_leaders(rng.gen_range(1..=3)).await,
                    // A slow oracle keeps writes waiting in the sequencer
                    // while a split is proposed.
                    8 => {
                        for id in 1..=3 {
                            let delay = Duration::from_millis(rng.gen_range(5..40));
                            cluster.oracle(id).set_fault(OracleFault::Slow(delay));
                        }
                    }
                    _ => {
                        cluster.clear_oracle_faults();
                    }
                }
            }
            cluster.clear_oracle_faults();
            println!("splits refused: {refused:?}");
            splits
        },
    )
    .await;
    drop(cluster);
    println!("{splits} splits");
    assert!(splits >= 2, "only {splits} splits");
}

/// Three nodes, the faults above, and regions split and merged again and
/// again under the workload (a merge freezes its source region, which
/// then hands its keys to its right neighbour, or is rolled back when that
/// does not happen in time), while leadership moves. Merges must lose no
/// write, let no write apply to a frozen region or in two regions, and
/// keep every read at one revision.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn merges_under_load_and_faults() {
    let seed = history::seed("merges_under_load_and_faults");
    // Region 1 (the first) is never a source: the harness waits for its
    // leader, and the boundaries merged at are the workload's keys 1...
    let (cluster, (splits, merges)) = with_layout_changes(
        seed,
        "merge",
        LAYOUT_MULTI_KEY,
        0,
        |cluster, keys, mut rng, stop| async move {
            let (mut splits, mut merges) = (0, 0);
            let mut refused: BTreeMap<String, usize> = BTreeMap::new();
            while Instant::now() < stop {
                tokio::time::sleep(Duration::from_millis(rng.gen_range(200..600))).await;
                if rng.gen_range(0..10) >= 8 {
                    cluster.transfer_all_leaders(rng.gen_range(1..=3)).await;
                    continue;
                }
                // Merge at a boundary or split where there is none, half
                // and half while both exist.
                let starts = led_region_starts(&cluster);
                let (bounds, inner): (Vec<&Vec<u8>>, Vec<&Vec<u8>>) =
                    keys.iter().partition(|k| starts.contains(*k));
                let merge = !bounds.is_empty() && (inner.is_empty() || rng.gen_bool(0.5));
                if merge {
                    let key = bounds[rng.gen_range(0..bounds.len())];
                    let done = retry_while_locked(&mut refused, || cluster.merge(key)).await;
                    merges += usize::from(done);
                } else {
                    let key = inner[rng.gen_range(0..inner.len())];
                    let done = retry_while_locked(&mut refused, || cluster.split(key)).await;
                    splits += usize::from(done);
                }
            }
            println!("layout changes refused: {refused:?}");
            (splits, merges)
        },
    )
    .await;
    let (mut committed, mut rolled_back) = (0, 0);
    for id in cluster.ids() {
        if let Some(router) = cluster.router(id) {
            committed += router.merge_counts().committed;
            rolled_back += router.merge_counts().rolled_back;
        }
    }
    println!(
        "{splits} splits; {merges} merges prepared, {committed} committed, \
         {rolled_back} rolled back"
    );
    assert!(merges >= 2, "only {merges} merges prepared");
}

/// Replicas move between four nodes (a learner added, caught up and
/// promoted, then the old replica removed — as PD's balance does) while
/// regions split, leaders move, and the workload and every raft fault go
/// on; the history must hold. Clients talk to every node, including ones
/// that hold no replica of a region (they forward).
///
/// It found replicas removed while cut off that campaigned for ever and
/// kept their node routing reads to them, and a replica that missed the
/// membership changes adding a new voter, which then led, dropping every
/// message from that leader (both fixed in raftstore's `message`); reads
/// through a removed replica's handle answering from data being deleted,
/// or from the state of a newer replica of the region on the node (fixed
/// in `RegionHandle::read_state`); one lock the resolver could not reach
/// holding up every other (fixed in the resolver); a replica started as
/// its node stopped, whose thread kept the engines open (fixed in
/// `Store::shutdown`); and, in the harness, calls into a stopped node's
/// router that kept its store open (they now end with the node).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replica_moves_under_load_and_faults() {
    let seed = history::seed("replica_moves_under_load_and_faults");
    let (cluster, (splits, moves)) = with_layout_changes(
        seed,
        "move",
        // Four nodes on the same cores do less per second: more of the
        // workload is multi-key, for the checker to have enough of them.
        (12, 12),
        1,
        |cluster, keys, mut rng, stop| async move {
            let (mut splits, mut moves) = (0, 0);
            let mut refused: BTreeMap<String, usize> = BTreeMap::new();
            while Instant::now() < stop {
                tokio::time::sleep(Duration::from_millis(rng.gen_range(200..600))).await;
                let regions = led_regions(&cluster);
                match rng.gen_range(0..10) {
                    0..=2 => {
                        let inner: Vec<&Vec<u8>> = keys
                            .iter()
                            .filter(|k| !regions.iter().any(|r| &r.start_key == *k))
                            .collect();
                        if inner.is_empty() {
                            continue;
                        }
                        let key = inner[rng.gen_range(0..inner.len())];
                        let done = retry_while_locked(&mut refused, || cluster.split(key)).await;
                        splits += usize::from(done);
                    }
                    3..=7 if !regions.is_empty() => {
                        let region = &regions[rng.gen_range(0..regions.len())];
                        let held: Vec<u64> = region.peers.iter().map(|p| p.node_id).collect();
                        let free: Vec<u64> = cluster
                            .ids()
                            .into_iter()
                            .filter(|n| !held.contains(n))
                            .collect();
                        if free.is_empty() {
                            continue;
                        }
                        let from = held[rng.gen_range(0..held.len())];
                        let to = free[rng.gen_range(0..free.len())];
                        match cluster.move_replica(region.id, from, to).await {
                            Ok(()) => moves += 1,
                            Err(e) => *refused.entry(e).or_default() += 1,
                        }
                    }
                    _ => cluster.transfer_all_leaders(rng.gen_range(1..=4)).await,
                }
            }
            println!("layout changes refused: {refused:?}");
            (splits, moves)
        },
    )
    .await;
    drop(cluster);
    println!("{splits} splits, {moves} replica moves");
    assert!(moves >= 2, "only {moves} replica moves");
}

/// The regions some running node leads.
fn led_regions(cluster: &RouterCluster) -> Vec<metapb::Region> {
    cluster
        .ids()
        .into_iter()
        .filter_map(|id| cluster.router(id))
        .flat_map(|router| router.store().regions())
        .map(|h| h.status())
        .filter(|s| s.ready_leader)
        .map(|s| s.region)
        .collect()
}

/// The start keys of the regions some running node leads.
fn led_region_starts(cluster: &RouterCluster) -> BTreeSet<Vec<u8>> {
    led_regions(cluster)
        .into_iter()
        .map(|r| r.start_key)
        .collect()
}

/// Runs `change` until it succeeds (true) or fails for another reason than
/// a transaction's locks (a region holding them refuses to split or merge;
/// the MultiPuts of the workload take them), at most 40 times 50 ms apart;
/// counts the refusals by reason in `refused`.
async fn retry_while_locked<F, Fut>(refused: &mut BTreeMap<String, usize>, change: F) -> bool
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    for _ in 0..40 {
        match change().await {
            Ok(()) => return true,
            Err(e) => {
                let locked =
                    e.contains("transactions in progress") || e.contains("locked by transaction");
                *refused.entry(e).or_default() += 1;
                if !locked {
                    return false;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    false
}

/// Runs the checker's workload on six keys (`<prefix>/0` ...), MultiPuts
/// and RangeAlls mixed in with the weights given, over three nodes holding
/// region 1 (and `spare` more holding nothing) for 15 s under every raft
/// fault, while `chaos(cluster, the keys 1.. as region boundaries, rng,
/// stop)` changes the region layout, then judges the history; returns the
/// cluster and what `chaos` returned.
async fn with_layout_changes<T, F, Fut>(
    seed: u64,
    prefix: &str,
    (multi_put, range_all): (u32, u32),
    spare: u64,
    chaos: F,
) -> (Arc<RouterCluster>, T)
where
    T: Send + Default + 'static,
    F: FnOnce(Arc<RouterCluster>, Vec<Vec<u8>>, StdRng, Instant) -> Fut,
    Fut: std::future::Future<Output = T> + Send + 'static,
{
    let cluster = RouterCluster::with_spare(3, spare, StoreOptions::default()).await;
    cluster.leader().await;
    let epoch = Instant::now();
    let nemesis = every_raft_fault(
        &cluster,
        seed,
        (Duration::from_millis(800), Duration::from_millis(2000)),
        (Duration::from_millis(300), Duration::from_millis(1500)),
        epoch,
    );
    let run_for = history::duration(Duration::from_secs(15));
    let mut cfg = RunConfig::new(seed, prefix);
    cfg.workload.keys = 6;
    cfg.workload = cfg.workload.with_multi_key(multi_put, range_all);
    let boundaries: Vec<Vec<u8>> = (1..cfg.workload.keys)
        .map(|i| format!("{prefix}/{i}").into_bytes())
        .collect();
    let rng = StdRng::seed_from_u64(seed.wrapping_add(2));
    let chaos = tokio::spawn(chaos(
        cluster.clone(),
        boundaries,
        rng,
        Instant::now() + run_for,
    ));
    cfg.clients = 12;
    cfg.duration = run_for;
    cfg.cancel_percent = 15;
    cfg.deadline = Duration::from_secs(5);
    let executor = Arc::new(RouterExecutor::new(cluster.clone()));
    let (hist, watches) = history::run_watched(executor.clone(), &cfg).await;
    let outcome = chaos.await.unwrap_or_default();
    judge(&cluster, nemesis, &executor, &hist, watches, prefix, seed).await;
    (cluster, outcome)
}

/// Every raft fault, one every `interval`, each held for `hold`.
fn every_raft_fault(
    cluster: &RouterCluster,
    seed: u64,
    interval: (Duration, Duration),
    hold: (Duration, Duration),
    epoch: Instant,
) -> RaftNemesis {
    RaftNemesis::start(
        cluster.raft().clone(),
        RaftNemesisConfig {
            faults: RaftFault::ALL.to_vec(),
            seed: Some(seed),
            interval,
            hold,
            ..RaftNemesisConfig::default()
        },
        epoch,
    )
}

/// Ends the faults, waits for a leader and checks the history and the
/// watches recorded next to it: no violation, and enough operations done
/// to mean something.
async fn judge(
    cluster: &RouterCluster,
    nemesis: RaftNemesis,
    executor: &RouterExecutor,
    hist: &History,
    watches: WatchRecorder,
    name: &str,
    seed: u64,
) {
    // Bounded, so a hang fails the test and says where.
    let bound = Duration::from_secs(120);
    let log = tokio::time::timeout(bound, nemesis.stop())
        .await
        .unwrap_or_else(|_| panic!("seed {seed}: the nemesis did not stop"));
    println!("{log}");
    cluster.leader().await;
    let report = tokio::time::timeout(bound * 2, history::check(executor, hist, name))
        .await
        .unwrap_or_else(|_| panic!("seed {seed}: checking the history did not end"));
    println!("{report}");
    assert!(report.is_ok(), "seed {seed}:\n{report}\nfaults:\n{log}");
    assert!(report.ok > 300, "too few operations completed: {report}");
    if hist
        .ops
        .iter()
        .any(|op| matches!(op.request, checker::Request::MultiPut { .. }))
    {
        assert!(
            report.multi_puts > 50 && report.range_alls > 40,
            "too few multi-key operations completed: {report}"
        );
    }
    let watched = tokio::time::timeout(bound, watches.check(hist, name))
        .await
        .unwrap_or_else(|_| panic!("seed {seed}: checking the watches did not end"));
    assert!(watched.is_ok(), "seed {seed}:\n{watched}\nfaults:\n{log}");
}
