//! The `pdpb.PD` gRPC service over a [`PdCore`].
//!
//! Application errors travel in the response header (so a client can tell
//! "not bootstrapped" from a broken connection); a gRPC status is used only
//! when this member cannot serve at all (closed), which makes clients fail
//! over to another endpoint. A follower answers everything but GetMembers
//! with the header error NOT_LEADER naming the leader.

use std::future::Future;
use std::sync::Arc;

use proto::metapb;
use proto::pdpb::{self, pd_server};
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

use crate::client::{PdError, RegionHeartbeat, RegionOperator, RegionWithLeader};
use crate::operators::PendingOperator;
use crate::pd_core::PdCore;

#[derive(Debug, Clone)]
pub struct PdService {
    core: Arc<PdCore>,
}

fn not_found(t: pdpb::ErrorType, message: String) -> pdpb::Error {
    pdpb::Error {
        r#type: t as i32,
        message,
    }
}

fn region_response(
    header: Option<pdpb::ResponseHeader>,
    found: Option<RegionWithLeader>,
) -> pdpb::GetRegionResponse {
    let found = found.map(|r| r.to_proto()).unwrap_or_default();
    pdpb::GetRegionResponse {
        header,
        region: found.region,
        leader: found.leader,
        approximate_size: found.approximate_size,
        approximate_keys: found.approximate_keys,
    }
}

/// A heartbeat request as the core takes it; `Err(InvalidArgument)` when
/// it lacks its region or leader.
fn heartbeat_from_proto(req: pdpb::RegionHeartbeatRequest) -> Result<RegionHeartbeat, PdError> {
    let region = req
        .region
        .ok_or_else(|| PdError::InvalidArgument("heartbeat without region".into()))?;
    let leader = req
        .leader
        .ok_or_else(|| PdError::InvalidArgument("heartbeat without leader".into()))?;
    Ok(RegionHeartbeat {
        region,
        leader,
        pending_peers: req.pending_peers,
        down_peers: req.down_peers,
        approximate_size: req.approximate_size,
        approximate_keys: req.approximate_keys,
    })
}

/// Fills in the step decided for `region` (at its epoch).
fn set_operator(
    resp: &mut pdpb::RegionHeartbeatResponse,
    region: &metapb::Region,
    op: &RegionOperator,
) {
    resp.region_id = region.id;
    resp.region_epoch = region.region_epoch;
    crate::client::operator_to_proto(op, resp);
}

impl PdService {
    pub fn new(core: Arc<PdCore>) -> Self {
        PdService { core }
    }

    /// The tower service to add to a `tonic::transport::Server`.
    pub fn into_server(self) -> pd_server::PdServer<PdService> {
        pd_server::PdServer::new(self)
    }

    fn header(&self, error: Option<pdpb::Error>) -> Option<pdpb::ResponseHeader> {
        Some(pdpb::ResponseHeader {
            cluster_id: self.core.cluster_id(),
            error,
        })
    }

    /// Runs `f` after checking the request's cluster id, and sorts its
    /// outcome into header error vs. gRPC status.
    async fn run<T>(
        &self,
        req_header: Option<pdpb::RequestHeader>,
        f: impl Future<Output = Result<T, PdError>>,
    ) -> Result<(Option<pdpb::ResponseHeader>, Option<T>), Status> {
        let want = req_header.map_or(0, |h| h.cluster_id);
        let result = if want != 0 && want != self.core.cluster_id() {
            Err(PdError::ClusterIdMismatch {
                expected: want,
                actual: self.core.cluster_id(),
            })
        } else {
            f.await
        };
        match result {
            Ok(v) => Ok((self.header(None), Some(v))),
            Err(PdError::Closed) => Err(Status::unavailable("PD member is shutting down")),
            Err(PdError::Unavailable(m)) => Err(Status::unavailable(m)),
            Err(e) => Ok((self.header(Some(e.to_proto())), None)),
        }
    }
}

#[tonic::async_trait]
impl pd_server::Pd for PdService {
    async fn get_members(
        &self,
        req: Request<pdpb::GetMembersRequest>,
    ) -> Result<Response<pdpb::GetMembersResponse>, Status> {
        let req = req.into_inner();
        let (header, v) = self
            .run(req.header, async {
                Ok((self.core.members(), self.core.leader()))
            })
            .await?;
        let (members, leader) = v.unwrap_or_default();
        Ok(Response::new(pdpb::GetMembersResponse {
            header,
            members,
            leader,
        }))
    }

    async fn is_bootstrapped(
        &self,
        req: Request<pdpb::IsBootstrappedRequest>,
    ) -> Result<Response<pdpb::IsBootstrappedResponse>, Status> {
        let req = req.into_inner();
        let (header, v) = self.run(req.header, self.core.is_bootstrapped()).await?;
        Ok(Response::new(pdpb::IsBootstrappedResponse {
            header,
            bootstrapped: v.unwrap_or(false),
        }))
    }

    async fn bootstrap(
        &self,
        req: Request<pdpb::BootstrapRequest>,
    ) -> Result<Response<pdpb::BootstrapResponse>, Status> {
        let req = req.into_inner();
        let (header, _) = self
            .run(req.header, async {
                let node = req
                    .node
                    .ok_or_else(|| PdError::InvalidArgument("bootstrap without node".into()))?;
                let region = req
                    .region
                    .ok_or_else(|| PdError::InvalidArgument("bootstrap without region".into()))?;
                self.core.bootstrap(node, region).await
            })
            .await?;
        Ok(Response::new(pdpb::BootstrapResponse { header }))
    }

    async fn alloc_id(
        &self,
        req: Request<pdpb::AllocIdRequest>,
    ) -> Result<Response<pdpb::AllocIdResponse>, Status> {
        let req = req.into_inner();
        let (header, v) = self.run(req.header, self.core.alloc_id()).await?;
        Ok(Response::new(pdpb::AllocIdResponse {
            header,
            id: v.unwrap_or(0),
        }))
    }

    async fn put_node(
        &self,
        req: Request<pdpb::PutNodeRequest>,
    ) -> Result<Response<pdpb::PutNodeResponse>, Status> {
        let req = req.into_inner();
        let (header, _) = self
            .run(req.header, async {
                let node = req
                    .node
                    .ok_or_else(|| PdError::InvalidArgument("put_node without node".into()))?;
                self.core.put_node(node).await
            })
            .await?;
        Ok(Response::new(pdpb::PutNodeResponse { header }))
    }

    async fn get_node(
        &self,
        req: Request<pdpb::GetNodeRequest>,
    ) -> Result<Response<pdpb::GetNodeResponse>, Status> {
        let req = req.into_inner();
        let (mut header, v) = self
            .run(req.header, self.core.get_node(req.node_id))
            .await?;
        let node = v.flatten();
        if node.is_none() && header.as_ref().is_some_and(|h| h.error.is_none()) {
            header = self.header(Some(not_found(
                pdpb::ErrorType::NodeNotFound,
                format!("node {} not found", req.node_id),
            )));
        }
        Ok(Response::new(pdpb::GetNodeResponse { header, node }))
    }

    async fn get_all_nodes(
        &self,
        req: Request<pdpb::GetAllNodesRequest>,
    ) -> Result<Response<pdpb::GetAllNodesResponse>, Status> {
        let req = req.into_inner();
        let (header, v) = self.run(req.header, self.core.get_all_nodes()).await?;
        Ok(Response::new(pdpb::GetAllNodesResponse {
            header,
            nodes: v.unwrap_or_default(),
        }))
    }

    async fn get_region(
        &self,
        req: Request<pdpb::GetRegionRequest>,
    ) -> Result<Response<pdpb::GetRegionResponse>, Status> {
        let req = req.into_inner();
        let (mut header, v) = self.run(req.header, self.core.get_region(&req.key)).await?;
        let found = v.flatten();
        if found.is_none() && header.as_ref().is_some_and(|h| h.error.is_none()) {
            header = self.header(Some(not_found(
                pdpb::ErrorType::RegionNotFound,
                format!("no region contains key {:?}", req.key),
            )));
        }
        Ok(Response::new(region_response(header, found)))
    }

    async fn get_region_by_id(
        &self,
        req: Request<pdpb::GetRegionByIdRequest>,
    ) -> Result<Response<pdpb::GetRegionResponse>, Status> {
        let req = req.into_inner();
        let (mut header, v) = self
            .run(req.header, self.core.get_region_by_id(req.region_id))
            .await?;
        let found = v.flatten();
        if found.is_none() && header.as_ref().is_some_and(|h| h.error.is_none()) {
            header = self.header(Some(not_found(
                pdpb::ErrorType::RegionNotFound,
                format!("region {} not found", req.region_id),
            )));
        }
        Ok(Response::new(region_response(header, found)))
    }

    async fn scan_regions(
        &self,
        req: Request<pdpb::ScanRegionsRequest>,
    ) -> Result<Response<pdpb::ScanRegionsResponse>, Status> {
        let req = req.into_inner();
        let (header, v) = self
            .run(
                req.header,
                self.core
                    .scan_regions(&req.start_key, &req.end_key, req.limit as usize),
            )
            .await?;
        let regions = v
            .unwrap_or_default()
            .iter()
            .map(RegionWithLeader::to_proto)
            .collect();
        Ok(Response::new(pdpb::ScanRegionsResponse { header, regions }))
    }

    async fn region_heartbeat(
        &self,
        req: Request<pdpb::RegionHeartbeatRequest>,
    ) -> Result<Response<pdpb::RegionHeartbeatResponse>, Status> {
        let req = req.into_inner();
        let header = req.header;
        let (header, v) = self
            .run(header, async {
                let hb = heartbeat_from_proto(req)?;
                let op = self.core.handle_region_heartbeat(hb.clone()).await?;
                Ok((hb.region, op))
            })
            .await?;
        let mut resp = pdpb::RegionHeartbeatResponse {
            header,
            ..Default::default()
        };
        if let Some((region, Some(op))) = v {
            set_operator(&mut resp, &region, &op);
        }
        Ok(Response::new(resp))
    }

    async fn region_heartbeats(
        &self,
        req: Request<pdpb::RegionHeartbeatsRequest>,
    ) -> Result<Response<pdpb::RegionHeartbeatsResponse>, Status> {
        let req = req.into_inner();
        // Malformed ones are answered without troubling the core.
        let parsed: Vec<Result<RegionHeartbeat, PdError>> = req
            .heartbeats
            .into_iter()
            .map(heartbeat_from_proto)
            .collect();
        let well_formed: Vec<RegionHeartbeat> = parsed
            .iter()
            .filter_map(|p| p.as_ref().ok())
            .cloned()
            .collect();
        let (header, v) = self
            .run(req.header, self.core.handle_region_heartbeats(well_formed))
            .await?;
        let Some(outcomes) = v else {
            return Ok(Response::new(pdpb::RegionHeartbeatsResponse {
                header,
                responses: Vec::new(),
            }));
        };
        let mut outcomes = outcomes.into_iter();
        let mut responses = Vec::with_capacity(parsed.len());
        for p in parsed {
            let mut resp = pdpb::RegionHeartbeatResponse::default();
            let outcome = match p {
                Err(e) => Err(e),
                Ok(hb) => match outcomes.next() {
                    Some(o) => o.map(|op| op.map(|op| (hb.region, op))),
                    None => Err(PdError::Other("no outcome for this heartbeat".into())),
                },
            };
            match outcome {
                Ok(None) => {}
                Ok(Some((region, op))) => set_operator(&mut resp, &region, &op),
                Err(e) => resp.header = self.header(Some(e.to_proto())),
            }
            if resp.header.is_none() {
                resp.header = self.header(None);
            }
            responses.push(resp);
        }
        Ok(Response::new(pdpb::RegionHeartbeatsResponse {
            header,
            responses,
        }))
    }

    async fn alloc_revisions(
        &self,
        req: Request<pdpb::AllocRevisionsRequest>,
    ) -> Result<Response<pdpb::AllocRevisionsResponse>, Status> {
        let req = req.into_inner();
        let (header, v) = self
            .run(req.header, self.core.alloc_revisions(req.count))
            .await?;
        Ok(Response::new(pdpb::AllocRevisionsResponse {
            header,
            first: v.unwrap_or(0),
        }))
    }

    async fn current_revision(
        &self,
        req: Request<pdpb::CurrentRevisionRequest>,
    ) -> Result<Response<pdpb::CurrentRevisionResponse>, Status> {
        let req = req.into_inner();
        let (header, v) = self.run(req.header, self.core.current_revision()).await?;
        Ok(Response::new(pdpb::CurrentRevisionResponse {
            header,
            revision: v.unwrap_or(0),
        }))
    }

    async fn split_region(
        &self,
        req: Request<pdpb::SplitRegionRequest>,
    ) -> Result<Response<pdpb::SplitRegionResponse>, Status> {
        let req = req.into_inner();
        let (header, v) = self
            .run(req.header, self.core.split_region(&req.key))
            .await?;
        Ok(Response::new(pdpb::SplitRegionResponse {
            header,
            region: v.as_ref().map(RegionWithLeader::to_proto),
        }))
    }

    async fn merge_regions(
        &self,
        req: Request<pdpb::MergeRegionsRequest>,
    ) -> Result<Response<pdpb::MergeRegionsResponse>, Status> {
        let req = req.into_inner();
        let (header, v) = self
            .run(
                req.header,
                self.core.merge_regions(req.source_id, req.target_id),
            )
            .await?;
        let (source, target) = match v {
            Some((s, t)) => (Some(s.to_proto()), Some(t.to_proto())),
            None => (None, None),
        };
        Ok(Response::new(pdpb::MergeRegionsResponse {
            header,
            source,
            target,
        }))
    }

    async fn get_operators(
        &self,
        req: Request<pdpb::GetOperatorsRequest>,
    ) -> Result<Response<pdpb::GetOperatorsResponse>, Status> {
        let req = req.into_inner();
        let (header, v) = self.run(req.header, self.core.operators()).await?;
        Ok(Response::new(pdpb::GetOperatorsResponse {
            header,
            operators: v
                .unwrap_or_default()
                .iter()
                .map(PendingOperator::to_proto)
                .collect(),
        }))
    }

    async fn compact(
        &self,
        req: Request<pdpb::CompactRequest>,
    ) -> Result<Response<pdpb::CompactResponse>, Status> {
        let req = req.into_inner();
        let (header, v) = self
            .run(req.header, self.core.compact(req.revision))
            .await?;
        Ok(Response::new(match v {
            Some(outcome) => outcome.to_proto(header),
            None => pdpb::CompactResponse {
                header,
                ..Default::default()
            },
        }))
    }

    async fn get_compaction_revision(
        &self,
        req: Request<pdpb::GetCompactionRevisionRequest>,
    ) -> Result<Response<pdpb::GetCompactionRevisionResponse>, Status> {
        let req = req.into_inner();
        let (header, v) = self
            .run(req.header, self.core.compaction_revision())
            .await?;
        Ok(Response::new(pdpb::GetCompactionRevisionResponse {
            header,
            compaction_revision: v.unwrap_or(0),
        }))
    }

    async fn alarm(
        &self,
        req: Request<pdpb::AlarmRequest>,
    ) -> Result<Response<pdpb::AlarmResponse>, Status> {
        let req = req.into_inner();
        let action = pdpb::alarm_request::AlarmAction::try_from(req.action).map_err(|_| {
            Status::invalid_argument(format!("unknown alarm action {}", req.action))
        })?;
        let alarm = pdpb::AlarmType::try_from(req.alarm)
            .map_err(|_| Status::invalid_argument(format!("unknown alarm type {}", req.alarm)))?;
        let (header, v) = self
            .run(req.header, self.core.alarm(action, req.member_id, alarm))
            .await?;
        Ok(Response::new(pdpb::AlarmResponse {
            header,
            alarms: v.unwrap_or_default(),
        }))
    }

    async fn get_schedulers(
        &self,
        req: Request<pdpb::GetSchedulersRequest>,
    ) -> Result<Response<pdpb::GetSchedulersResponse>, Status> {
        let req = req.into_inner();
        let (header, v) = self.run(req.header, self.core.scheduling_status()).await?;
        Ok(Response::new(match v {
            Some(status) => status.to_proto(header),
            None => pdpb::GetSchedulersResponse {
                header,
                ..Default::default()
            },
        }))
    }
}

/// Serves PD's client API on `listener` until `shutdown` completes, then drains in-flight
/// requests. Does not close the core: the caller does that afterwards, so the
/// last requests are still answered.
pub async fn serve<F>(
    core: Arc<PdCore>,
    listener: TcpListener,
    shutdown: F,
) -> Result<(), tonic::transport::Error>
where
    F: Future<Output = ()> + Send,
{
    serve_listeners(core, vec![listener], shutdown).await
}

/// Like [`serve`], on several listeners at once (one per client URL).
pub async fn serve_listeners<F>(
    core: Arc<PdCore>,
    listeners: Vec<TcpListener>,
    shutdown: F,
) -> Result<(), tonic::transport::Error>
where
    F: Future<Output = ()> + Send,
{
    let incoming = futures::stream::select_all(
        listeners
            .into_iter()
            .map(|l| TcpIncoming::from(l).with_nodelay(Some(true))),
    );
    tonic::transport::Server::builder()
        .add_service(PdService::new(core).into_server())
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}
