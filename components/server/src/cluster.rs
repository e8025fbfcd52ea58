//! etcdserverpb.Cluster: etcd membership mapped onto MetaStore nodes, as the
//! placement driver records them.
//!
//! - MemberList: every node that is up (etcd clients auto-discover their
//!   endpoints from the client URLs). A member added but not started yet has
//!   no name and no client URLs, as in etcd.
//! - MemberAdd: registers a node under a new id with the given peer URLs; a
//!   `metastore-node` started with `--pd-endpoints` and that advertise peer
//!   URL takes that id. PD places no replica on it before it starts.
//! - MemberRemove: decommissions the node: PD marks it offline, its
//!   replicas are moved to other nodes (or, with no spare node, dropped
//!   while the others keep a quorum), then it becomes a tombstone.
//! - MemberUpdate: changes the node's peer URLs.
//! - MemberPromote: MetaStore has no learner members (replicas are learners
//!   only while they catch up, which PD handles), so it fails as etcd does
//!   for a member that is not a learner.

use std::sync::Arc;

use proto::etcdserverpb::cluster_server::Cluster;
use proto::etcdserverpb::*;
use proto::metapb::{self, NodeState};
use tonic::{Request, Response, Status};

use crate::errors;
use crate::NodeContext;

pub struct ClusterService {
    ctx: Arc<NodeContext>,
}

impl ClusterService {
    pub fn new(ctx: Arc<NodeContext>) -> ClusterService {
        ClusterService { ctx }
    }

    async fn nodes(&self) -> Result<Vec<metapb::Node>, Status> {
        self.ctx
            .pd
            .get_all_nodes()
            .await
            .map_err(|e| errors::status(router::Error::Pd(e)))
    }

    /// The up node `id`, or etcd's "member not found".
    async fn member_node(&self, id: u64) -> Result<metapb::Node, Status> {
        match self.ctx.pd.get_node(id).await {
            Ok(Some(n)) if n.state() == NodeState::Up => Ok(n),
            Ok(_) => Err(Status::not_found(errors::MEMBER_NOT_FOUND)),
            Err(e) => Err(errors::status(router::Error::Pd(e))),
        }
    }

    async fn put_node(&self, node: metapb::Node) -> Result<(), Status> {
        self.ctx
            .pd
            .put_node(node)
            .await
            .map_err(|e| errors::status(router::Error::Pd(e)))
    }

    async fn members(&self) -> Result<Vec<Member>, Status> {
        Ok(self
            .nodes()
            .await?
            .into_iter()
            .filter(|n| n.state() == NodeState::Up)
            .map(member)
            .collect())
    }
}

fn member(n: metapb::Node) -> Member {
    Member {
        id: n.id,
        name: n.name,
        peer_ur_ls: n.peer_urls,
        client_ur_ls: n.client_urls,
        is_learner: false,
    }
}

fn check_urls(urls: &[String]) -> Result<(), Status> {
    let valid = |u: &String| {
        (u.starts_with("http://") || u.starts_with("https://"))
            // As etcd: scheme://host:port and nothing else.
            && u.parse::<tonic::transport::Uri>().is_ok_and(|uri| {
                uri.host().is_some_and(|h| !h.is_empty())
                    && uri.port_u16().is_some()
                    && matches!(uri.path(), "" | "/")
                    && uri.query().is_none()
            })
    };
    if urls.is_empty() || !urls.iter().all(valid) {
        return Err(Status::invalid_argument(errors::MEMBER_BAD_URLS));
    }
    Ok(())
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn member_add(
        &self,
        req: Request<MemberAddRequest>,
    ) -> Result<Response<MemberAddResponse>, Status> {
        let req = req.into_inner();
        if req.is_learner {
            return Err(Status::unimplemented(
                "learner members are not supported: a node's replicas are learners only while they catch up",
            ));
        }
        check_urls(&req.peer_ur_ls)?;
        let nodes = self.nodes().await?;
        let taken = nodes.iter().any(|n| {
            n.state() != NodeState::Tombstone
                && n.peer_urls.iter().any(|u| req.peer_ur_ls.contains(u))
        });
        if taken {
            return Err(Status::failed_precondition(errors::PEER_URL_EXISTS));
        }
        let id = self
            .ctx
            .pd
            .alloc_id()
            .await
            .map_err(|e| errors::status(router::Error::Pd(e)))?;
        let node = metapb::Node {
            id,
            name: String::new(),
            peer_urls: req.peer_ur_ls,
            client_urls: Vec::new(),
            state: NodeState::Up as i32,
        };
        self.put_node(node.clone()).await?;
        tracing::info!(node_id = id, "member added; waiting for the node to start");
        let members = self.members().await?;
        let header = self.ctx.current_header().await?;
        Ok(Response::new(MemberAddResponse {
            header,
            member: Some(member(node)),
            members,
        }))
    }

    async fn member_remove(
        &self,
        req: Request<MemberRemoveRequest>,
    ) -> Result<Response<MemberRemoveResponse>, Status> {
        let mut node = self.member_node(req.get_ref().id).await?;
        let up = self
            .nodes()
            .await?
            .iter()
            .filter(|n| n.state() == NodeState::Up && !n.client_urls.is_empty())
            .count();
        if up <= 1 && !node.client_urls.is_empty() {
            return Err(Status::failed_precondition(
                "etcdserver: re-configuration failed due to not enough started members",
            ));
        }
        node.state = NodeState::Offline as i32;
        self.put_node(node).await?;
        tracing::info!(
            node_id = req.get_ref().id,
            "member removed; draining its replicas"
        );
        let members = self.members().await?;
        let header = self.ctx.current_header().await?;
        Ok(Response::new(MemberRemoveResponse { header, members }))
    }

    async fn member_update(
        &self,
        req: Request<MemberUpdateRequest>,
    ) -> Result<Response<MemberUpdateResponse>, Status> {
        let req = req.into_inner();
        check_urls(&req.peer_ur_ls)?;
        let mut node = self.member_node(req.id).await?;
        let taken = self.nodes().await?.iter().any(|n| {
            n.id != req.id
                && n.state() != NodeState::Tombstone
                && n.peer_urls.iter().any(|u| req.peer_ur_ls.contains(u))
        });
        if taken {
            return Err(Status::failed_precondition(errors::PEER_URL_EXISTS));
        }
        node.peer_urls = req.peer_ur_ls;
        self.put_node(node).await?;
        let members = self.members().await?;
        let header = self.ctx.current_header().await?;
        Ok(Response::new(MemberUpdateResponse { header, members }))
    }

    async fn member_list(
        &self,
        _req: Request<MemberListRequest>,
    ) -> Result<Response<MemberListResponse>, Status> {
        let members = self.members().await?;
        let header = self.ctx.current_header().await?;
        Ok(Response::new(MemberListResponse { header, members }))
    }

    async fn member_promote(
        &self,
        req: Request<MemberPromoteRequest>,
    ) -> Result<Response<MemberPromoteResponse>, Status> {
        self.member_node(req.get_ref().id).await?;
        Err(Status::failed_precondition(errors::MEMBER_NOT_LEARNER))
    }
}
