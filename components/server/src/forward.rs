//! The receiving side of request forwarding (`forwardpb.RegionForward`),
//! served on the peer URLs next to the raft transport.
//!
//! Other nodes send here the requests for regions whose leader they believe
//! is on this node. Everything is decided by the router's `serve_*`
//! methods: they run the request only if this node's replica is the ready
//! leader and never forward it again. Errors travel in the response
//! (`forwardpb::Error`), so a gRPC error means the call itself failed.
//! A handler dropped because the sender went away loses nothing: a write
//! handed to the region's sequencer keeps its latches and in-flight
//! registration until its outcome is known (`router::leader`).

use std::sync::Arc;

use mvcc::exec::{WriteRequest, WriteResponse};
use proto::forwardpb::region_forward_server::{RegionForward, RegionForwardServer};
use proto::forwardpb::{
    self, write_request as wreq, write_response as wresp, CompactRequest, CompactResponse,
    HashRequest, HashResponse, RangeRequest, RangeResponse, ReadIndexRequest, ReadIndexResponse,
    TxnStepRequest, TxnStepResponse, WatchChange, WatchEventsRequest, WatchEventsResponse,
};
use router::forward::wire::error_to_wire;
use router::lease::LeaseOp;
use router::Router;
use tonic::{Request, Response, Status};
use tracing::debug;

use crate::raft_transport::MAX_RAFT_GRPC_BYTES;

pub struct ForwardService {
    router: Arc<Router>,
}

impl ForwardService {
    pub fn new(router: Arc<Router>) -> ForwardService {
        ForwardService { router }
    }

    pub fn into_server(self) -> RegionForwardServer<ForwardService> {
        RegionForwardServer::new(self)
            .max_decoding_message_size(MAX_RAFT_GRPC_BYTES)
            .max_encoding_message_size(usize::MAX)
    }
}

fn wire_error(e: &router::Error) -> Option<forwardpb::Error> {
    debug!("forwarded request failed: {e}");
    Some(error_to_wire(e))
}

#[tonic::async_trait]
impl RegionForward for ForwardService {
    async fn write(
        &self,
        req: Request<forwardpb::WriteRequest>,
    ) -> Result<Response<forwardpb::WriteResponse>, Status> {
        let req = req.into_inner();
        let write = match req.request {
            Some(wreq::Request::Put(p)) => WriteRequest::Put(p),
            Some(wreq::Request::DeleteRange(d)) => WriteRequest::DeleteRange(d),
            Some(wreq::Request::Txn(t)) => WriteRequest::Txn(t),
            None => {
                return Err(Status::invalid_argument(
                    "forwarded write without a request",
                ))
            }
        };
        let res = self
            .router
            .serve_forwarded_write(req.header.as_ref(), &write)
            .await;
        let resp = match res {
            Ok(WriteResponse::Put(p)) => forwardpb::WriteResponse {
                error: None,
                response: Some(wresp::Response::Put(p)),
            },
            Ok(WriteResponse::DeleteRange(d)) => forwardpb::WriteResponse {
                error: None,
                response: Some(wresp::Response::DeleteRange(d)),
            },
            Ok(WriteResponse::Txn(t)) => forwardpb::WriteResponse {
                error: None,
                response: Some(wresp::Response::Txn(t)),
            },
            Ok(WriteResponse::LeaseRevoke { .. }) => {
                return Err(Status::internal("a forwarded write answered as a revoke"))
            }
            Err(e) => forwardpb::WriteResponse {
                error: wire_error(&e),
                response: None,
            },
        };
        Ok(Response::new(resp))
    }

    async fn range(&self, req: Request<RangeRequest>) -> Result<Response<RangeResponse>, Status> {
        let req = req.into_inner();
        let range = req.request.unwrap_or_default();
        let resp = match self
            .router
            .serve_forwarded_range(req.header.as_ref(), &range)
            .await
        {
            Ok(r) => RangeResponse {
                error: None,
                response: Some(r),
            },
            Err(e) => RangeResponse {
                error: wire_error(&e),
                response: None,
            },
        };
        Ok(Response::new(resp))
    }

    async fn compact(
        &self,
        req: Request<CompactRequest>,
    ) -> Result<Response<CompactResponse>, Status> {
        let req = req.into_inner();
        let res = self
            .router
            .serve_forwarded_compact(req.header.as_ref(), req.revision, req.physical)
            .await;
        let resp = match res {
            Ok((current_revision, applied_index)) => CompactResponse {
                error: None,
                current_revision,
                applied_index,
            },
            Err(e) => CompactResponse {
                error: wire_error(&e),
                ..Default::default()
            },
        };
        Ok(Response::new(resp))
    }

    async fn read_index(
        &self,
        req: Request<ReadIndexRequest>,
    ) -> Result<Response<ReadIndexResponse>, Status> {
        let req = req.into_inner();
        let resp = match self.router.serve_read_index(req.header.as_ref()).await {
            Ok(ri) => ReadIndexResponse {
                error: None,
                revision: ri.revision,
                applied_index: ri.applied_index,
                resolved_revision: ri.resolved,
            },
            Err(e) => ReadIndexResponse {
                error: wire_error(&e),
                ..Default::default()
            },
        };
        Ok(Response::new(resp))
    }

    async fn txn_step(
        &self,
        req: Request<TxnStepRequest>,
    ) -> Result<Response<TxnStepResponse>, Status> {
        let req = req.into_inner();
        let Some(step) = req.step else {
            return Err(Status::invalid_argument("transaction step without a step"));
        };
        let resp = match self.router.serve_txn_step(req.header.as_ref(), step).await {
            Ok(result) => TxnStepResponse {
                error: None,
                result,
            },
            Err(e) => TxnStepResponse {
                error: wire_error(&e),
                result: None,
            },
        };
        Ok(Response::new(resp))
    }

    async fn lease(
        &self,
        req: Request<forwardpb::LeaseRequest>,
    ) -> Result<Response<forwardpb::LeaseResponse>, Status> {
        let req = req.into_inner();
        let res = match LeaseOp::from_wire(&req) {
            Ok(op) => {
                self.router
                    .serve_forwarded_lease(req.header.as_ref(), op)
                    .await
            }
            Err(e) => Err(e),
        };
        let resp = match res {
            Ok(answer) => answer.to_wire(),
            Err(e) => forwardpb::LeaseResponse {
                error: wire_error(&e),
                ..Default::default()
            },
        };
        Ok(Response::new(resp))
    }

    async fn watch_events(
        &self,
        req: Request<WatchEventsRequest>,
    ) -> Result<Response<WatchEventsResponse>, Status> {
        let req = req.into_inner();
        let span = mvcc::KeyRange {
            start: req.start,
            end: Some(req.end),
        };
        let resp = match self
            .router
            .serve_forwarded_watch_events(
                req.header.as_ref(),
                &span,
                req.from_revision,
                req.prev_kv,
            )
            .await
        {
            Ok(c) => WatchEventsResponse {
                error: None,
                changes: c
                    .changes
                    .into_iter()
                    .map(|(sub, event)| WatchChange {
                        sub,
                        event: Some(event),
                    })
                    .collect(),
                resolved: c.resolved,
                compact_revision: c.compact_revision,
            },
            Err(e) => WatchEventsResponse {
                error: wire_error(&e),
                ..Default::default()
            },
        };
        Ok(Response::new(resp))
    }

    async fn hash(&self, req: Request<HashRequest>) -> Result<Response<HashResponse>, Status> {
        let req = req.into_inner();
        let span = mvcc::KeyRange {
            start: req.start,
            end: Some(req.end),
        };
        let resp = match self
            .router
            .serve_forwarded_hash(req.header.as_ref(), &span, req.revision)
            .await
        {
            Ok(h) => HashResponse {
                error: None,
                hash: h.hash.crc,
                hashed_bytes: h.hash.len,
                compact_revision: h.compact_revision,
                hash_revision: h.revision,
            },
            Err(e) => HashResponse {
                error: wire_error(&e),
                ..Default::default()
            },
        };
        Ok(Response::new(resp))
    }
}
