//! Membership changes of a region: checking a requested change on the
//! leader, building its raft proposal, and turning a committed one into the
//! new region meta.
//!
//! Raft only knows peer ids; the region meta also needs each peer's node and
//! role. So a change is proposed as one raft-rs `ConfChangeV2` (transition
//! `Auto`: a single change uses raft's simple protocol, several go through
//! joint consensus, which raft-rs leaves by itself once applied) whose
//! context is a `metapb::Region` carrying the region id, the epoch the
//! change was checked against and the changed peers, one per change, in the
//! order of the changes.
//!
//! Contract and edge cases:
//! * [`check_conf_change`] runs on the leader only, against the region as
//!   it sees it. An empty list, a peer without id or node, a peer named
//!   twice, the removal of a peer not in the region, a known peer named
//!   with another node, or a new peer on a node that already holds a
//!   replica (or on the same node as another new peer) fail with
//!   `InvalidConfChange`; so does removing a full voter together with other
//!   changes (raft-rs would keep it in the outgoing half only, a role the
//!   region meta cannot express: demote it first). While the region is
//!   joint or raft has a membership change not yet applied, any change
//!   fails with `StaleCommand`.
//! * [`apply_conf_change`] runs on every replica, for a committed entry. It
//!   decides only from the entry and the region meta at that index, so
//!   every replica decides the same: a context for another region or
//!   another epoch (either half of it) fails with `EpochNotMatch`, a context
//!   whose peers do not match the changes one-to-one with `Corrupted`, and
//!   raft-rs may refuse the change itself (`Raft`). Any failure leaves
//!   raft's configuration and the region meta unchanged. raft-rs's own entry
//!   leaving a joint configuration has no changes and no context: nothing to
//!   check. Legacy (v1) `ConfChange` entries are read as a single change.
//!   On success raft's configuration has moved (through the caller's
//!   closure, which is the only thing here that needs the `RawNode`), the
//!   region's peers and roles follow the new `ConfState`, `conf_ver` is one
//!   higher, and `removed` tells whether this replica left the region.
//! * [`region_with_conf_state`] and [`conf_state_from_region`] convert
//!   between raft's configuration and the region's peer roles; start-up
//!   restores raft's configuration from the region meta, which is written
//!   with the apply state and so always matches the applied index.

use std::collections::HashSet;

use prost::Message as _;
use proto::metapb;
use raft::eraftpb::{
    ConfChange, ConfChangeSingle, ConfChangeTransition, ConfChangeType, ConfChangeV2, ConfState,
    Entry, EntryType,
};
use tracing::error;

use crate::{Error, Result};

/// Whether `changes` can apply to `region` as it is now (see the module
/// docs). `has_pending_conf`: raft has a membership change not yet applied.
/// Checked on the leader only; apply rejects the change if the epoch moved
/// since.
pub(crate) fn check_conf_change(
    region: &metapb::Region,
    has_pending_conf: bool,
    changes: &[(ConfChangeType, metapb::Peer)],
) -> Result<()> {
    let invalid = |what: String| Err(Error::InvalidConfChange(what));
    if changes.is_empty() {
        return invalid("no changes".into());
    }
    let in_joint = region.peers.iter().any(|p| {
        matches!(
            p.role(),
            metapb::PeerRole::IncomingVoter | metapb::PeerRole::DemotingVoter
        )
    });
    if in_joint || has_pending_conf {
        return Err(Error::StaleCommand(
            "another membership change is in progress".into(),
        ));
    }
    let mut ids = HashSet::new();
    let mut new_nodes = HashSet::new();
    for (ty, peer) in changes {
        if peer.id == 0 || peer.node_id == 0 {
            return invalid(format!("peer {peer:?} without id or node"));
        }
        if !ids.insert(peer.id) {
            return invalid(format!("peer {} changed twice", peer.id));
        }
        let existing = region.peers.iter().find(|p| p.id == peer.id);
        match (ty, existing) {
            (ConfChangeType::RemoveNode, None) => {
                return invalid(format!("peer {} is not in the region", peer.id))
            }
            (ConfChangeType::RemoveNode, Some(p)) => {
                // raft-rs would keep such a voter in the outgoing half
                // only, a role the region meta cannot express.
                if changes.len() > 1 && p.role() == metapb::PeerRole::Voter {
                    return invalid(format!(
                        "voter {} must be demoted before it is removed with other changes",
                        peer.id
                    ));
                }
            }
            (_, Some(p)) if p.node_id != peer.node_id => {
                return invalid(format!(
                    "peer {} is on node {}, not {}",
                    peer.id, p.node_id, peer.node_id
                ))
            }
            (_, Some(_)) => {}
            (_, None) => {
                // Every replica of a region on a distinct node.
                if region.peers.iter().any(|p| p.node_id == peer.node_id)
                    || !new_nodes.insert(peer.node_id)
                {
                    return invalid(format!(
                        "node {} already has a replica of the region",
                        peer.node_id
                    ));
                }
            }
        }
    }
    Ok(())
}

/// The raft proposal of `changes` to `region`: a `ConfChangeV2` with
/// automatic transition whose context is the region's id and epoch with
/// the changed peers.
pub(crate) fn conf_change_proposal(
    region: &metapb::Region,
    changes: &[(ConfChangeType, metapb::Peer)],
) -> ConfChangeV2 {
    let mut cc = ConfChangeV2::default();
    // One change uses raft's simple protocol; several go through joint
    // consensus, which raft-rs leaves by itself once it is applied.
    cc.set_transition(ConfChangeTransition::Auto);
    for (ty, peer) in changes {
        let mut single = ConfChangeSingle::default();
        single.set_change_type(*ty);
        single.node_id = peer.id;
        cc.mut_changes().push(single);
    }
    let context = metapb::Region {
        id: region.id,
        region_epoch: region.region_epoch,
        peers: changes.iter().map(|(_, p)| *p).collect(),
        ..Default::default()
    };
    cc.set_context(context.encode_to_vec().into());
    cc
}

/// What a committed membership change did.
pub(crate) struct AppliedConfChange {
    /// The region meta after the change: new peers and roles, `conf_ver`
    /// one higher.
    pub region: metapb::Region,
    /// Raft's configuration after the change.
    pub conf_state: ConfState,
    /// This replica is no longer in the region.
    pub removed: bool,
}

/// Applies the committed membership change `e` of `region` (as of this
/// index) on replica `peer_id`: checks it, moves raft's configuration by
/// calling `raft_apply` (`RawNode::apply_conf_change`) and derives the new
/// region meta. An error leaves everything unchanged (see the module docs).
pub(crate) fn apply_conf_change(
    region: &metapb::Region,
    peer_id: u64,
    e: &Entry,
    raft_apply: impl FnOnce(&ConfChangeV2) -> raft::Result<ConfState>,
) -> Result<AppliedConfChange> {
    let cc = decode_conf_change(e)?;
    let new_peers = check_context(region, &cc)?;
    let cs = raft_apply(&cc)?;
    let mut region = region_with_conf_state(region, &cs, &new_peers);
    let mut epoch = region.region_epoch.unwrap_or_default();
    epoch.conf_ver += 1;
    region.region_epoch = Some(epoch);
    let removed = !region.peers.iter().any(|p| p.id == peer_id);
    Ok(AppliedConfChange {
        region,
        conf_state: cs,
        removed,
    })
}

/// The change of a membership entry, a v1 `ConfChange` read as a single
/// change.
fn decode_conf_change(e: &Entry) -> Result<ConfChangeV2> {
    let corrupted = |err: protobuf::ProtobufError| Error::Corrupted(err.to_string());
    if e.get_entry_type() == EntryType::EntryConfChange {
        let v1 = <ConfChange as protobuf::Message>::parse_from_bytes(&e.data).map_err(corrupted)?;
        let mut single = ConfChangeSingle::default();
        single.set_change_type(v1.get_change_type());
        single.node_id = v1.node_id;
        let mut cc = ConfChangeV2::default();
        cc.mut_changes().push(single);
        cc.set_context(v1.context.clone());
        Ok(cc)
    } else {
        <ConfChangeV2 as protobuf::Message>::parse_from_bytes(&e.data).map_err(corrupted)
    }
}

/// Checks `cc`'s context against `region` and returns the changed peers
/// (with their nodes) it names.
fn check_context(region: &metapb::Region, cc: &ConfChangeV2) -> Result<Vec<metapb::Peer>> {
    if cc.get_changes().is_empty() {
        // raft-rs's own proposal leaving a joint configuration: no
        // context, nothing to check against.
        return Ok(Vec::new());
    }
    let ctx = metapb::Region::decode(cc.get_context())?;
    if ctx.id != region.id || ctx.region_epoch != region.region_epoch {
        return Err(Error::EpochNotMatch {
            region_id: region.id,
            current: region.clone(),
        });
    }
    let matches = ctx.peers.len() == cc.get_changes().len()
        && ctx
            .peers
            .iter()
            .zip(cc.get_changes())
            .all(|(p, c)| p.id == c.node_id);
    if !matches {
        return Err(Error::Corrupted(
            "membership change context does not match its changes".into(),
        ));
    }
    Ok(ctx.peers)
}

/// `old`'s meta with its peers replaced by the members of `cs`, each with
/// the role `cs` gives it. Nodes come from `old` or, for new peers, from
/// `added`. Peer order is kept: old peers first, then new ones. A member of
/// `cs` found in neither is left out (and logged).
pub(crate) fn region_with_conf_state(
    old: &metapb::Region,
    cs: &ConfState,
    added: &[metapb::Peer],
) -> metapb::Region {
    use metapb::PeerRole;
    let incoming: HashSet<u64> = cs.voters.iter().copied().collect();
    let outgoing: HashSet<u64> = cs.voters_outgoing.iter().copied().collect();
    let learners: HashSet<u64> = cs.learners.iter().copied().collect();
    let joint = !outgoing.is_empty();
    let mut region = old.clone();
    region.peers.clear();
    let mut seen = HashSet::new();
    for p in old.peers.iter().chain(added) {
        if !seen.insert(p.id) {
            continue;
        }
        let role = if incoming.contains(&p.id) && (!joint || outgoing.contains(&p.id)) {
            PeerRole::Voter
        } else if incoming.contains(&p.id) {
            PeerRole::IncomingVoter
        } else if outgoing.contains(&p.id) {
            // Only in the outgoing half: becoming a learner (raft-rs's
            // learners_next); removing a voter in a joint change is refused.
            PeerRole::DemotingVoter
        } else if learners.contains(&p.id) {
            PeerRole::Learner
        } else {
            continue;
        };
        let mut peer = *p;
        peer.set_role(role);
        region.peers.push(peer);
    }
    for id in incoming.iter().chain(&outgoing).chain(&learners) {
        if !seen.contains(id) {
            error!(
                region_id = old.id,
                peer_id = id,
                "raft member without a node; left out"
            );
        }
    }
    region
}

/// The raft configuration `region`'s peer roles describe: what start-up
/// restores, so it always matches the applied index (the region meta is
/// written with the apply state).
pub(crate) fn conf_state_from_region(region: &metapb::Region) -> ConfState {
    use metapb::PeerRole;
    let ids = |roles: &[PeerRole]| -> Vec<u64> {
        region
            .peers
            .iter()
            .filter(|p| roles.contains(&p.role()))
            .map(|p| p.id)
            .collect()
    };
    let mut cs = ConfState {
        voters: ids(&[PeerRole::Voter, PeerRole::IncomingVoter]),
        learners: ids(&[PeerRole::Learner]),
        ..Default::default()
    };
    let joint = region
        .peers
        .iter()
        .any(|p| matches!(p.role(), PeerRole::IncomingVoter | PeerRole::DemotingVoter));
    if joint {
        cs.voters_outgoing = ids(&[PeerRole::Voter, PeerRole::DemotingVoter]);
        cs.learners_next = ids(&[PeerRole::DemotingVoter]);
        // Every joint change here is proposed with automatic leave.
        cs.auto_leave = true;
    }
    cs
}
