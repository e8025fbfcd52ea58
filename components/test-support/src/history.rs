//! Running a seeded workload against a store and checking its history.
//!
//! An [`Executor`] carries the checker's requests — single-key ones, and
//! MultiPut (one Txn without compares) and RangeAll (a prefix Range) — to
//! one store (real processes over the etcd-client crate, or in-process
//! routers) and classifies every answer as the checker needs it: `Ok` with
//! the response, `Failed` only when the request certainly did not apply,
//! `Unknown` otherwise. [`run`] drives `clients` concurrent clients, each issuing the
//! [`checker::Generator`]'s next request to an endpoint of its choice with
//! a deadline — a fraction of calls get a deadline of a few milliseconds,
//! so they are cancelled at random points and their outcome is unknown —
//! and records everything with a [`checker::Recorder`]. [`check`] then
//! re-reads what the checker asks for (historical reads, once nothing is in
//! flight) and runs both checks; a failing report comes with the history
//! written to a JSON file for replay. [`run_watched`] records watches next
//! to the run (`crate::watch_recorder`), checked against the same history
//! by [`WatchRecorder::check`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use checker::{
    Config, Generator, History, Outcome, Recorder, Report, Request, RereadResult, Rereads,
    WorkloadConfig,
};
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::watch_recorder::{WatchRecorder, WatchSource};

/// Carries checker requests to a store.
#[async_trait::async_trait]
pub trait Executor: Send + Sync {
    /// How many endpoints (nodes) requests can be sent to.
    fn endpoints(&self) -> usize;

    /// A short name of endpoint `i` for reports.
    fn endpoint_name(&self, i: usize) -> String {
        format!("n{}", i + 1)
    }

    /// Runs `req` through endpoint `endpoint`, giving up after `deadline`
    /// (the call is then dropped mid-flight: a cancellation, outcome
    /// unknown).
    async fn execute(&self, endpoint: usize, req: &Request, deadline: Duration) -> Outcome;

    /// Reads `key` as of `revision` (a historical Range) for the checker's
    /// re-reads, trying every endpoint until one answers.
    async fn reread(&self, key: &[u8], revision: i64) -> Result<RereadResult, String>;
}

/// Shape of a run.
#[derive(Clone, Debug)]
pub struct RunConfig {
    pub seed: u64,
    pub clients: usize,
    pub duration: Duration,
    pub workload: WorkloadConfig,
    /// Percentage of calls sent with a deadline of `short_deadline`
    /// (cancelled at a random point); the others get `deadline`.
    pub cancel_percent: u32,
    pub short_deadline: (Duration, Duration),
    pub deadline: Duration,
}

impl RunConfig {
    /// The default mix of `checker::WorkloadConfig` over keys under
    /// `prefix/`, from 8 clients for 10 s, 10 % of the calls cancelled.
    pub fn new(seed: u64, prefix: &str) -> RunConfig {
        RunConfig {
            seed,
            clients: 8,
            duration: Duration::from_secs(10),
            workload: WorkloadConfig {
                key_prefix: format!("{prefix}/"),
                ..WorkloadConfig::default()
            },
            cancel_percent: 10,
            short_deadline: (Duration::from_millis(1), Duration::from_millis(10)),
            deadline: Duration::from_secs(8),
        }
    }

    /// Compare-and-swap chains (the shape Kubernetes uses) from 16 clients
    /// on two hot keys, `cancel_percent` % of the calls cancelled after
    /// 1–10 ms, with some puts, gets, read-only txns and deletes mixed in.
    pub fn cas_chains(seed: u64, prefix: &str, cancel_percent: u32) -> RunConfig {
        let mut cfg = RunConfig::new(seed, prefix);
        cfg.clients = 16;
        cfg.cancel_percent = cancel_percent;
        cfg.workload.keys = 2;
        cfg.workload.put = 5;
        cfg.workload.get_linearizable = 10;
        cfg.workload.get_serializable = 5;
        cfg.workload.read_only_txn = 5;
        cfg.workload.cas = 70;
        cfg.workload.delete = 5;
        cfg
    }
}

/// Runs the workload until `cfg.duration` has passed; returns the history.
pub async fn run(executor: Arc<dyn Executor>, cfg: &RunConfig) -> History {
    let recorder = Recorder::new(Instant::now());
    let generator = Arc::new(Mutex::new(Generator::new(cfg.seed, cfg.workload.clone())));
    let stop = Instant::now() + cfg.duration;
    let mut tasks = Vec::new();
    for client in 0..cfg.clients {
        let executor = executor.clone();
        let recorder = recorder.clone();
        let generator = generator.clone();
        let cfg = cfg.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(cfg.seed ^ (client as u64).wrapping_mul(0x9E37));
            let n = executor.endpoints();
            let mut endpoint = client % n;
            while Instant::now() < stop {
                let req = generator.lock().next(client);
                let deadline = if rng.gen_range(0..100) < cfg.cancel_percent {
                    rng.gen_range(cfg.short_deadline.0..=cfg.short_deadline.1)
                } else {
                    cfg.deadline
                };
                let pending =
                    recorder.invoke(client, executor.endpoint_name(endpoint), req.clone());
                let outcome = executor.execute(endpoint, &req, deadline).await;
                generator.lock().observe(client, &req, &outcome);
                let failed = !matches!(outcome, Outcome::Ok(_));
                pending.complete(outcome);
                // Mostly sticky, as real clients are; move on after a
                // failure (the node may be down) and now and then anyway.
                if failed || rng.gen_range(0..10) == 0 {
                    endpoint = rng.gen_range(0..n);
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    recorder.into_history()
}

/// [`run`] with watches recorded next to it: the watchers of
/// `crate::watch_recorder` are open before the workload starts and keep
/// recording (through the faults) until [`WatchRecorder::check`], which is
/// to be called once nothing is in flight and the faults are healed.
pub async fn run_watched<E>(executor: Arc<E>, cfg: &RunConfig) -> (History, WatchRecorder)
where
    E: Executor + WatchSource + 'static,
{
    let watches = WatchRecorder::start(executor.clone(), &cfg.workload.key_prefix).await;
    let history = run(executor, cfg).await;
    (history, watches)
}

/// Re-reads what the checker needs (once nothing is in flight) and checks
/// `history`. On failure the history is written as JSON to the system's
/// temp dir and the path printed.
pub async fn check(executor: &dyn Executor, history: &History, name: &str) -> Report {
    let plan = checker::reread_plan(history);
    let mut rereads: Rereads = HashMap::new();
    for (key, revision) in plan {
        if rereads.contains_key(&(key.clone(), revision)) {
            continue;
        }
        // The cluster may still be electing a leader after the last fault.
        let deadline = Instant::now() + Duration::from_secs(60);
        let result = loop {
            match executor.reread(&key, revision).await {
                Ok(r) => break r,
                Err(e) if Instant::now() < deadline => {
                    eprintln!(
                        "re-read of {} at {revision} failed, retrying: {e}",
                        checker::history::show(&key)
                    );
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!(
                    "re-read of {} at {revision}: {e}",
                    checker::history::show(&key)
                ),
            }
        };
        rereads.insert((key, revision), result);
    }
    let report = checker::check(history, &rereads, &Config::default())
        .unwrap_or_else(|e| panic!("{name}: history rejected: {e}"));
    if !report.is_ok() {
        let path = std::env::temp_dir().join(format!(
            "metastore-history-{name}-{}.json",
            std::process::id()
        ));
        match history.to_json() {
            Ok(json) => {
                let _ = std::fs::write(&path, json);
                eprintln!("{name}: history written to {}", path.display());
            }
            Err(e) => eprintln!("{name}: cannot serialize history: {e}"),
        }
    }
    report
}

/// How long a workload runs: `METASTORE_HISTORY_SECS` if set (the soak
/// sets it), else `default` (what CI runs).
pub fn duration(default: Duration) -> Duration {
    std::env::var("METASTORE_HISTORY_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(default, Duration::from_secs)
}

/// A seed from `METASTORE_SEED` (to replay a failure) or drawn now; printed
/// either way.
pub fn seed(test: &str) -> u64 {
    let seed = std::env::var("METASTORE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().gen());
    eprintln!("{test}: seed {seed} (replay with METASTORE_SEED={seed})");
    seed
}
