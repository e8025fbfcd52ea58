//! etcd's Lease service over the router's leases (`router::lease`).
//!
//! Contract, as etcd 3.5 answers:
//! * Grant: ID 0 lets the server choose (a fresh id from PD); a TTL
//!   below [`MIN_TTL`] is raised to it, one above [`MAX_TTL`] fails with
//!   "etcdserver: too large lease TTL" (`OutOfRange`); an id in use fails
//!   with "etcdserver: lease already exists" (`FailedPrecondition`). The
//!   answer carries the id and the TTL granted.
//! * Revoke: "etcdserver: requested lease not found" (`NotFound`) for an
//!   unknown id; the keys still carrying the lease are deleted at one
//!   revision (none taken if there are none).
//! * KeepAlive: a stream; each request is answered in order with the
//!   lease's TTL, or TTL 0 for an unknown or expired lease (etcd's
//!   answer, not an error); another error ends the stream with it.
//! * TimeToLive: the remaining TTL (-1 once expired) and the granted TTL;
//!   `keys` asks for the keys carrying the lease (in key order); an
//!   unknown id answers TTL -1, as etcd does.
//! * Leases: every lease of the cluster, in id order.
//!
//! Every answer's header is at the oracle's current revision.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use proto::etcdserverpb::lease_server::Lease;
use proto::etcdserverpb::{
    LeaseGrantRequest, LeaseGrantResponse, LeaseKeepAliveRequest, LeaseKeepAliveResponse,
    LeaseLeasesRequest, LeaseLeasesResponse, LeaseRevokeRequest, LeaseRevokeResponse, LeaseStatus,
    LeaseTimeToLiveRequest, LeaseTimeToLiveResponse,
};
use router::lease::{LeaseAnswer, LeaseOp};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::{errors, NodeContext};

/// etcd's minimum TTL at its default election timeout, in seconds.
pub const MIN_TTL: i64 = 2;
/// etcd's `MaxLeaseTTL`, in seconds.
pub const MAX_TTL: i64 = 9_000_000_000;
const ERR_TTL_TOO_LARGE: &str = "etcdserver: too large lease TTL";

type KeepAliveStream = Pin<Box<dyn Stream<Item = Result<LeaseKeepAliveResponse, Status>> + Send>>;

pub struct LeaseService {
    ctx: Arc<NodeContext>,
}

impl LeaseService {
    pub fn new(ctx: Arc<NodeContext>) -> LeaseService {
        LeaseService { ctx }
    }
}

async fn run(ctx: &NodeContext, op: LeaseOp) -> Result<LeaseAnswer, Status> {
    ctx.router.lease(op).await.map_err(errors::status)
}

fn unexpected(answer: LeaseAnswer) -> Status {
    Status::internal(format!("unexpected lease answer {answer:?}"))
}

#[tonic::async_trait]
impl Lease for LeaseService {
    async fn lease_grant(
        &self,
        req: Request<LeaseGrantRequest>,
    ) -> Result<Response<LeaseGrantResponse>, Status> {
        let req = req.into_inner();
        if req.ttl > MAX_TTL {
            return Err(Status::out_of_range(ERR_TTL_TOO_LARGE));
        }
        let ttl = req.ttl.max(MIN_TTL);
        let id = if req.id == 0 {
            let id = self.ctx.pd.alloc_id().await.map_err(|e| {
                Status::unavailable(format!("etcdserver: cannot allocate a lease id: {e}"))
            })?;
            i64::try_from(id).map_err(|_| Status::internal("lease id out of range"))?
        } else {
            req.id
        };
        run(&self.ctx, LeaseOp::Grant { id, ttl }).await?;
        Ok(Response::new(LeaseGrantResponse {
            header: self.ctx.current_header().await?,
            id,
            ttl,
            error: String::new(),
        }))
    }

    async fn lease_revoke(
        &self,
        req: Request<LeaseRevokeRequest>,
    ) -> Result<Response<LeaseRevokeResponse>, Status> {
        run(&self.ctx, LeaseOp::Revoke(req.get_ref().id)).await?;
        Ok(Response::new(LeaseRevokeResponse {
            header: self.ctx.current_header().await?,
        }))
    }

    type LeaseKeepAliveStream = KeepAliveStream;

    async fn lease_keep_alive(
        &self,
        req: Request<Streaming<LeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let ctx = self.ctx.clone();
        tokio::spawn(async move {
            while let Ok(Some(req)) = inbound.message().await {
                let ttl = match ctx.router.lease(LeaseOp::Renew(req.id)).await {
                    Ok(LeaseAnswer::Renewed { ttl }) => ttl,
                    Ok(other) => {
                        let _ = tx.send(Err(unexpected(other))).await;
                        return;
                    }
                    Err(router::Error::Mvcc(mvcc::Error::LeaseNotFound)) => 0,
                    Err(e) => {
                        let _ = tx.send(Err(errors::status(e))).await;
                        return;
                    }
                };
                let resp = match ctx.current_header().await {
                    Ok(header) => Ok(LeaseKeepAliveResponse {
                        header,
                        id: req.id,
                        ttl,
                    }),
                    Err(e) => Err(e),
                };
                let failed = resp.is_err();
                if tx.send(resp).await.is_err() || failed {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn lease_time_to_live(
        &self,
        req: Request<LeaseTimeToLiveRequest>,
    ) -> Result<Response<LeaseTimeToLiveResponse>, Status> {
        let (id, with_keys) = (req.get_ref().id, req.get_ref().keys);
        let (granted_ttl, ttl) = match self.ctx.router.lease(LeaseOp::TimeToLive(id)).await {
            Ok(LeaseAnswer::TimeToLive { ttl, remaining }) => (ttl, remaining),
            Ok(other) => return Err(unexpected(other)),
            // etcd answers an unknown lease as expired.
            Err(router::Error::Mvcc(mvcc::Error::LeaseNotFound)) => (0, -1),
            Err(e) => return Err(errors::status(e)),
        };
        let keys = if with_keys && ttl != -1 {
            match self.ctx.router.lease_keys(id).await {
                Ok(keys) => keys,
                Err(router::Error::Mvcc(mvcc::Error::LeaseNotFound)) => Vec::new(),
                Err(e) => return Err(errors::status(e)),
            }
        } else {
            Vec::new()
        };
        Ok(Response::new(LeaseTimeToLiveResponse {
            header: self.ctx.current_header().await?,
            id,
            ttl,
            granted_ttl,
            keys,
        }))
    }

    async fn lease_leases(
        &self,
        _req: Request<LeaseLeasesRequest>,
    ) -> Result<Response<LeaseLeasesResponse>, Status> {
        match run(&self.ctx, LeaseOp::List).await? {
            LeaseAnswer::Listed(ids) => Ok(Response::new(LeaseLeasesResponse {
                header: self.ctx.current_header().await?,
                leases: ids.into_iter().map(|id| LeaseStatus { id }).collect(),
            })),
            other => Err(unexpected(other)),
        }
    }
}
