//! Replica placement: keeps every region at `max_replicas` voters on
//! distinct, healthy nodes.
//!
//! 1. a learner is promoted once the leader no longer reports it pending
//!    (caught up), or removed if its node is gone or it is still pending
//!    and has gone silent;
//! 2. while fewer than `max_replicas` voters are healthy, a learner is added
//!    on the up node with the fewest replicas that has none of this region;
//! 3. surplus voters are removed: first those on lost nodes (down longer than
//!    `max_node_down_time`, or removed by MemberRemove = `Offline`), then the
//!    source replica of a region-balance move in flight, else the one on the
//!    most loaded node. The leader is never removed directly; it hands
//!    leadership to a healthy voter (on the node leading the fewest regions)
//!    first.
//!
//! A replica on an `Offline` node is removed even when no replacement node
//! exists (the operator asked for that node to go, as etcd's MemberRemove
//! shrinks the cluster), but never the last healthy voter. A replica that is
//! merely down is removed only once a replacement has caught up, so a node
//! restart never costs a region its quorum. Likewise a surplus voter goes
//! only while more than `max_replicas` voters are there, so a balance move
//! (add, promote, remove) never leaves fewer voters than it found.

use proto::metapb::{self, PeerRole};

use super::Context;
use crate::client::RegionOperator;

/// A decided step; adding a learner still needs a peer id.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Step {
    AddLearnerOn(u64),
    Op(RegionOperator),
}

/// The placement step for the heartbeating region, if one is due.
/// `moving_from`: the source node of a region-balance move in flight for
/// this region, whose replica is the surplus one.
pub(crate) fn decide(ctx: &Context<'_>, moving_from: Option<u64>) -> Option<Step> {
    let hb = ctx.hb;
    let region = &hb.region;

    // A joint configuration is left by raft on its own; wait for it.
    if region
        .peers
        .iter()
        .any(|p| matches!(p.role(), PeerRole::IncomingVoter | PeerRole::DemotingVoter))
    {
        return None;
    }

    if let Some(learner) = region.peers.iter().find(|p| p.role() == PeerRole::Learner) {
        // A learner that never caught up and went silent (its node died
        // or never came up) would block placement forever.
        let op = if ctx.lost(learner) || (ctx.pending(learner) && ctx.down(learner)) {
            RegionOperator::RemovePeer(*learner)
        } else if ctx.pending(learner) {
            return None;
        } else {
            RegionOperator::PromoteLearner(*learner)
        };
        return Some(Step::Op(op));
    }

    let voters = ctx.voters();
    let healthy = voters.iter().filter(|p| !ctx.lost(p)).count();
    let max = ctx.max_replicas;
    let candidate = ctx.least_loaded_free_node();

    if healthy < max {
        if let Some(node) = candidate {
            return Some(Step::AddLearnerOn(node.id));
        }
    }

    let victim = surplus_voter(ctx, &voters, healthy, candidate.is_some(), moving_from)?;
    if victim.id != hb.leader.id {
        return Some(Step::Op(RegionOperator::RemovePeer(*victim)));
    }
    // Never remove the leader itself: hand leadership to a healthy voter
    // that is caught up; the new leader removes the old one.
    ctx.best_new_leader(victim.id)
        .map(|p| Step::Op(RegionOperator::TransferLeader(*p)))
}

/// Which voter, if any, should go.
fn surplus_voter<'a>(
    ctx: &Context<'_>,
    voters: &[&'a metapb::Peer],
    healthy: usize,
    has_candidate: bool,
    moving_from: Option<u64>,
) -> Option<&'a metapb::Peer> {
    let max = ctx.max_replicas;
    let lost = voters.iter().find(|p| {
        ctx.lost(p) && (healthy >= max || (ctx.offline(p) && healthy >= 1 && !has_candidate))
    });
    if let Some(p) = lost {
        return Some(p);
    }
    if voters.len() <= max {
        return None;
    }
    // A balance move's source goes, even when it leads (it hands over
    // first): that is what the move is for.
    let source = moving_from.and_then(|n| voters.iter().find(|p| p.node_id == n));
    if let Some(p) = source {
        return Some(p);
    }
    let replicas = |p: &metapb::Peer| ctx.node(p.node_id).map_or(0, |n| n.load.replicas);
    voters
        .iter()
        .filter(|p| p.id != ctx.hb.leader.id)
        .max_by_key(|p| (replicas(p), p.node_id))
        .copied()
}
