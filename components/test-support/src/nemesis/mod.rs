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
//!
//! This module holds what both drivers share (the schedule, the log, the
//! driver thread); [`process`] drives process clusters, [`raft`] the
//! in-process cluster.

mod process;
mod raft;

use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use tokio::sync::watch;

pub use process::{Fault, Nemesis, NemesisConfig};
pub use raft::{RaftFault, RaftNemesis, RaftNemesisConfig};

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
