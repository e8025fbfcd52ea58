//! The etcd-facing server of a node.
//!
//! [`node::start`] opens the node's engines, joins or bootstraps the cluster
//! through the placement driver (embedded in dev mode), and serves etcd's
//! gRPC services plus etcd's HTTP `/version` and `/health` on the client
//! URLs. KV, Maintenance (with etcd's alarms, kept in PD: [`alarm`]),
//! Cluster, Watch ([`watch`]) and Lease ([`lease`]; keys cannot be
//! attached to leases yet) are served here; services not built yet (Auth,
//! Lock, Election) answer gRPC `Unimplemented`.
//! Request errors carry etcd's codes and texts ([`errors`]). Raft messages
//! between nodes travel over gRPC on the peer URLs ([`raft_transport`]), and
//! so do requests forwarded to the node holding a region's leader
//! ([`forward`]): every node serves every request.

pub mod alarm;
pub mod cluster;
pub mod config;
pub mod errors;
pub mod forward;
mod heartbeat;
mod http;
pub mod kv;
pub mod lease;
pub mod maintenance;
pub mod node;
mod raft_snapshot;
pub mod raft_transport;
mod split_check;
pub mod units;
pub mod watch;

use std::sync::Arc;

use pd::PdClient;
use proto::etcdserverpb::ResponseHeader;
use raftstore::{NodeIdent, PeerStatus};
use router::Router;

pub use config::Config;

/// What every service of a node shares.
pub struct NodeContext {
    pub router: Arc<Router>,
    pub pd: Arc<dyn PdClient>,
    pub ident: NodeIdent,
    pub config: Config,
    /// Sizes of the regions this node leads, for heartbeats.
    pub region_sizes: Arc<split_check::RegionSizes>,
    /// This node's copy of the cluster's alarms (see `alarm`).
    pub alarms: Arc<alarm::Alarms>,
}

impl NodeContext {
    /// Status of the region this node reports for node-wide fields (raft
    /// term, index, leader): the one covering the start of the keyspace.
    pub fn main_region_status(&self) -> PeerStatus {
        self.router
            .first_local_replica()
            .map(|r| r.status())
            .unwrap_or_default()
    }

    /// A complete header at the oracle's current revision, for responses
    /// that read no keys.
    pub async fn current_header(&self) -> Result<Option<ResponseHeader>, tonic::Status> {
        let mut header = Some(ResponseHeader {
            revision: self
                .router
                .current_revision()
                .await
                .map_err(errors::status)?,
            ..Default::default()
        });
        self.fill_header(&mut header);
        Ok(header)
    }

    /// Sets the cluster, member and raft term fields of a response header.
    pub fn fill_header(&self, header: &mut Option<ResponseHeader>) {
        let h = header.get_or_insert_with(ResponseHeader::default);
        h.cluster_id = self.ident.cluster_id;
        h.member_id = self.ident.node_id;
        h.raft_term = self.router.first_local_replica().map_or(0, |r| r.term());
    }
}
