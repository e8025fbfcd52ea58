//! [`RaftNemesis`]: faults for the in-process [`raft_cluster::Cluster`],
//! through its transport filters and node restarts.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;

use super::{pick_seed, Ctx, Driver, NemesisEvent, NemesisLog, Step};
use crate::raft_cluster::{self, Delay, Duplicate, Loss};

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
