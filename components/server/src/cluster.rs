//! etcdserverpb.Cluster: membership as the placement driver knows it.

use std::sync::Arc;

use proto::etcdserverpb::cluster_server::Cluster;
use proto::etcdserverpb::*;
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
}

const MEMBERSHIP_LATER: &str = "membership changes need a multi-node cluster (not supported yet)";

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn member_add(
        &self,
        _req: Request<MemberAddRequest>,
    ) -> Result<Response<MemberAddResponse>, Status> {
        Err(Status::unimplemented(MEMBERSHIP_LATER))
    }

    async fn member_remove(
        &self,
        _req: Request<MemberRemoveRequest>,
    ) -> Result<Response<MemberRemoveResponse>, Status> {
        Err(Status::unimplemented(MEMBERSHIP_LATER))
    }

    async fn member_update(
        &self,
        _req: Request<MemberUpdateRequest>,
    ) -> Result<Response<MemberUpdateResponse>, Status> {
        Err(Status::unimplemented(MEMBERSHIP_LATER))
    }

    async fn member_list(
        &self,
        _req: Request<MemberListRequest>,
    ) -> Result<Response<MemberListResponse>, Status> {
        let nodes = self
            .ctx
            .pd
            .get_all_nodes()
            .await
            .map_err(|e| errors::status(router::Error::Pd(e)))?;
        let members = nodes
            .into_iter()
            .filter(|n| n.state() != proto::metapb::NodeState::Tombstone)
            .map(|n| Member {
                id: n.id,
                name: n.name,
                peer_ur_ls: n.peer_urls,
                client_ur_ls: n.client_urls,
                is_learner: false,
            })
            .collect();
        let header = self.ctx.current_header().await?;
        Ok(Response::new(MemberListResponse { header, members }))
    }

    async fn member_promote(
        &self,
        _req: Request<MemberPromoteRequest>,
    ) -> Result<Response<MemberPromoteResponse>, Status> {
        Err(Status::unimplemented(MEMBERSHIP_LATER))
    }
}
