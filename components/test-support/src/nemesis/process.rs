//! [`Nemesis`]: faults for a process [`Cluster`] (MetaStore or etcd).

use std::fmt;
use std::time::{Duration, Instant};

use rand::Rng;

use super::{pick_seed, Ctx, Driver, NemesisEvent, NemesisLog, Step};
use crate::cluster::Cluster;
use crate::proxy::ProxyMode;

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
