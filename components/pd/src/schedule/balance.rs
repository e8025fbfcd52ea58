//! Leader and region balance: the moves that even out load over nodes once
//! placement has nothing to do, and the bookkeeping of those in flight.
//!
//! - **Leader balance.** When the heartbeating region's leader is on a node
//!   leading at least 2 regions more than the least loaded node holding one
//!   of the region's healthy voters, leadership is transferred there. Every
//!   transfer lowers the sum of squared leader counts, so this converges;
//!   it stops once no region can move its leader to a node leading 2 fewer,
//!   which with replicas spread evenly leaves leaders within ±1 of even in
//!   practice (not guaranteed: the nodes compared are only those holding
//!   a voter of the heartbeating region).
//! - **Region balance.** When the node with the most replicas among the
//!   region's nodes holds at least 2 more than the least loaded up node
//!   without a replica of it, a learner is added on that node; placement
//!   then promotes it once caught up and removes the replica on the source
//!   node (the leader hands over first). Replica count decides, the nodes'
//!   approximate bytes break ties (and a non-leader source is preferred,
//!   saving a transfer). Every move lowers the sum of squared replica
//!   counts, so this converges to replicas within ±1 of even. The voters
//!   never drop below what the region had: the new voter is in before the
//!   old one goes. A "full" node is not recognized: nodes report no disk
//!   capacity yet, so the schedulers cannot tell one, and balance by count
//!   and size is all there is.
//!
//! Both run only for a stable region: all peers voters on up nodes, none
//! pending or down, no more voters than `max_replicas`, and no step (PD
//! repeats an issued step until the epoch or leader moves) or move of its
//! own under way. Moves in flight are kept by region id, in memory on the PD
//! leader, and count against the limits until they are done (the leader
//! moved off the source node; the source replica is gone), failed (the new
//! replica disappeared) or expired (the step was not carried out within
//! `operator_timeout`; a replica move not finished within
//! `balance_move_timeout`). Their effect not yet visible in the counters is
//! added to the loads the decisions see ([`Moves::add_influence`]), so
//! several heartbeats in a row do not all pick the same target.
//!
//! The merge checker's alignment moves (a replica of a merge's source moved
//! onto a node of its target, `schedule::align`) are kept here too, marked
//! [`Purpose::Align`]: placement carries them on like a balance move, their
//! influence counts, and a region with one is not balanced; they count
//! against the merge limit, not against `region_balance_limit`. Neither
//! balance scheduler touches a region a merge or alignment involves (the
//! caller checks that), so balance never moves an aligned replica back.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use proto::metapb::{self, NodeState, PeerRole};
use tracing::{debug, info};

use super::placement::Step;
use super::{Context, ScheduleConfig, LEADER_BALANCE, MERGE_CHECKER, REGION_BALANCE};
use crate::client::{RegionHeartbeat, RegionOperator};
use crate::load::NodeInfo;

/// A balance move decided for the heartbeating region.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Start {
    /// Transfer leadership to this voter.
    Leader(metapb::Peer),
    /// Move a replica from node `from` to node `to`.
    Replica { from: u64, to: u64 },
}

impl Start {
    /// The step that begins the move, and the scheduler behind it.
    pub fn step(&self) -> (Step, &'static str) {
        match *self {
            Start::Leader(p) => (Step::Op(RegionOperator::TransferLeader(p)), LEADER_BALANCE),
            Start::Replica { to, .. } => (Step::AddLearnerOn(to), REGION_BALANCE),
        }
    }
}

/// What a replica move is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Purpose {
    /// Region balance: counts against `region_balance_limit`.
    Balance,
    /// The merge checker's alignment of a merge source with its target's
    /// nodes: counts against the merge limit (see `schedule::merge`).
    Align,
}

impl Purpose {
    /// The scheduler the move's steps are shown under.
    pub fn scheduler(self) -> &'static str {
        match self {
            Purpose::Balance => REGION_BALANCE,
            Purpose::Align => MERGE_CHECKER,
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Leader {
        from: u64,
        to: u64,
    },
    Replica {
        from: u64,
        to: u64,
        /// A heartbeat showed the new replica on `to`.
        target_seen: bool,
        purpose: Purpose,
    },
}

#[derive(Debug, Clone, Copy)]
struct Move {
    kind: Kind,
    at: Instant,
}

/// The balance moves in flight, by region id.
pub(crate) struct Moves {
    leader_limit: usize,
    region_limit: usize,
    step_timeout: Duration,
    move_timeout: Duration,
    moves: Mutex<HashMap<u64, Move>>,
}

impl Moves {
    pub fn new(config: &ScheduleConfig) -> Self {
        Moves {
            leader_limit: config.leader_balance_limit,
            region_limit: config.region_balance_limit,
            step_timeout: config.operator_timeout,
            move_timeout: config.balance_move_timeout,
            moves: Mutex::new(HashMap::new()),
        }
    }

    /// Drops expired moves, and the heartbeating region's move once the
    /// heartbeat shows it done or failed.
    pub fn observe(&self, hb: &RegionHeartbeat) {
        let mut moves = self.moves.lock();
        moves.retain(|region_id, m| {
            let limit = match m.kind {
                Kind::Replica {
                    target_seen: true, ..
                } => self.move_timeout,
                _ => self.step_timeout,
            };
            let alive = m.at.elapsed() < limit;
            if !alive {
                info!(region_id, kind = ?m.kind, "balance move expired");
            }
            alive
        });
        let region = &hb.region;
        let Some(m) = moves.get_mut(&region.id) else {
            return;
        };
        let on = |node: u64| region.peers.iter().any(|p| p.node_id == node);
        let finished = match &mut m.kind {
            Kind::Leader { from, .. } => hb.leader.node_id != *from,
            Kind::Replica {
                from,
                to,
                target_seen,
                ..
            } => {
                if !on(*from) {
                    true
                } else if *target_seen && !on(*to) {
                    info!(
                        region_id = region.id,
                        "balance move failed: the new replica is gone"
                    );
                    true
                } else {
                    *target_seen |= on(*to);
                    false
                }
            }
        };
        if finished {
            debug!(region_id = region.id, kind = ?m.kind, "balance move finished");
            moves.remove(&region.id);
        }
    }

    /// Adds to `nodes`' loads what the moves in flight will change and the
    /// counters do not show yet.
    pub fn add_influence(&self, nodes: &mut HashMap<u64, NodeInfo>) {
        let mut adjust = |node: u64, f: &dyn Fn(&mut NodeInfo)| {
            if let Some(n) = nodes.get_mut(&node) {
                f(n);
            }
        };
        for m in self.moves.lock().values() {
            match m.kind {
                Kind::Leader { from, to } => {
                    adjust(from, &|n| n.load.leaders = n.load.leaders.saturating_sub(1));
                    adjust(to, &|n| n.load.leaders += 1);
                }
                Kind::Replica {
                    from,
                    to,
                    target_seen,
                    ..
                } => {
                    adjust(from, &|n| {
                        n.load.replicas = n.load.replicas.saturating_sub(1)
                    });
                    if !target_seen {
                        adjust(to, &|n| n.load.replicas += 1);
                    }
                }
            }
        }
    }

    /// The source node of the region's replica move in flight, if any, and
    /// what the move is for.
    pub fn replica_source(&self, region_id: u64) -> Option<(u64, Purpose)> {
        match self.moves.lock().get(&region_id)?.kind {
            Kind::Replica { from, purpose, .. } => Some((from, purpose)),
            Kind::Leader { .. } => None,
        }
    }

    /// Records the merge checker's move of region `region_id`'s replica
    /// from node `from` to node `to` (its first step, the learner on `to`,
    /// is the caller's to issue; undo with [`Self::cancel`] if it cannot
    /// be). `false`, recording nothing, when the region has a move in
    /// flight already. No limit applies here: the merge checker's does.
    pub fn start_alignment(&self, region_id: u64, from: u64, to: u64) -> bool {
        let mut moves = self.moves.lock();
        if moves.contains_key(&region_id) {
            return false;
        }
        let kind = Kind::Replica {
            from,
            to,
            target_seen: false,
            purpose: Purpose::Align,
        };
        info!(region_id, ?kind, "alignment move started");
        moves.insert(
            region_id,
            Move {
                kind,
                at: Instant::now(),
            },
        );
        true
    }

    /// A balance move for the heartbeating region, if one is due and the
    /// limits allow it; the move is counted in flight from here on (undo
    /// with [`Self::cancel`] if its step cannot be issued).
    pub fn decide(&self, ctx: &Context<'_>) -> Option<Start> {
        let region_id = ctx.hb.region.id;
        let mut moves = self.moves.lock();
        if moves.contains_key(&region_id) || !stable(ctx) {
            return None;
        }
        let (leaders, replicas) = moves.values().fold((0, 0), |(l, r), m| match m.kind {
            Kind::Leader { .. } => (l + 1, r),
            Kind::Replica {
                purpose: Purpose::Balance,
                ..
            } => (l, r + 1),
            Kind::Replica { .. } => (l, r),
        });
        let start = (leaders < self.leader_limit)
            .then(|| leader_target(ctx).map(Start::Leader))
            .flatten()
            .or_else(|| {
                (replicas < self.region_limit)
                    .then(|| replica_move(ctx))
                    .flatten()
                    .map(|(from, to)| Start::Replica { from, to })
            })?;
        let kind = match start {
            Start::Leader(p) => Kind::Leader {
                from: ctx.hb.leader.node_id,
                to: p.node_id,
            },
            Start::Replica { from, to } => Kind::Replica {
                from,
                to,
                target_seen: false,
                purpose: Purpose::Balance,
            },
        };
        info!(region_id, ?kind, "balance move started");
        moves.insert(
            region_id,
            Move {
                kind,
                at: Instant::now(),
            },
        );
        Some(start)
    }

    /// Whether region `region_id` has a balance move in flight.
    pub fn contains(&self, region_id: u64) -> bool {
        self.moves.lock().contains_key(&region_id)
    }

    /// Forgets a move whose first step could not be issued.
    pub fn cancel(&self, region_id: u64) {
        self.moves.lock().remove(&region_id);
    }

    /// (leader transfers, replica moves) in flight; the replica moves
    /// include alignment moves.
    #[cfg(test)]
    pub fn in_flight(&self) -> (usize, usize) {
        let moves = self.moves.lock();
        let leaders = moves
            .values()
            .filter(|m| matches!(m.kind, Kind::Leader { .. }))
            .count();
        (leaders, moves.len() - leaders)
    }
}

/// All peers are voters on up nodes, none pending or down, and there are
/// no more of them than wanted.
fn stable(ctx: &Context<'_>) -> bool {
    let peers = &ctx.hb.region.peers;
    peers.len() <= ctx.max_replicas
        && ctx.lost_down.is_empty()
        && peers.iter().all(|p| {
            p.role() == PeerRole::Voter
                && ctx.node_state(p.node_id) == NodeState::Up
                && !ctx.pending(p)
                && !ctx.down(p)
        })
}

/// The voter to hand leadership to for leader balance, if any.
fn leader_target(ctx: &Context<'_>) -> Option<metapb::Peer> {
    let leaders = |node: u64| ctx.node(node).map_or(0, |n| n.load.leaders);
    let from = leaders(ctx.hb.leader.node_id);
    let to = ctx.best_new_leader(ctx.hb.leader.id)?;
    (from > leaders(to.node_id) + 1).then_some(*to)
}

/// The (source node, target node) of a replica move, if one is due.
fn replica_move(ctx: &Context<'_>) -> Option<(u64, u64)> {
    let load = |node: u64| ctx.node(node).map(|n| n.load).unwrap_or_default();
    let leader = ctx.hb.leader.id;
    let from = ctx.hb.region.peers.iter().max_by_key(|p| {
        let l = load(p.node_id);
        (l.replicas, l.size, p.id != leader, p.node_id)
    })?;
    let to = ctx.least_loaded_free_node()?;
    (load(from.node_id).replicas > to.load.replicas + 1).then_some((from.node_id, to.id))
}
