//! How a node's replicas reach their peers on other nodes.
//!
//! A [`Transport`] carries [`RaftMessage`]s addressed by `to_peer.node_id`;
//! the receiving node hands each to [`crate::Store::on_raft_message`].
//! Delivery is best effort: raft tolerates loss, duplication and reordering,
//! so an implementation may drop a message rather than block a replica.

use std::path::PathBuf;

use proto::raft_serverpb::RaftMessage;
use tracing::debug;

/// Told whether a region snapshot reached the other node (`true`: the
/// file and the message were both handed over).
pub type SnapshotDone = Box<dyn FnOnce(bool) + Send>;

/// Sends raft messages to other nodes. Called from replica threads, so
/// neither method may block on the network.
pub trait Transport: Send + Sync {
    fn send(&self, msg: RaftMessage);

    /// Sends `msg`, a raft `MsgSnapshot` whose data is the descriptor of
    /// the region snapshot file at `path` (see `snapshot::file`), with the
    /// file: its bytes in chunks to the other node's
    /// [`crate::Store::snapshot_sink`], then, once that file is complete,
    /// `msg` to its [`crate::Store::on_raft_message`]. `done` is called
    /// once, from any thread, when that happened or failed.
    fn send_snapshot(&self, msg: RaftMessage, path: PathBuf, done: SnapshotDone);
}

/// The transport of a node that has no peers to talk to (single-replica
/// regions, tools): every message is dropped.
#[derive(Clone, Copy, Debug, Default)]
pub struct DropTransport;

impl Transport for DropTransport {
    fn send(&self, msg: RaftMessage) {
        debug!(
            region_id = msg.region_id,
            to_node = msg.to_peer.map(|p| p.node_id),
            "no transport; raft message dropped"
        );
    }

    fn send_snapshot(&self, msg: RaftMessage, _path: PathBuf, done: SnapshotDone) {
        self.send(msg);
        done(false);
    }
}
