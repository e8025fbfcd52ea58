//! How a node's replicas reach their peers on other nodes.
//!
//! A [`Transport`] carries [`RaftMessage`]s addressed by `to_peer.node_id`;
//! the receiving node hands each to [`crate::Store::on_raft_message`].
//! Delivery is best effort: raft tolerates loss, duplication and reordering,
//! so an implementation may drop a message rather than block a replica.

use proto::raft_serverpb::RaftMessage;
use tracing::debug;

/// Sends raft messages to other nodes. Called from replica threads, so
/// `send` must not block on the network.
pub trait Transport: Send + Sync {
    fn send(&self, msg: RaftMessage);
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
}
