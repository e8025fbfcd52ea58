//! Raft messages between the replicas of a region: what a replica accepts
//! from the transport before raft sees it, and how it addresses what raft
//! sends.
//!
//! Whatever a peer sends, a bad message is logged and dropped (never an
//! error): one faulty node must not stop this one. Contract of the checks,
//! in the order the replica runs them:
//! * [`admit_sender`]: a message for another region or another replica is
//!   dropped, and so is one from a peer that is not a member of the region,
//!   except in two cases, where the sender must have an id and a node:
//!   - on a replica created on demand (no data yet), which knows no members
//!     until its snapshot arrives and must answer whoever leads: the sender
//!     is to be added to its peers (before the payload is checked);
//!   - from a newer membership (a higher `conf_ver` than this replica's): a
//!     replica that missed the changes adding a peer must still take that
//!     peer's messages, which may be the only way it hears of them (the
//!     peer may lead by now, and the peers it knows be gone). The sender
//!     goes into the replica's cache of newer peers ([`Strangers`]), where
//!     [`envelope`] finds it to answer; the region's peers change only as
//!     the replica applies the changes.
//! * [`decode_payload`]: an undecodable payload is dropped, and so is one
//!   whose endpoints differ from the envelope's: the envelope is what
//!   routing trusted, and a payload claiming other endpoints would let raft
//!   attribute it to the wrong peer. A message that passes counts as
//!   hearing from its sender.
//! * [`check_snapshot`]: once raft accepts a snapshot it must be installed,
//!   so a snapshot's data is decoded and validated before raft sees it; a
//!   malformed one, or one whose region meta does not include this replica,
//!   is dropped. A valid one is kept (with its index and term) so that it
//!   is not decoded again when raft hands it back for installing. The data
//!   is read from the snapshot file the transport received before the
//!   message (see `snapshot::file`): a message whose file is not here is
//!   dropped too.
//!
//! Outgoing ([`envelope`]): a message carries the region id and epoch and
//! both endpoints with their nodes (the transport routes by
//! `to_peer.node_id`); one to a peer neither in the region nor among the
//! newer peers heard from, or that cannot be encoded, is dropped.
//!
//! Removed replicas: a leader stops sending to a peer once it removed it,
//! so a replica cut off while it was removed never applies its removal and
//! campaigns for ever (and its node keeps routing the region's reads to
//! it). A message dropped as coming from a non-member is therefore checked
//! by [`from_removed_peer`]: if this replica is initialized and its region
//! is at a newer membership (higher `conf_ver`) than the sender's epoch, the
//! sender was removed — memberships form one sequence of committed changes,
//! conf_ver counts them, and peer ids are never reused — and it gets
//! [`tombstone_reply`], carrying this replica's epoch. A replica taking such
//! a reply ([`ends_replica`]: addressed to it, for its region, with a newer
//! conf_ver than its own) tombstones itself and deletes its data, as if it
//! had applied its removal. A new peer is never told so: it is added at a
//! newer membership than any replica that does not know it yet.
//! A removed learner never campaigns, so nobody answers it; it ends when
//! its node is given the region again: a message to a newer (higher) peer
//! id of the region on this node, from a newer membership, also ends the
//! replica ([`ends_replica`]) — one node never holds two peers of a region
//! — and the next message creates the new peer's replica.

use proto::metapb;
use proto::raft_serverpb::RaftMessage;
use raft::eraftpb::{Message, MessageType};
use tracing::{debug, error, warn};

use crate::snapshot::{self, RegionSnapshot, SnapDir};

/// The sender of a message this replica takes.
pub(crate) struct Sender {
    pub peer: metapb::Peer,
    pub kind: SenderKind,
}

/// How a replica knows the sender of a message it takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SenderKind {
    /// A member of the region.
    Member,
    /// Not a member yet: to be added to the region's peers (a replica
    /// created on demand only).
    NewMember,
    /// A peer of a newer membership than this replica's: to be kept in its
    /// [`Strangers`].
    Newer,
}

/// Peers of newer memberships than a replica's, which it heard from but
/// does not know as members yet (see the module docs), by peer id. Only
/// for addressing answers: it never changes who the region's members are.
/// Emptied whenever the replica's region changes, as it may then know
/// them; one that still leads is back with its next message.
#[derive(Default)]
pub(crate) struct Strangers(Vec<metapb::Peer>);

impl Strangers {
    /// Keeps `peer` (replacing an entry with its id).
    pub fn insert(&mut self, peer: metapb::Peer) {
        self.0.retain(|p| p.id != peer.id);
        self.0.push(peer);
    }

    pub fn clear(&mut self) {
        self.0.clear();
    }

    fn get(&self, id: u64) -> Option<metapb::Peer> {
        self.0.iter().find(|p| p.id == id).copied()
    }
}

/// Whether replica `peer_id` of `region` (`initialized`: it has its
/// region's data) takes `msg` from its sender (see the module docs).
pub(crate) fn admit_sender(
    region: &metapb::Region,
    peer_id: u64,
    initialized: bool,
    msg: &RaftMessage,
) -> Option<Sender> {
    let region_id = region.id;
    let from_peer = msg.from_peer.unwrap_or_default();
    let to_peer = msg.to_peer.unwrap_or_default();
    if msg.region_id != region_id || to_peer.id != peer_id {
        debug!(
            region_id,
            msg_region = msg.region_id,
            to = to_peer.id,
            "raft message for another replica; dropped"
        );
        return None;
    }
    let kind = if region.peers.iter().any(|p| p.id == from_peer.id) {
        Some(SenderKind::Member)
    } else if from_peer.id == 0 || from_peer.node_id == 0 {
        None
    } else if !initialized {
        // A replica created on demand knows no members until its snapshot
        // arrives; it must be able to answer whoever leads.
        Some(SenderKind::NewMember)
    } else if conf_ver(msg.region_epoch) > conf_ver(region.region_epoch) {
        Some(SenderKind::Newer)
    } else {
        None
    };
    let Some(kind) = kind else {
        debug!(
            region_id,
            from = from_peer.id,
            "raft message from a non-member; dropped"
        );
        return None;
    };
    Some(Sender {
        peer: from_peer,
        kind,
    })
}

/// The raft message inside `msg`, sent by peer `from` to replica `peer_id`
/// of region `region_id`, if it decodes and names the envelope's endpoints.
pub(crate) fn decode_payload(
    region_id: u64,
    peer_id: u64,
    from: u64,
    msg: &RaftMessage,
) -> Option<Message> {
    let m = match <Message as protobuf::Message>::parse_from_bytes(&msg.message) {
        Ok(m) => m,
        Err(e) => {
            warn!(region_id, from, "undecodable raft message dropped: {e}");
            return None;
        }
    };
    if m.from != from || m.to != peer_id {
        warn!(
            region_id,
            from,
            msg_from = m.from,
            msg_to = m.to,
            "raft message with mismatched endpoints dropped"
        );
        return None;
    }
    Some(m)
}

/// What [`check_snapshot`] found.
pub(crate) enum SnapshotCheck {
    /// Not a snapshot message.
    NotSnapshot,
    /// A valid region snapshot: its index, term and decoded data.
    Valid(u64, u64, Box<RegionSnapshot>),
    /// To be dropped (logged).
    Rejected,
}

/// Validates the region snapshot `m` carries, if any, for replica
/// `peer_id` of region `region_id` (see the module docs).
pub(crate) fn check_snapshot(
    region_id: u64,
    peer_id: u64,
    from: u64,
    m: &Message,
    dir: &SnapDir,
) -> SnapshotCheck {
    if m.get_msg_type() != MessageType::MsgSnapshot {
        return SnapshotCheck::NotSnapshot;
    }
    let meta = m.get_snapshot().get_metadata();
    match snapshot::decode_data(region_id, m.get_snapshot(), dir) {
        Ok(snap) if !snap.region.peers.iter().any(|p| p.id == peer_id) => {
            warn!(
                region_id,
                from,
                index = meta.index,
                "region snapshot without this replica dropped"
            );
            SnapshotCheck::Rejected
        }
        Ok(snap) => SnapshotCheck::Valid(meta.index, meta.term, Box::new(snap)),
        Err(e) => {
            warn!(
                region_id,
                from,
                index = meta.index,
                "malformed region snapshot dropped: {e}"
            );
            SnapshotCheck::Rejected
        }
    }
}

/// The envelope of `m`, sent by `from_peer` (this replica, as the region
/// meta knows it) of `region` to a member or one of `strangers`, or `None`
/// (logged) if it is to be dropped.
pub(crate) fn envelope(
    region: &metapb::Region,
    strangers: &Strangers,
    from_peer: Option<metapb::Peer>,
    m: &Message,
) -> Option<RaftMessage> {
    let region_id = region.id;
    let member = region.peers.iter().find(|p| p.id == m.to).copied();
    let Some(to_peer) = member.or_else(|| strangers.get(m.to)) else {
        warn!(
            region_id,
            to = m.to,
            "raft message to a peer not in the region; dropped"
        );
        return None;
    };
    let message = match protobuf::Message::write_to_bytes(m) {
        Ok(b) => b,
        Err(e) => {
            error!(region_id, to = m.to, "cannot encode raft message: {e}");
            return None;
        }
    };
    Some(RaftMessage {
        region_id,
        from_peer,
        to_peer: Some(to_peer),
        region_epoch: region.region_epoch,
        message,
        is_tombstone: false,
        hash_report: None,
    })
}

/// Whether `msg`, which [`admit_sender`] dropped, comes from a replica
/// removed from `region` (see the module docs).
pub(crate) fn from_removed_peer(
    region: &metapb::Region,
    initialized: bool,
    msg: &RaftMessage,
) -> bool {
    let from = msg.from_peer.unwrap_or_default();
    initialized
        && !msg.is_tombstone
        && msg.region_id == region.id
        && from.id != 0
        && from.node_id != 0
        && !region.peers.iter().any(|p| p.id == from.id)
        && conf_ver(msg.region_epoch) < conf_ver(region.region_epoch)
}

/// The answer to `msg`, from a replica removed from `region` (see
/// [`from_removed_peer`]), sent by this node's `self_peer`.
pub(crate) fn tombstone_reply(
    region: &metapb::Region,
    self_peer: Option<metapb::Peer>,
    msg: &RaftMessage,
) -> RaftMessage {
    RaftMessage {
        region_id: region.id,
        from_peer: self_peer,
        to_peer: msg.from_peer,
        region_epoch: region.region_epoch,
        message: Vec::new(),
        is_tombstone: true,
        hash_report: None,
    }
}

/// Whether `msg` tells replica `peer_id` of `region` that it was removed
/// (see the module docs).
pub(crate) fn ends_replica(region: &metapb::Region, peer_id: u64, msg: &RaftMessage) -> bool {
    let to = msg.to_peer.unwrap_or_default().id;
    let addressed = if msg.is_tombstone {
        to == peer_id
    } else {
        to > peer_id
    };
    addressed
        && msg.region_id == region.id
        && conf_ver(msg.region_epoch) > conf_ver(region.region_epoch)
}

fn conf_ver(epoch: Option<metapb::RegionEpoch>) -> u64 {
    epoch.unwrap_or_default().conf_ver
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(id: u64, node_id: u64) -> metapb::Peer {
        metapb::Peer {
            id,
            node_id,
            role: 0,
        }
    }

    fn region() -> metapb::Region {
        metapb::Region {
            id: 7,
            peers: vec![peer(1, 1), peer(2, 2)],
            region_epoch: Some(metapb::RegionEpoch {
                conf_ver: 3,
                version: 1,
            }),
            ..Default::default()
        }
    }

    fn raft_msg(from: u64, to: u64) -> Message {
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgHeartbeat);
        m.from = from;
        m.to = to;
        m
    }

    fn wrapped(from: metapb::Peer, to: metapb::Peer, m: &Message) -> RaftMessage {
        RaftMessage {
            region_id: 7,
            from_peer: Some(from),
            to_peer: Some(to),
            region_epoch: None,
            message: protobuf::Message::write_to_bytes(m).unwrap(),
            is_tombstone: false,
            hash_report: None,
        }
    }

    fn at_conf_ver(mut msg: RaftMessage, conf_ver: u64) -> RaftMessage {
        msg.region_epoch = Some(metapb::RegionEpoch {
            conf_ver,
            version: 1,
        });
        msg
    }

    #[test]
    fn only_a_removed_peer_is_told_and_only_a_newer_membership_ends_a_replica() {
        let r = region();
        // Peer 9 at conf_ver 2 is not in the region at 3: removed.
        let removed = at_conf_ver(wrapped(peer(9, 9), peer(1, 1), &raft_msg(9, 1)), 2);
        assert!(from_removed_peer(&r, true, &removed));
        // Not while this replica has no data, nor for a sender as new as
        // this replica (or newer: added since, not known here yet).
        assert!(!from_removed_peer(&r, false, &removed));
        let same = at_conf_ver(removed.clone(), 3);
        assert!(!from_removed_peer(&r, true, &same));
        assert!(!from_removed_peer(
            &r,
            true,
            &at_conf_ver(removed.clone(), 4)
        ));
        // A member is never told.
        let member = at_conf_ver(wrapped(peer(2, 2), peer(1, 1), &raft_msg(2, 1)), 2);
        assert!(!from_removed_peer(&r, true, &member));

        let reply = tombstone_reply(&r, Some(peer(1, 1)), &removed);
        assert!(reply.is_tombstone && reply.message.is_empty());
        assert_eq!(reply.to_peer, Some(peer(9, 9)));
        // The removed replica (region 7 at conf_ver 2, peer 9) ends on it.
        let mut old = r.clone();
        old.peers.push(peer(9, 9));
        old.region_epoch = Some(metapb::RegionEpoch {
            conf_ver: 2,
            version: 1,
        });
        assert!(ends_replica(&old, 9, &reply));
        assert!(!ends_replica(&old, 1, &reply), "addressed to another peer");
        assert!(!ends_replica(&r, 9, &reply), "not newer than the replica");
        // A message for a newer peer of the region here, from a newer
        // membership, ends the old one; not one for an older peer.
        let newer = at_conf_ver(wrapped(peer(1, 1), peer(10, 9), &raft_msg(1, 10)), 4);
        assert!(ends_replica(&old, 9, &newer));
        let older = at_conf_ver(wrapped(peer(1, 1), peer(8, 9), &raft_msg(1, 8)), 4);
        assert!(!ends_replica(&old, 9, &older));
        assert!(!ends_replica(&old, 9, &at_conf_ver(newer, 2)));
    }

    #[test]
    fn admits_members_and_strangers_only_to_a_new_replica_or_from_a_newer_membership() {
        let m = raft_msg(2, 1);
        let msg = wrapped(peer(2, 2), peer(1, 1), &m);
        let s = admit_sender(&region(), 1, true, &msg).unwrap();
        assert_eq!((s.peer.id, s.kind), (2, SenderKind::Member));
        let mut other = msg.clone();
        other.region_id = 8;
        assert!(admit_sender(&region(), 1, true, &other).is_none());
        assert!(admit_sender(&region(), 3, true, &msg).is_none());

        let stranger = wrapped(peer(9, 9), peer(1, 1), &raft_msg(9, 1));
        assert!(admit_sender(&region(), 1, true, &stranger).is_none());
        let s = admit_sender(&region(), 1, false, &stranger).unwrap();
        assert_eq!((s.peer.id, s.kind), (9, SenderKind::NewMember));
        let no_node = wrapped(peer(9, 0), peer(1, 1), &raft_msg(9, 1));
        assert!(admit_sender(&region(), 1, false, &no_node).is_none());

        // The region is at conf_ver 3: a stranger at 4 is from a newer
        // membership, one at 3 or older is not.
        let newer = at_conf_ver(stranger.clone(), 4);
        let s = admit_sender(&region(), 1, true, &newer).unwrap();
        assert_eq!((s.peer.id, s.kind), (9, SenderKind::Newer));
        assert!(admit_sender(&region(), 1, true, &at_conf_ver(stranger, 3)).is_none());
        let no_node = at_conf_ver(no_node, 4);
        assert!(admit_sender(&region(), 1, true, &no_node).is_none());
    }

    #[test]
    fn payload_must_name_the_envelope_endpoints() {
        let msg = wrapped(peer(2, 2), peer(1, 1), &raft_msg(2, 1));
        assert_eq!(decode_payload(7, 1, 2, &msg).map(|m| m.from), Some(2));
        let forged = wrapped(peer(2, 2), peer(1, 1), &raft_msg(3, 1));
        assert!(decode_payload(7, 1, 2, &forged).is_none());
        let mut garbage = msg;
        garbage.message = vec![0xFF; 3];
        assert!(decode_payload(7, 1, 2, &garbage).is_none());
    }

    #[test]
    fn snapshots_are_checked_before_raft_sees_them() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = SnapDir::open(tmp.path(), &[]).unwrap();
        assert!(matches!(
            check_snapshot(7, 1, 2, &raft_msg(2, 1), &dir),
            SnapshotCheck::NotSnapshot
        ));
        let mut m = raft_msg(2, 1);
        m.set_msg_type(MessageType::MsgSnapshot);
        m.mut_snapshot().set_data(b"not a snapshot".to_vec().into());
        assert!(matches!(
            check_snapshot(7, 1, 2, &m, &dir),
            SnapshotCheck::Rejected
        ));
        // A descriptor of a file that never arrived.
        let desc = snapshot::Descriptor {
            region_id: 7,
            index: 0,
            term: 0,
            size: 3,
            crc32: 1,
        };
        m.mut_snapshot().set_data(desc.encode().into());
        assert!(matches!(
            check_snapshot(7, 1, 2, &m, &dir),
            SnapshotCheck::Rejected
        ));
    }

    #[test]
    fn envelope_addresses_members_and_newer_peers_heard_from() {
        let mut strangers = Strangers::default();
        let env = envelope(&region(), &strangers, Some(peer(1, 1)), &raft_msg(1, 2)).unwrap();
        assert_eq!(env.to_peer, Some(peer(2, 2)));
        assert_eq!(env.region_epoch, region().region_epoch);
        let to_9 = raft_msg(1, 9);
        assert!(envelope(&region(), &strangers, Some(peer(1, 1)), &to_9).is_none());
        strangers.insert(peer(9, 5));
        let env = envelope(&region(), &strangers, Some(peer(1, 1)), &to_9).unwrap();
        assert_eq!(env.to_peer, Some(peer(9, 5)));
        strangers.clear();
        assert!(envelope(&region(), &strangers, Some(peer(1, 1)), &to_9).is_none());
    }
}
