//! A replica's raft messages: those a peer sent it, checked by `message`
//! before raft steps them (with a region snapshot validated on arrival and
//! kept for installing), and those raft sends, addressed by `message`
//! (a region snapshot goes with its file).

use proto::raft_serverpb::RaftMessage;
use raft::eraftpb::MessageType;
use raft::SnapshotStatus;
use tracing::{debug, error, info};

use super::Peer;
use crate::message::{self, SenderKind, SnapshotCheck};
use crate::msg::PeerMsg;
use crate::snapshot;
use crate::transport::SnapshotDone;

impl Peer {
    /// Steps a peer's message into raft once the `message` module's checks
    /// admit it; a bad message is logged and dropped.
    pub(super) fn on_raft_message(&mut self, msg: RaftMessage) {
        let region_id = self.region.id;
        let initialized = self.is_initialized();
        if message::ends_replica(&self.region, self.peer_id, &msg) {
            self.remove_stale();
            return;
        }
        if msg.is_tombstone {
            return;
        }
        let Some(sender) = message::admit_sender(&self.region, self.peer_id, initialized, &msg)
        else {
            if message::from_removed_peer(&self.region, initialized, &msg) {
                let me = self.region.peers.iter().find(|p| p.id == self.peer_id);
                let reply = message::tombstone_reply(&self.region, me.copied(), &msg);
                self.transport.send(reply);
            }
            return;
        };
        let from = sender.peer.id;
        if let Some(report) = msg.hash_report {
            // No raft payload: a member's hash for the consistency check.
            if matches!(sender.kind, SenderKind::Member) {
                self.on_hash_report(from, report);
            }
            return;
        }
        match sender.kind {
            SenderKind::Member => {}
            SenderKind::NewMember => self.region.peers.push(sender.peer),
            SenderKind::Newer => self.strangers.insert(sender.peer),
        }
        let Some(m) = message::decode_payload(region_id, self.peer_id, from, &msg) else {
            return;
        };
        self.last_heard.heard(from);
        let Some(host) = self.host.upgrade() else {
            return;
        };
        match message::check_snapshot(region_id, self.peer_id, from, &m, host.snap_dir()) {
            SnapshotCheck::NotSnapshot => {}
            SnapshotCheck::Valid(index, term, snap) => {
                if let Some(other) = host.overlapping(&snap.region) {
                    let making_room = host.make_room_for(&snap);
                    debug!(
                        region_id,
                        from,
                        other,
                        making_room,
                        "region snapshot overlapping another replica here dropped"
                    );
                    self.drop_snapshot_file(snap.file.as_deref());
                    return;
                }
                let replaced = self.incoming_snapshot.replace((index, term, *snap));
                self.drop_snapshot_file(replaced.and_then(|(_, _, s)| s.file).as_deref());
            }
            SnapshotCheck::Rejected => {
                let file = snapshot::received_file(m.get_snapshot(), host.snap_dir());
                self.drop_snapshot_file(file.as_deref());
                return;
            }
        }
        if let Err(e) = self.raw.step(m) {
            debug!(region_id, from, "raft rejected a message: {e}");
        }
        if self.raw.raft.raft_log.unstable_snapshot().is_none() {
            // Not accepted (stale, or not a snapshot): nothing to keep.
            let dropped = self.incoming_snapshot.take();
            self.drop_snapshot_file(dropped.and_then(|(_, _, s)| s.file).as_deref());
        }
    }

    /// Deletes a received snapshot file that will not be installed, unless
    /// the snapshot kept for installing is read from it: a copy of one
    /// snapshot arrives under the same name as the first.
    fn drop_snapshot_file(&self, file: Option<&std::path::Path>) {
        let Some(file) = file else { return };
        let kept = self
            .incoming_snapshot
            .as_ref()
            .and_then(|(_, _, s)| s.file.as_deref());
        if kept != Some(file) {
            snapshot::remove_file(file);
        }
    }

    pub(super) fn send_messages(&mut self, msgs: Vec<raft::eraftpb::Message>) {
        if msgs.is_empty() {
            return;
        }
        let region_id = self.region.id;
        let from_peer = self
            .region
            .peers
            .iter()
            .find(|p| p.id == self.peer_id)
            .copied();
        for m in msgs {
            let Some(msg) = message::envelope(&self.region, &self.strangers, from_peer, &m) else {
                if m.get_msg_type() == MessageType::MsgSnapshot {
                    self.raw.report_snapshot(m.to, SnapshotStatus::Failure);
                }
                continue;
            };
            if m.get_msg_type() != MessageType::MsgSnapshot {
                self.transport.send(msg);
                continue;
            }
            // The file goes with the message; raft sends the follower
            // nothing else until it hears how that went.
            let to = m.to;
            let sent = self.host.upgrade().and_then(|host| {
                let desc = snapshot::Descriptor::decode(m.get_snapshot().get_data()).ok()?;
                Some(host.snap_dir().generated(&desc))
            });
            let Some(path) = sent else {
                error!(region_id, to, "region snapshot without a file; not sent");
                self.raw.report_snapshot(to, SnapshotStatus::Failure);
                continue;
            };
            info!(region_id, to, path = %path.display(), "sending region snapshot");
            let host = self.host.clone();
            let done: SnapshotDone = Box::new(move |ok| {
                let handle = host.upgrade().and_then(|h| h.region(region_id));
                if let Some(handle) = handle {
                    let _ = handle.send(PeerMsg::SnapshotSent { to, ok });
                }
            });
            self.transport.send_snapshot(msg, path, done);
        }
    }
}
