//! Fault drivers ("nemesis", as in Jepsen) that inject faults in the
//! background while a test runs a workload: [`Nemesis`] for a process
//! [`Cluster`] (MetaStore or etcd), [`RaftNemesis`] for the in-process
//! [`raft_cluster::Cluster`].
//!
//! Contracts (both drivers):
//! - A driver runs on its own thread with its own small runtime, so
//!   blocking steps (a restart waiting for its port, a store closing its
//!   engines) never stall the workload's runtime. `stop` leaves the cluster
//!   healed: for [`Nemesis`], every member (and PD member) running and
//!   resumed and every PD proxy passing, and the cluster is handed back;
//!   for [`RaftNemesis`], every node running and no filter left.
//! - Faults run one at a time: wait a random gap from the config's
//!   `interval`, inject, hold for a random time from its `hold` (for
//!   [`Fault::PauseLeader`], `pause_hold`), heal. Enabled faults are dealt
//!   from a shuffled deck, so each is injected once before any is injected
//!   twice. A stop request cuts the current gap or hold short; the fault in
//!   progress is still healed.
//! - Choices come from `StdRng::seed_from_u64(seed)`; the seed is printed
//!   and kept in the log (`NEMESIS_SEED` overrides a config without one).
//!   Timing, and so what the cluster does, is not reproducible: only the
//!   sequence of choices is.
//! - Every action is printed at once and recorded with its time since the
//!   workload's start (the `epoch` given to `start`), so a checker's
//!   violation can be matched to the faults around it
//!   ([`NemesisLog::around`]).
//! - A panic in a driver (a member that cannot be restarted) is raised
//!   again by `stop`; a [`Nemesis`]'s cluster is then dropped, which kills
//!   its processes.

use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use tokio::sync::watch;

use crate::cluster::Cluster;
use crate::proxy::ProxyMode;
use crate::raft_cluster::{self, Delay, Duplicate, Loss};

/// A fault [`Nemesis`] injects into a process cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Fault {
    /// kill -9 of the leader's node (half of the time) or of a random node;
    /// restarted with its data after the hold.
    Kill,
    /// SIGSTOP of the leader's node for longer than an election timeout,
    /// then SIGCONT: the old leader wakes up believing it still leads.
    PauseLeader,
    /// Maintenance.MoveLeader to a random other member, again and again
    /// for the hold.
    MoveLeader,
    /// kill -9 of the PD leader, restarted after the hold (MetaStore only).
    KillPdLeader,
    /// All PD proxies delay every chunk (by `pd_delay`) or stall for the
    /// hold: the revision oracle is slow or stuck (MetaStore started with
    /// `pd_proxies` only).
    SlowPd,
}

impl Fault {
    pub const ALL: [Fault; 5] = [
        Fault::Kill,
        Fault::PauseLeader,
        Fault::MoveLeader,
        Fault::KillPdLeader,
        Fault::SlowPd,
    ];

    /// Whether `cluster` can take this fault.
    pub fn supported_by<C: Cluster + ?Sized>(self, cluster: &mut C) -> bool {
        match self {
            Fault::Kill | Fault::PauseLeader | Fault::MoveLeader => true,
            Fault::KillPdLeader => cluster.placement_driver().is_some(),
            Fault::SlowPd => cluster
                .placement_driver()
                .is_some_and(|pd| pd.has_pd_proxies()),
        }
    }

    /// Every fault `cluster` can take.
    pub fn all_supported_by<C: Cluster + ?Sized>(cluster: &mut C) -> Vec<Fault> {
        Fault::ALL
            .into_iter()
            .filter(|f| f.supported_by(cluster))
            .collect()
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Fault::Kill => "kill",
            Fault::PauseLeader => "pause-leader",
            Fault::MoveLeader => "move-leader",
            Fault::KillPdLeader => "kill-pd-leader",
            Fault::SlowPd => "slow-pd",
        })
    }
}

/// What [`Nemesis`] does and when; see [`NemesisConfig::default`].
#[derive(Clone, Debug)]
pub struct NemesisConfig {
    pub faults: Vec<Fault>,
    /// `None`: `$NEMESIS_SEED` if set, else a random seed.
    pub seed: Option<u64>,
    /// Gap before each fault, uniform in the range.
    pub interval: (Duration, Duration),
    /// How long a fault lasts, uniform in the range.
    pub hold: (Duration, Duration),
    /// How long [`Fault::PauseLeader`] lasts; its minimum should exceed the
    /// largest (randomized) election timeout, 2 s for MetaStore and for
    /// etcd's defaults.
    pub pause_hold: (Duration, Duration),
    /// Per-chunk delay of [`Fault::SlowPd`] when it slows rather than
    /// stalls.
    pub pd_delay: (Duration, Duration),
}

impl Default for NemesisConfig {
    /// Every fault; a fault every 1–3 s, held 0.5–3 s; pauses 2.5–4 s; PD
    /// delays 100–500 ms.
    fn default() -> Self {
        NemesisConfig {
            faults: Fault::ALL.to_vec(),
            seed: None,
            interval: (Duration::from_secs(1), Duration::from_secs(3)),
            hold: (Duration::from_millis(500), Duration::from_secs(3)),
            pause_hold: (Duration::from_millis(2500), Duration::from_secs(4)),
            pd_delay: (Duration::from_millis(100), Duration::from_millis(500)),
        }
    }
}

/// Whether a log entry starts a fault, ends one, or only reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    Inject,
    Heal,
    Note,
}

/// One action of a nemesis.
#[derive(Clone, Debug)]
pub struct NemesisEvent<F = Fault> {
    /// Since the workload's start.
    pub at: Duration,
    /// `None` for the driver's own start and end.
    pub fault: Option<F>,
    pub step: Step,
    pub what: String,
}

impl<F: fmt::Display> fmt::Display for NemesisEvent<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let fault = self
            .fault
            .as_ref()
            .map_or("nemesis".to_owned(), ToString::to_string);
        let step = match self.step {
            Step::Inject => "inject",
            Step::Heal => "heal",
            Step::Note => "note",
        };
        write!(
            f,
            "[{:>8.3}s] {fault} {step}: {}",
            self.at.as_secs_f64(),
            self.what
        )
    }
}

/// Everything a nemesis did, in order.
#[derive(Clone, Debug)]
pub struct NemesisLog<F = Fault> {
    pub seed: u64,
    pub events: Vec<NemesisEvent<F>>,
}

impl<F: PartialEq> NemesisLog<F> {
    /// How many times `fault` was injected.
    pub fn injected(&self, fault: F) -> usize {
        count_injected(&self.events, &fault)
    }

    /// The events within `window` of `at` (e.g. a checker's violation).
    pub fn around(&self, at: Duration, window: Duration) -> Vec<&NemesisEvent<F>> {
        self.events
            .iter()
            .filter(|e| e.at + window >= at && e.at <= at + window)
            .collect()
    }
}

impl<F: fmt::Display> fmt::Display for NemesisLog<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "nemesis seed {}", self.seed)?;
        for e in &self.events {
            writeln!(f, "{e}")?;
        }
        Ok(())
    }
}

fn count_injected<F: PartialEq>(events: &[NemesisEvent<F>], fault: &F) -> usize {
    events
        .iter()
        .filter(|e| e.fault.as_ref() == Some(fault) && e.step == Step::Inject)
        .count()
}

/// The configured seed, else `$NEMESIS_SEED`, else a random one; printed.
fn pick_seed<F: fmt::Debug>(seed: Option<u64>, faults: &[F]) -> u64 {
    let seed = seed
        .or_else(|| std::env::var("NEMESIS_SEED").ok()?.parse().ok())
        .unwrap_or_else(rand::random);
    println!("nemesis seed {seed} (rerun with NEMESIS_SEED={seed}), faults {faults:?}");
    seed
}

/// A driver's side of the machinery: its randomness, the stop signal and
/// the log.
struct Ctx<F> {
    rng: StdRng,
    stop: watch::Receiver<bool>,
    epoch: Instant,
    events: Arc<Mutex<Vec<NemesisEvent<F>>>>,
}

impl<F: fmt::Display + Copy> Ctx<F> {
    fn log(&self, fault: Option<F>, step: Step, what: String) {
        let e = NemesisEvent {
            at: self.epoch.elapsed(),
            fault,
            step,
            what,
        };
        println!("{e}");
        self.events.lock().unwrap().push(e);
    }

    /// Sleeps for `d`, or less if a stop is requested; true if stopped.
    async fn sleep(&self, d: Duration) -> bool {
        let mut stop = self.stop.clone();
        if *stop.borrow_and_update() {
            return true;
        }
        tokio::select! {
            _ = tokio::time::sleep(d) => false,
            _ = stop.wait_for(|s| *s) => true,
        }
    }

    fn draw(&mut self, range: (Duration, Duration)) -> Duration {
        if range.1 <= range.0 {
            return range.0;
        }
        self.rng.gen_range(range.0..=range.1)
    }

    /// Waits out the gap, then deals the next fault; `None` once stopped.
    async fn next_fault(
        &mut self,
        deck: &mut Vec<F>,
        faults: &[F],
        interval: (Duration, Duration),
    ) -> Option<F> {
        let gap = self.draw(interval);
        if self.sleep(gap).await {
            return None;
        }
        if deck.is_empty() {
            *deck = faults.to_vec();
            deck.shuffle(&mut self.rng);
        }
        deck.pop()
    }
}

/// The test's side: the driver thread, its stop signal and its log.
struct Driver<F, T> {
    thread: JoinHandle<T>,
    stop: watch::Sender<bool>,
    seed: u64,
    events: Arc<Mutex<Vec<NemesisEvent<F>>>>,
}

impl<F: Send + PartialEq + Clone + 'static, T: Send + 'static> Driver<F, T> {
    /// Runs `body` on a new thread with a current-thread runtime.
    fn start<B, Fut>(seed: u64, epoch: Instant, body: B) -> Driver<F, T>
    where
        B: FnOnce(Ctx<F>) -> Fut + Send + 'static,
        Fut: Future<Output = T>,
    {
        let (stop, stop_rx) = watch::channel(false);
        let events = Arc::new(Mutex::new(Vec::new()));
        let ctx = Ctx {
            rng: StdRng::seed_from_u64(seed),
            stop: stop_rx,
            epoch,
            events: events.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("nemesis".into())
            .spawn(move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("nemesis runtime")
                    .block_on(body(ctx))
            })
            .expect("spawn nemesis thread");
        Driver {
            thread,
            stop,
            seed,
            events,
        }
    }

    fn injected(&self, fault: F) -> usize {
        count_injected(&self.events.lock().unwrap(), &fault)
    }

    fn events(&self) -> Vec<NemesisEvent<F>> {
        self.events.lock().unwrap().clone()
    }

    fn stop_blocking(self) -> (T, NemesisLog<F>) {
        self.stop.send_replace(true);
        let out = self
            .thread
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e));
        let events = std::mem::take(&mut *self.events.lock().unwrap());
        let log = NemesisLog {
            seed: self.seed,
            events,
        };
        (out, log)
    }

    /// [`Driver::stop_blocking`] off the async worker threads.
    async fn stop(self) -> (T, NemesisLog<F>) {
        tokio::task::spawn_blocking(move || self.stop_blocking())
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
    }
}

/// A running nemesis over a process [`Cluster`]; see the module doc.
pub struct Nemesis<C> {
    driver: Driver<Fault, C>,
}

impl<C: Cluster + 'static> Nemesis<C> {
    /// Starts injecting `config.faults` into `cluster`, which the nemesis
    /// owns until [`Nemesis::stop`]; times in the log count from `epoch`.
    /// Panics if the cluster cannot take an enabled fault (see
    /// [`Fault::supported_by`]).
    pub fn start(mut cluster: C, config: NemesisConfig, epoch: Instant) -> Nemesis<C> {
        assert!(!config.faults.is_empty(), "no fault enabled");
        for f in &config.faults {
            assert!(f.supported_by(&mut cluster), "the cluster cannot take {f}");
        }
        let seed = pick_seed(config.seed, &config.faults);
        let driver = Driver::start(seed, epoch, move |ctx| async move {
            let mut run = Run {
                cluster,
                config,
                ctx,
            };
            run.main().await;
            run.cluster
        });
        Nemesis { driver }
    }

    pub fn seed(&self) -> u64 {
        self.driver.seed
    }

    /// The log so far.
    pub fn events(&self) -> Vec<NemesisEvent> {
        self.driver.events()
    }

    /// How many times `fault` was injected so far.
    pub fn injected(&self, fault: Fault) -> usize {
        self.driver.injected(fault)
    }

    /// Ends the current fault, heals the cluster and hands it back with
    /// the log.
    pub async fn stop(self) -> (C, NemesisLog) {
        self.driver.stop().await
    }

    /// [`Nemesis::stop`] for sync code.
    pub fn stop_blocking(self) -> (C, NemesisLog) {
        self.driver.stop_blocking()
    }
}

/// [`Nemesis`]'s thread: the cluster it owns meanwhile.
struct Run<C> {
    cluster: C,
    config: NemesisConfig,
    ctx: Ctx<Fault>,
}

impl<C: Cluster> Run<C> {
    fn name(&self, i: usize) -> String {
        format!("member {i} ({})", self.cluster.endpoints()[i])
    }

    /// The leader's index, or a random member if none is named within 3 s.
    async fn leader_or_random(&mut self, fault: Fault) -> (usize, &'static str) {
        match self.cluster.try_leader_index(Duration::from_secs(3)).await {
            Some(l) => (l, "leader"),
            None => {
                let note = "no leader named; a random member instead";
                self.ctx.log(Some(fault), Step::Note, note.into());
                (self.ctx.rng.gen_range(0..self.cluster.size()), "random")
            }
        }
    }

    async fn main(&mut self) {
        let faults = self.config.faults.clone();
        self.ctx
            .log(None, Step::Note, format!("start, faults {faults:?}"));
        let mut deck = Vec::new();
        while let Some(fault) = self
            .ctx
            .next_fault(&mut deck, &faults, self.config.interval)
            .await
        {
            match fault {
                Fault::Kill => self.kill().await,
                Fault::PauseLeader => self.pause_leader().await,
                Fault::MoveLeader => self.move_leader().await,
                Fault::KillPdLeader => self.kill_pd_leader().await,
                Fault::SlowPd => self.slow_pd().await,
            }
        }
        self.cluster.heal();
        let done = "stopped; every process running and resumed";
        self.ctx.log(None, Step::Heal, done.into());
    }

    async fn kill(&mut self) {
        let f = Some(Fault::Kill);
        let (i, why) = if self.ctx.rng.gen_bool(0.5) {
            self.leader_or_random(Fault::Kill).await
        } else {
            (self.ctx.rng.gen_range(0..self.cluster.size()), "random")
        };
        let hold = self.ctx.draw(self.config.hold);
        self.cluster.kill9(i);
        let what = format!("kill -9 {} [{why}] for {hold:?}", self.name(i));
        self.ctx.log(f, Step::Inject, what);
        self.ctx.sleep(hold).await;
        self.cluster.restart(i);
        self.ctx
            .log(f, Step::Heal, format!("restarted {}", self.name(i)));
    }

    async fn pause_leader(&mut self) {
        let f = Some(Fault::PauseLeader);
        let (i, why) = self.leader_or_random(Fault::PauseLeader).await;
        let hold = self.ctx.draw(self.config.pause_hold);
        self.cluster.pause(i);
        let what = format!("SIGSTOP {} [{why}] for {hold:?}", self.name(i));
        self.ctx.log(f, Step::Inject, what);
        self.ctx.sleep(hold).await;
        self.cluster.resume(i);
        self.ctx
            .log(f, Step::Heal, format!("SIGCONT {}", self.name(i)));
    }

    async fn move_leader(&mut self) {
        let f = Some(Fault::MoveLeader);
        let hold = self.ctx.draw(self.config.hold);
        let until = Instant::now() + hold;
        self.ctx
            .log(f, Step::Note, format!("transfers for {hold:?}"));
        loop {
            let from = self.cluster.try_leader_index(Duration::from_secs(2)).await;
            let n = self.cluster.size();
            let to = match from {
                Some(l) => (l + self.ctx.rng.gen_range(1..n)) % n,
                None => self.ctx.rng.gen_range(0..n),
            };
            let from = from.map_or("unknown".to_owned(), |l| format!("member {l}"));
            let started = Instant::now();
            match self.cluster.move_leader(to).await {
                Ok(()) => {
                    let took = started.elapsed();
                    let what = format!("leader {from} -> member {to} in {took:?}");
                    self.ctx.log(f, Step::Inject, what);
                }
                Err(e) => {
                    let what = format!("leader {from} -> member {to} failed: {e}");
                    self.ctx.log(f, Step::Note, what);
                }
            }
            let pause = Duration::from_millis(self.ctx.rng.gen_range(100..300));
            if Instant::now() + pause >= until || self.ctx.sleep(pause).await {
                break;
            }
        }
    }

    async fn kill_pd_leader(&mut self) {
        let f = Some(Fault::KillPdLeader);
        let hold = self.ctx.draw(self.config.hold);
        let pd = self.cluster.placement_driver().expect("a placement driver");
        let leader = pd.try_pd_leader_index(Duration::from_secs(3)).await;
        let size = pd.pd_size();
        let (i, why) = match leader {
            Some(l) => (l, "leader"),
            None => (
                self.ctx.rng.gen_range(0..size),
                "random, no PD leader named",
            ),
        };
        let pd = self.cluster.placement_driver().expect("a placement driver");
        pd.kill9_pd(i);
        let what = format!("kill -9 PD member {i} [{why}] for {hold:?}");
        self.ctx.log(f, Step::Inject, what);
        self.ctx.sleep(hold).await;
        let pd = self.cluster.placement_driver().expect("a placement driver");
        pd.restart_pd(i);
        self.ctx
            .log(f, Step::Heal, format!("restarted PD member {i}"));
    }

    async fn slow_pd(&mut self) {
        let f = Some(Fault::SlowPd);
        let hold = self.ctx.draw(self.config.hold);
        let mode = if self.ctx.rng.gen_bool(0.5) {
            ProxyMode::Stall
        } else {
            ProxyMode::Delay(self.ctx.draw(self.config.pd_delay))
        };
        let pd = self.cluster.placement_driver().expect("a placement driver");
        pd.set_pd_proxy_mode(mode);
        let what = format!("PD proxies {mode:?} for {hold:?}");
        self.ctx.log(f, Step::Inject, what);
        self.ctx.sleep(hold).await;
        let pd = self.cluster.placement_driver().expect("a placement driver");
        pd.set_pd_proxy_mode(ProxyMode::Pass);
        self.ctx.log(f, Step::Heal, "PD proxies pass".into());
    }
}

/// A fault [`RaftNemesis`] injects into the in-process raftstore cluster,
/// through its transport filters and node restarts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RaftFault {
    /// The leader's node cut off from every other node.
    IsolateLeader,
    /// A random node cut off from every other node.
    Partition,
    /// Every message dropped with probability `loss_rate`.
    Loss,
    /// Every message delayed by up to `max_delay` (which also reorders).
    Delay,
    /// Every message delivered twice with probability `duplicate_rate`.
    Duplicate,
    /// A random node's store shut down (engines closed), reopened from its
    /// data dir after the hold.
    RestartNode,
}

impl RaftFault {
    pub const ALL: [RaftFault; 6] = [
        RaftFault::IsolateLeader,
        RaftFault::Partition,
        RaftFault::Loss,
        RaftFault::Delay,
        RaftFault::Duplicate,
        RaftFault::RestartNode,
    ];
}

impl fmt::Display for RaftFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RaftFault::IsolateLeader => "isolate-leader",
            RaftFault::Partition => "partition",
            RaftFault::Loss => "loss",
            RaftFault::Delay => "delay",
            RaftFault::Duplicate => "duplicate",
            RaftFault::RestartNode => "restart-node",
        })
    }
}

/// What [`RaftNemesis`] does and when; see [`RaftNemesisConfig::default`].
#[derive(Clone, Debug)]
pub struct RaftNemesisConfig {
    pub faults: Vec<RaftFault>,
    /// `None`: `$NEMESIS_SEED` if set, else a random seed.
    pub seed: Option<u64>,
    pub interval: (Duration, Duration),
    pub hold: (Duration, Duration),
    pub loss_rate: (f64, f64),
    pub max_delay: (Duration, Duration),
    pub duplicate_rate: (f64, f64),
}

impl Default for RaftNemesisConfig {
    /// Every fault; a fault every 1–3 s, held 0.5–3 s; loss 10–50 %,
    /// delays up to 20–200 ms, duplication 10–50 %.
    fn default() -> Self {
        RaftNemesisConfig {
            faults: RaftFault::ALL.to_vec(),
            seed: None,
            interval: (Duration::from_secs(1), Duration::from_secs(3)),
            hold: (Duration::from_millis(500), Duration::from_secs(3)),
            loss_rate: (0.1, 0.5),
            max_delay: (Duration::from_millis(20), Duration::from_millis(200)),
            duplicate_rate: (0.1, 0.5),
        }
    }
}

/// A running nemesis over the in-process raftstore cluster; see the module
/// doc. The cluster is shared (`Arc`) with the workload; the nemesis owns
/// its filters while it runs ([`raft_cluster::Cluster::heal`] removes all of
/// them, a test's own included).
pub struct RaftNemesis {
    driver: Driver<RaftFault, ()>,
}

impl RaftNemesis {
    pub fn start(
        cluster: Arc<raft_cluster::Cluster>,
        config: RaftNemesisConfig,
        epoch: Instant,
    ) -> RaftNemesis {
        assert!(!config.faults.is_empty(), "no fault enabled");
        let seed = pick_seed(config.seed, &config.faults);
        let driver = Driver::start(seed, epoch, move |ctx| async move {
            let mut run = RaftRun {
                cluster,
                config,
                ctx,
            };
            run.main().await;
        });
        RaftNemesis { driver }
    }

    pub fn seed(&self) -> u64 {
        self.driver.seed
    }

    /// The log so far.
    pub fn events(&self) -> Vec<NemesisEvent<RaftFault>> {
        self.driver.events()
    }

    /// How many times `fault` was injected so far.
    pub fn injected(&self, fault: RaftFault) -> usize {
        self.driver.injected(fault)
    }

    /// Ends the current fault, heals the cluster and returns the log.
    pub async fn stop(self) -> NemesisLog<RaftFault> {
        self.driver.stop().await.1
    }
}

/// [`RaftNemesis`]'s thread.
struct RaftRun {
    cluster: Arc<raft_cluster::Cluster>,
    config: RaftNemesisConfig,
    ctx: Ctx<RaftFault>,
}

impl RaftRun {
    fn random_node(&mut self) -> u64 {
        let nodes = self.cluster.nodes();
        nodes[self.ctx.rng.gen_range(0..nodes.len())]
    }

    fn others(&self, id: u64) -> Vec<u64> {
        self.cluster
            .nodes()
            .into_iter()
            .filter(|n| *n != id)
            .collect()
    }

    fn draw_rate(&mut self, range: (f64, f64)) -> f64 {
        if range.1 <= range.0 {
            return range.0;
        }
        self.ctx.rng.gen_range(range.0..range.1)
    }

    async fn main(&mut self) {
        let faults = self.config.faults.clone();
        self.ctx
            .log(None, Step::Note, format!("start, faults {faults:?}"));
        let mut deck = Vec::new();
        while let Some(fault) = self
            .ctx
            .next_fault(&mut deck, &faults, self.config.interval)
            .await
        {
            let hold = self.ctx.draw(self.config.hold);
            let f = Some(fault);
            let what = match fault {
                RaftFault::IsolateLeader | RaftFault::Partition => {
                    let (id, why) = match (fault, self.cluster.try_leader()) {
                        (RaftFault::IsolateLeader, Some(l)) => (l, "leader"),
                        (RaftFault::IsolateLeader, None) => (self.random_node(), "no leader"),
                        _ => (self.random_node(), "random"),
                    };
                    let others = self.others(id);
                    self.cluster.partition(&[id], &others);
                    format!("node {id} [{why}] cut off from {others:?}")
                }
                RaftFault::Loss => {
                    let rate = self.draw_rate(self.config.loss_rate);
                    self.cluster.add_filter(Loss { rate });
                    format!("loss {:.0}%", rate * 100.0)
                }
                RaftFault::Delay => {
                    let max = self.ctx.draw(self.config.max_delay);
                    self.cluster.add_filter(Delay { max });
                    format!("delays up to {max:?}")
                }
                RaftFault::Duplicate => {
                    let rate = self.draw_rate(self.config.duplicate_rate);
                    self.cluster.add_filter(Duplicate { rate });
                    format!("duplication {:.0}%", rate * 100.0)
                }
                RaftFault::RestartNode => {
                    let id = self.random_node();
                    self.cluster.stop_node(id);
                    format!("node {id} stopped")
                }
            };
            self.ctx
                .log(f, Step::Inject, format!("{what} for {hold:?}"));
            self.ctx.sleep(hold).await;
            let what = self.heal();
            self.ctx.log(f, Step::Heal, what);
        }
        self.heal();
        let done = "stopped; every node running, no filter";
        self.ctx.log(None, Step::Heal, done.into());
    }

    /// Removes every filter and restarts stopped nodes; says what it did.
    fn heal(&self) -> String {
        self.cluster.heal();
        let running = self.cluster.running();
        let mut restarted = Vec::new();
        for id in self.cluster.nodes() {
            if !running.contains(&id) {
                self.cluster.restart_node(id);
                restarted.push(id);
            }
        }
        if restarted.is_empty() {
            "filters removed".into()
        } else {
            format!("filters removed, nodes {restarted:?} restarted")
        }
    }
}
