//! Region scheduling: each region heartbeat is answered with at most one
//! step ([`RegionOperator`]) for the region's leader, decided by four
//! schedulers in order of precedence (operators' requested splits and
//! merges come between the third and the fourth, see
//! [`crate::PdCore::handle_region_heartbeats`]):
//!
//! 1. **replica placement** (`schedule::placement`): keeps every region at
//!    `max_replicas` healthy voters on distinct up nodes (adds, promotes
//!    and removes replicas, tombstones drained `Offline` nodes);
//! 2. **leader balance** (`schedule::balance`): moves leadership off nodes leading
//!    more regions than others;
//! 3. **region balance** (`schedule::balance`): moves a replica from a node holding
//!    more replicas than others onto one holding fewer;
//! 4. **merge checker** (`schedule::merge`, [`Scheduler::check_merge`] in
//!    `schedule::align`): merges a small, settled region into its small
//!    right neighbour; when their replicas are on different nodes it first
//!    *aligns* them, moving the region's replicas onto the neighbour's nodes
//!    one replica move at a time (learner, promotion, removal of the
//!    replica off the neighbour's nodes, leadership handed over first; the
//!    moves are kept with the balance moves and carried on by placement).
//!    At most [`ScheduleConfig::merge_limit`] merges and alignments are in
//!    flight.
//!
//! The balance schedulers run only for a region that placement leaves
//! alone, that is stable (no learner, no pending or down peer, no step
//! or move of its own under way) and that no merge or alignment of the
//! merge checker involves (as source or target: balance would move an
//! aligned replica back, or a merging region's replicas from under the
//! merge), and keep at most [`ScheduleConfig::leader_balance_limit`] /
//! [`ScheduleConfig::region_balance_limit`] moves in flight cluster-wide
//! (alignment moves count against the merge limit only).
//!
//! Operators are remembered per region until the region's epoch or leader
//! moves (the step was applied) or [`ScheduleConfig::operator_timeout`]
//! passes, so a heartbeat that arrives before the leader applied the step
//! gets the same step again instead of a second new peer.
//!
//! Cost per heartbeat: node loads come from counters PD keeps up to date
//! as regions change ([`crate::load`]), so nothing here walks the regions;
//! a heartbeat costs map look-ups for its region, O(nodes) to pick nodes,
//! and O(moves in flight) for the balance and merge bookkeeping.

mod align;
mod balance;
mod merge;
mod placement;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use proto::metapb::{self, NodeState, PeerRole};

use crate::client::{RegionHeartbeat, RegionOperator, RegionWithLeader, Result};
use crate::load::NodeInfo;
use crate::operators::PendingOperator;

use balance::Moves;
use merge::MergeChecker;
use placement::Step;

/// The replica placement scheduler's name, as operators' tools show it.
pub const SCHEDULER_NAME: &str = "replica-placement";
/// What replica placement does, as operators' tools show it.
pub const SCHEDULER_DESCRIPTION: &str = "keeps every region at max-replicas voters on \
     distinct up nodes: adds a learner on the least loaded node, promotes it once caught \
     up, removes surplus replicas and those on removed or long-down nodes (handing \
     leadership over first), and tombstones removed nodes that hold no replica";
/// The leader balance scheduler's name.
pub const LEADER_BALANCE: &str = "leader-balance";
/// The region (replica) balance scheduler's name.
pub const REGION_BALANCE: &str = "region-balance";
/// The merge checker's name.
pub const MERGE_CHECKER: &str = "merge-checker";

/// Every scheduler PD runs with `config`, as (name, what it does).
pub fn schedulers(config: &ScheduleConfig) -> Vec<(&'static str, String)> {
    let limit = |n: usize| match n {
        0 => "disabled (limit 0)".to_owned(),
        n => format!("at most {n} in flight"),
    };
    vec![
        (SCHEDULER_NAME, SCHEDULER_DESCRIPTION.to_owned()),
        (
            LEADER_BALANCE,
            format!(
                "evens out region leaders: a region led from a node with 2 or more \
                 leaders above the least loaded node holding one of its healthy voters \
                 transfers leadership there; {}",
                limit(config.leader_balance_limit)
            ),
        ),
        (
            REGION_BALANCE,
            format!(
                "evens out replicas per node (approximate size breaks ties): a stable \
                 region on a node with 2 or more replicas above the least loaded up node \
                 without one moves that replica there (learner, promote, then the \
                 source replica goes; quorum kept throughout); no disk-capacity signal \
                 yet, so full nodes are not recognized; {}",
                limit(config.region_balance_limit)
            ),
        ),
        (MERGE_CHECKER, merge_description(config)),
    ]
}

fn merge_description(config: &ScheduleConfig) -> String {
    if config.max_merge_region_keys == 0 || config.max_merge_region_size == 0 {
        return "disabled (max-merge-region-keys or max-merge-region-size 0)".to_owned();
    }
    if config.merge_limit == 0 {
        return "disabled (limit 0)".to_owned();
    }
    format!(
        "merges a region into its right neighbour when both have at most {} keys and {} \
         bytes (each and together), a known leader, only voters, none pending or down, \
         no operator or move under way, and neither was split or merged for {}s (as seen \
         by this PD leader); replicas on different nodes are first aligned: moved onto \
         the neighbour's nodes one at a time (learner, promote, then the replica off them \
         goes; quorum kept throughout, balance leaves both regions alone meanwhile); at \
         most {} merges and alignments in flight",
        config.max_merge_region_keys,
        config.max_merge_region_size,
        config.split_merge_interval.as_secs(),
        config.merge_limit
    )
}

#[derive(Debug, Clone)]
pub struct ScheduleConfig {
    /// Voters every region should have (on distinct nodes).
    pub max_replicas: usize,
    /// How long a peer may be reported down before it is replaced.
    pub max_node_down_time: Duration,
    /// How long an issued operator is repeated before PD decides anew.
    pub operator_timeout: Duration,
    /// How long a split asked for with [`crate::PdClient::split_region`]
    /// is handed out before PD forgets it.
    pub split_timeout: Duration,
    /// Leader transfers for balance in flight at most, cluster-wide
    /// (0 turns leader balance off).
    pub leader_balance_limit: usize,
    /// Replica moves for balance in flight at most, cluster-wide (0 turns
    /// region balance off).
    pub region_balance_limit: usize,
    /// How long a replica move whose learner was added may take (catching
    /// up, promotion, removal of the source replica) before it no longer
    /// counts as in flight; also how long a merge alignment lasts after its
    /// latest replica move started unless it merged or stopped earlier.
    pub balance_move_timeout: Duration,
    /// How long a merge asked for with [`crate::PdClient::merge_regions`]
    /// is handed out before PD forgets it; also how long a merge the merge
    /// checker started counts as in flight unless seen done earlier.
    pub merge_timeout: Duration,
    /// The merge checker merges a region into its right neighbour only if
    /// each has at most this many keys (approximate, from heartbeats) and
    /// so have both together. 0 turns the merge checker off.
    pub max_merge_region_keys: u64,
    /// Likewise for bytes (approximate size). 0 turns the merge checker
    /// off.
    pub max_merge_region_size: u64,
    /// How long neither region's epoch version may have changed (no split
    /// or merge) before the merge checker merges them. PD's clock of a
    /// region starts when it first sees the region's current version, so
    /// it restarts with a new PD leader.
    pub split_merge_interval: Duration,
    /// Merges the merge checker keeps in flight at most, cluster-wide,
    /// alignments before a merge included (0 turns it off).
    pub merge_limit: usize,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        ScheduleConfig {
            max_replicas: 3,
            max_node_down_time: Duration::from_secs(30 * 60),
            operator_timeout: Duration::from_secs(10),
            split_timeout: Duration::from_secs(60),
            leader_balance_limit: 4,
            region_balance_limit: 4,
            balance_move_timeout: Duration::from_secs(10 * 60),
            merge_timeout: Duration::from_secs(60),
            max_merge_region_keys: 200_000,
            max_merge_region_size: 20 << 20,
            split_merge_interval: Duration::from_secs(10 * 60),
            merge_limit: 4,
        }
    }
}

struct Issued {
    epoch: metapb::RegionEpoch,
    /// The leader the step was handed to: a leader transfer leaves the
    /// epoch alone, so a new leader means the step was applied.
    leader: u64,
    op: RegionOperator,
    source: &'static str,
    at: Instant,
}

/// What the scheduler needs from PD's state; [`crate::PdCore`] provides it
/// (its changes go through PD's raft group, hence async).
#[async_trait::async_trait]
pub trait ClusterView: Send + Sync {
    /// Every node PD knows, with its load; O(nodes), whatever the number
    /// of regions.
    async fn nodes(&self) -> Result<Vec<NodeInfo>>;
    async fn alloc_id(&self) -> Result<u64>;
    async fn set_node_state(&self, node_id: u64, state: NodeState) -> Result<()>;
    /// The region starting at `region`'s end key, with its leader and
    /// sizes, if PD knows one (`None` for a region reaching the end of the
    /// keyspace). One look-up in the region tree.
    async fn right_neighbour(&self, region: &metapb::Region) -> Result<Option<RegionWithLeader>>;
}

/// What one decision looks at: the heartbeat and the nodes with their
/// loads (counters plus the moves in flight).
pub(crate) struct Context<'a> {
    pub hb: &'a RegionHeartbeat,
    pub nodes: &'a HashMap<u64, NodeInfo>,
    /// Peers down for longer than allowed.
    pub lost_down: &'a [u64],
    pub max_replicas: usize,
}

impl Context<'_> {
    pub fn node_state(&self, id: u64) -> NodeState {
        self.nodes
            .get(&id)
            .map(|n| n.state)
            .unwrap_or(NodeState::Tombstone)
    }

    pub fn node(&self, id: u64) -> Option<&NodeInfo> {
        self.nodes.get(&id)
    }

    /// On a node that is not up (offline, tombstoned or unknown).
    pub fn offline(&self, p: &metapb::Peer) -> bool {
        self.node_state(p.node_id) != NodeState::Up
    }

    /// Offline, or down for longer than allowed: to be replaced.
    pub fn lost(&self, p: &metapb::Peer) -> bool {
        self.offline(p) || self.lost_down.contains(&p.id)
    }

    pub fn pending(&self, p: &metapb::Peer) -> bool {
        self.hb.pending_peers.iter().any(|q| q.id == p.id)
    }

    pub fn down(&self, p: &metapb::Peer) -> bool {
        self.hb.down_peers.iter().any(|q| q.id == p.id)
    }

    pub fn voters(&self) -> Vec<&metapb::Peer> {
        self.hb
            .region
            .peers
            .iter()
            .filter(|p| p.role() == PeerRole::Voter)
            .collect()
    }

    pub fn has_replica_on(&self, node_id: u64) -> bool {
        self.hb.region.peers.iter().any(|p| p.node_id == node_id)
    }

    /// The up node without a replica of this region with the fewest
    /// replicas (then the least data, then the lowest id).
    pub fn least_loaded_free_node(&self) -> Option<&NodeInfo> {
        self.nodes
            .values()
            .filter(|n| n.accepts_replicas() && !self.has_replica_on(n.id))
            .min_by_key(|n| (n.load.replicas, n.load.size, n.id))
    }

    /// The healthy, caught-up voter other than `except` whose node leads
    /// the fewest regions: where leadership goes.
    pub fn best_new_leader(&self, except: u64) -> Option<&metapb::Peer> {
        self.voters()
            .into_iter()
            .filter(|p| p.id != except && !self.lost(p) && !self.pending(p) && !self.down(p))
            .min_by_key(|p| {
                let leaders = self.node(p.node_id).map_or(0, |n| n.load.leaders);
                (leaders, p.node_id)
            })
    }
}

pub struct Scheduler {
    config: ScheduleConfig,
    issued: Mutex<HashMap<u64, Issued>>,
    /// region id → its peers its leader reports down, and since when
    /// (continuously). Keyed by region so a heartbeat touches only its own.
    down_since: Mutex<HashMap<u64, Vec<(u64, Instant)>>>,
    moves: Moves,
    merges: MergeChecker,
}

impl Scheduler {
    pub fn new(config: ScheduleConfig) -> Scheduler {
        Scheduler {
            moves: Moves::new(&config),
            merges: MergeChecker::new(&config),
            config,
            issued: Mutex::new(HashMap::new()),
            down_since: Mutex::new(HashMap::new()),
        }
    }

    pub fn config(&self) -> &ScheduleConfig {
        &self.config
    }

    /// The steps being repeated to their regions (not yet timed out), by
    /// region id.
    pub fn issued(&self) -> Vec<PendingOperator> {
        let issued = self.issued.lock();
        let mut out: Vec<PendingOperator> = issued
            .iter()
            .filter(|(_, i)| i.at.elapsed() < self.config.operator_timeout)
            .map(|(id, i)| PendingOperator {
                region_id: *id,
                source: i.source.to_owned(),
                op: i.op.clone(),
                age: i.at.elapsed(),
            })
            .collect();
        out.sort_by_key(|o| o.region_id);
        out
    }

    /// The next step for the heartbeating region, if any.
    pub async fn schedule(
        &self,
        view: &dyn ClusterView,
        hb: &RegionHeartbeat,
    ) -> Result<Option<RegionOperator>> {
        let region = &hb.region;
        let epoch = region.region_epoch.unwrap_or_default();
        self.merges.observe(hb);
        {
            let mut issued = self.issued.lock();
            if let Some(i) = issued.get(&region.id) {
                if i.epoch == epoch
                    && i.leader == hb.leader.id
                    && i.at.elapsed() < self.config.operator_timeout
                {
                    return Ok(Some(i.op.clone()));
                }
                issued.remove(&region.id);
            }
        }
        let lost_down = self.track_down(hb);
        let mut nodes: HashMap<u64, NodeInfo> =
            view.nodes().await?.into_iter().map(|n| (n.id, n)).collect();
        self.retire_offline_nodes(view, &nodes).await?;
        self.moves.observe(hb);
        self.moves.add_influence(&mut nodes);
        let ctx = Context {
            hb,
            nodes: &nodes,
            lost_down: &lost_down,
            max_replicas: self.config.max_replicas.max(1),
        };

        let moving = self.moves.replica_source(region.id);
        let mut balancing = false;
        let (step, source) = if let Some(step) = placement::decide(&ctx, moving.map(|m| m.0)) {
            // Placement carries a replica move on once it started.
            let source = moving.map_or(SCHEDULER_NAME, |(_, purpose)| purpose.scheduler());
            (step, source)
        } else if self.merges.involves(region.id) {
            // Balance would undo an alignment, or move a merging region's
            // replicas from under the merge.
            return Ok(None);
        } else if let Some(start) = self.moves.decide(&ctx) {
            balancing = true;
            start.step()
        } else {
            return Ok(None);
        };
        let op = match step {
            Step::Op(op) => op,
            Step::AddLearnerOn(node_id) => match view.alloc_id().await {
                Ok(id) => RegionOperator::AddLearner(metapb::Peer {
                    id,
                    node_id,
                    role: PeerRole::Learner as i32,
                }),
                Err(e) => {
                    if balancing {
                        self.moves.cancel(region.id);
                    }
                    return Err(e);
                }
            },
        };
        tracing::info!(region_id = region.id, ?op, scheduler = source, "scheduled");
        self.issued.lock().insert(
            region.id,
            Issued {
                epoch,
                leader: hb.leader.id,
                op: op.clone(),
                source,
                at: Instant::now(),
            },
        );
        Ok(Some(op))
    }

    /// Updates how long each reported peer of this region has been down;
    /// returns the ids of peers down for longer than allowed.
    fn track_down(&self, hb: &RegionHeartbeat) -> Vec<u64> {
        let mut down_since = self.down_since.lock();
        let now = Instant::now();
        let before = down_since.remove(&hb.region.id).unwrap_or_default();
        let current: Vec<(u64, Instant)> = hb
            .down_peers
            .iter()
            .map(|p| {
                let since = before
                    .iter()
                    .find(|(id, _)| *id == p.id)
                    .map_or(now, |(_, s)| *s);
                (p.id, since)
            })
            .collect();
        let lost = current
            .iter()
            .filter(|(_, since)| now.duration_since(*since) >= self.config.max_node_down_time)
            .map(|(id, _)| *id)
            .collect();
        if !current.is_empty() {
            down_since.insert(hb.region.id, current);
        }
        lost
    }

    /// Tombstones `Offline` nodes that hold no replica any more.
    async fn retire_offline_nodes(
        &self,
        view: &dyn ClusterView,
        nodes: &HashMap<u64, NodeInfo>,
    ) -> Result<()> {
        for node in nodes.values() {
            if node.state == NodeState::Offline && node.load.replicas == 0 {
                tracing::info!(
                    node_id = node.id,
                    "decommissioned node holds no replica; tombstoned"
                );
                view.set_node_state(node.id, NodeState::Tombstone).await?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod align_tests;
#[cfg(test)]
mod balance_tests;
#[cfg(test)]
mod merge_tests;
#[cfg(test)]
mod sim;
#[cfg(test)]
mod tests;
