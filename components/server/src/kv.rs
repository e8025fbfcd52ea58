//! etcdserverpb.KV over the router; writes are refused while an alarm
//! etcd refuses them under is active (see `alarm`).

use std::sync::Arc;

use mvcc::exec::{WriteRequest, WriteResponse};
use prost::Message;
use proto::etcdserverpb::kv_server::Kv;
use proto::etcdserverpb::{
    CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse, PutRequest,
    PutResponse, RangeRequest, RangeResponse, ResponseHeader, TxnRequest, TxnResponse,
};
use tonic::{Request, Response, Status};

use crate::errors::{self, REQUEST_TOO_LARGE};
use crate::NodeContext;

/// etcd's default `--max-request-bytes`.
pub const MAX_REQUEST_BYTES: usize = 1536 * 1024;
/// etcd lets gRPC receive a bit more than that, so an oversized request gets
/// etcd's own error rather than a transport one.
pub const MAX_GRPC_RECV_BYTES: usize = MAX_REQUEST_BYTES + 512 * 1024;

pub struct KvService {
    ctx: Arc<NodeContext>,
}

impl KvService {
    pub fn new(ctx: Arc<NodeContext>) -> KvService {
        KvService { ctx }
    }

    async fn write(&self, req: WriteRequest, size: usize) -> Result<WriteResponse, Status> {
        if size > MAX_REQUEST_BYTES {
            return Err(Status::invalid_argument(REQUEST_TOO_LARGE));
        }
        self.ctx.alarms.check_write(&req)?;
        self.ctx.router.write(&req).await.map_err(errors::status)
    }
}

#[tonic::async_trait]
impl Kv for KvService {
    async fn range(&self, req: Request<RangeRequest>) -> Result<Response<RangeResponse>, Status> {
        let mut resp = self
            .ctx
            .router
            .range(req.get_ref())
            .await
            .map_err(errors::status)?;
        self.ctx.fill_header(&mut resp.header);
        Ok(Response::new(resp))
    }

    async fn put(&self, req: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let req = req.into_inner();
        let size = req.encoded_len();
        match self.write(WriteRequest::Put(req), size).await? {
            WriteResponse::Put(mut resp) => {
                self.ctx.fill_header(&mut resp.header);
                Ok(Response::new(resp))
            }
            _ => Err(Status::internal("mismatched response to put")),
        }
    }

    async fn delete_range(
        &self,
        req: Request<DeleteRangeRequest>,
    ) -> Result<Response<DeleteRangeResponse>, Status> {
        let req = req.into_inner();
        let size = req.encoded_len();
        match self.write(WriteRequest::DeleteRange(req), size).await? {
            WriteResponse::DeleteRange(mut resp) => {
                self.ctx.fill_header(&mut resp.header);
                Ok(Response::new(resp))
            }
            _ => Err(Status::internal("mismatched response to delete range")),
        }
    }

    async fn txn(&self, req: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        let req = req.into_inner();
        let size = req.encoded_len();
        match self.write(WriteRequest::Txn(req), size).await? {
            WriteResponse::Txn(mut resp) => {
                self.ctx.fill_header(&mut resp.header);
                Ok(Response::new(resp))
            }
            _ => Err(Status::internal("mismatched response to txn")),
        }
    }

    async fn compact(
        &self,
        req: Request<CompactionRequest>,
    ) -> Result<Response<CompactionResponse>, Status> {
        let req = req.into_inner();
        self.ctx.alarms.check_compact()?;
        let revision = self
            .ctx
            .router
            .compact(req.revision, req.physical)
            .await
            .map_err(errors::status)?;
        let mut header = Some(ResponseHeader {
            revision,
            ..Default::default()
        });
        self.ctx.fill_header(&mut header);
        Ok(Response::new(CompactionResponse { header }))
    }
}
