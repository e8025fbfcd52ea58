//! etcdserverpb.Maintenance: status, hashes and defragmentation of this
//! node. RPCs that need features not built yet answer `Unimplemented`.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use proto::etcdserverpb::maintenance_server::Maintenance;
use proto::etcdserverpb::*;
use tonic::{Request, Response, Status};

use crate::errors;
use crate::NodeContext;

/// Reported as the server version; etcd clients check the major.minor.
pub const ETCD_VERSION: &str = "3.5.17";
pub const ETCD_CLUSTER_VERSION: &str = "3.5.0";

pub struct MaintenanceService {
    ctx: Arc<NodeContext>,
}

impl MaintenanceService {
    pub fn new(ctx: Arc<NodeContext>) -> MaintenanceService {
        MaintenanceService { ctx }
    }

    async fn hash_kv_at(&self, revision: i64) -> Result<HashKvResponse, Status> {
        let (hash, compact_revision, hash_revision) = self
            .ctx
            .router
            .hash_kv(revision)
            .await
            .map_err(errors::status)?;
        let header = self.ctx.current_header().await?;
        Ok(HashKvResponse {
            header,
            hash,
            compact_revision,
            hash_revision,
        })
    }
}

type SnapshotStream = Pin<Box<dyn Stream<Item = Result<SnapshotResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Maintenance for MaintenanceService {
    async fn alarm(&self, req: Request<AlarmRequest>) -> Result<Response<AlarmResponse>, Status> {
        if req.get_ref().action != alarm_request::AlarmAction::Get as i32 {
            return Err(Status::unimplemented(
                "alarms (space quota) are not supported yet",
            ));
        }
        // No quota is enforced yet, so no alarm can be raised.
        let header = self.ctx.current_header().await?;
        Ok(Response::new(AlarmResponse {
            header,
            alarms: Vec::new(),
        }))
    }

    async fn status(
        &self,
        _req: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let region = self.ctx.main_region_status();
        let leader = region
            .region
            .peers
            .iter()
            .find(|p| p.id == region.leader_peer_id)
            .map_or(0, |p| p.node_id);
        let db_size = self.ctx.router.store().db_size() as i64;
        let mut header = Some(ResponseHeader {
            revision: region.applied_revision.max(1),
            ..Default::default()
        });
        self.ctx.fill_header(&mut header);
        Ok(Response::new(StatusResponse {
            header,
            version: ETCD_VERSION.into(),
            db_size,
            leader,
            raft_index: region.commit_index,
            raft_term: region.term,
            raft_applied_index: region.applied_index,
            errors: Vec::new(),
            db_size_in_use: self.ctx.router.store().db_size_in_use() as i64,
            is_learner: false,
            storage_version: String::new(),
            db_size_quota: 0,
            downgrade_info: None,
        }))
    }

    async fn defragment(
        &self,
        _req: Request<DefragmentRequest>,
    ) -> Result<Response<DefragmentResponse>, Status> {
        let kv = self.ctx.router.store().kv_engine().clone();
        tokio::task::spawn_blocking(move || {
            for name in engine::cf::ALL {
                kv.compact_range(name, None, None);
            }
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
        let mut header = Some(ResponseHeader::default());
        self.ctx.fill_header(&mut header);
        Ok(Response::new(DefragmentResponse { header }))
    }

    /// MetaStore has no single backend file to hash: this is the hash of
    /// the KV state at the current revision, like HashKV with revision 0.
    async fn hash(&self, _req: Request<HashRequest>) -> Result<Response<HashResponse>, Status> {
        let kv = self.hash_kv_at(0).await?;
        Ok(Response::new(HashResponse {
            header: kv.header,
            hash: kv.hash,
        }))
    }

    async fn hash_kv(
        &self,
        req: Request<HashKvRequest>,
    ) -> Result<Response<HashKvResponse>, Status> {
        Ok(Response::new(
            self.hash_kv_at(req.get_ref().revision).await?,
        ))
    }

    type SnapshotStream = SnapshotStream;

    async fn snapshot(
        &self,
        _req: Request<SnapshotRequest>,
    ) -> Result<Response<Self::SnapshotStream>, Status> {
        Err(Status::unimplemented("snapshot is not supported yet"))
    }

    async fn move_leader(
        &self,
        _req: Request<MoveLeaderRequest>,
    ) -> Result<Response<MoveLeaderResponse>, Status> {
        Err(Status::unimplemented(
            "move leader needs a multi-node cluster (not supported yet)",
        ))
    }

    async fn downgrade(
        &self,
        _req: Request<DowngradeRequest>,
    ) -> Result<Response<DowngradeResponse>, Status> {
        Err(Status::unimplemented("downgrade is not supported"))
    }
}
