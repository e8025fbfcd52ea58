//! etcdserverpb.Maintenance: status, hashes (of the whole keyspace, see
//! `Router::hash_kv`), alarms (cluster-wide, in PD; see `alarm`) and
//! defragmentation of this node. RPCs that need features not built yet
//! answer `Unimplemented`.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::Stream;
use proto::etcdserverpb::maintenance_server::Maintenance;
use proto::etcdserverpb::*;
use proto::metapb;
use tonic::{Request, Response, Status};

use crate::errors;
use crate::NodeContext;

/// Reported as the server version; etcd clients check the major.minor.
pub const ETCD_VERSION: &str = "3.5.17";
pub const ETCD_CLUSTER_VERSION: &str = "3.5.0";

/// etcd gives a leader transfer this long too.
const MOVE_LEADER_TIMEOUT: Duration = Duration::from_secs(5);

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
    /// etcd's Alarm over the cluster's alarm list in PD (see `alarm`):
    /// GET lists, ACTIVATE raises, DEACTIVATE disarms (etcdctl `alarm
    /// disarm` deactivates every listed alarm one by one). This node's
    /// copy of the list is refreshed before answering a change.
    async fn alarm(&self, req: Request<AlarmRequest>) -> Result<Response<AlarmResponse>, Status> {
        use proto::pdpb::{alarm_request::AlarmAction as Action, AlarmType as Type};
        let req = req.into_inner();
        let action = Action::try_from(req.action)
            .map_err(|_| Status::invalid_argument("etcdserver: unknown alarm action"))?;
        let alarms = match Type::try_from(req.alarm) {
            Ok(alarm) => self
                .ctx
                .pd
                .alarm(action, req.member_id, alarm)
                .await
                .map_err(|e| errors::status(router::Error::Pd(e)))?,
            // etcd knows no such alarm: none is active, none can be.
            Err(_) if action == Action::Get => Vec::new(),
            Err(_) => return Err(Status::invalid_argument("etcdserver: unknown alarm type")),
        };
        if action != Action::Get {
            if let Err(e) = self.ctx.alarms.refresh(self.ctx.pd.as_ref()).await {
                tracing::warn!("cannot refresh the alarm list: {e}");
            }
        }
        let header = self.ctx.current_header().await?;
        Ok(Response::new(AlarmResponse {
            header,
            alarms: alarms
                .into_iter()
                .map(|a| AlarmMember {
                    member_id: a.member_id,
                    alarm: a.alarm,
                })
                .collect(),
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
            // As etcd: each active alarm in its protobuf text form.
            errors: self
                .ctx
                .alarms
                .list()
                .iter()
                .map(|a| {
                    let name = proto::pdpb::AlarmType::try_from(a.alarm)
                        .map_or("NONE", |t| t.as_str_name());
                    format!("memberID:{} alarm:{} ", a.member_id, name)
                })
                .collect(),
            db_size_in_use: self.ctx.router.store().db_size_in_use() as i64,
            is_learner: region
                .region
                .peers
                .iter()
                .any(|p| p.id == region.peer_id && p.role() == metapb::PeerRole::Learner),
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

    /// Hands the leadership of every region this node leads to the replica
    /// on node `target_id`, and waits until it took over. As in etcd, the
    /// request must go to the leader (of the main region here).
    async fn move_leader(
        &self,
        req: Request<MoveLeaderRequest>,
    ) -> Result<Response<MoveLeaderResponse>, Status> {
        let target = req.get_ref().target_id;
        let led: Vec<_> = self
            .ctx
            .router
            .store()
            .regions()
            .into_iter()
            .filter(|h| h.status().ready_leader)
            .collect();
        let main = self.ctx.main_region_status();
        if !main.ready_leader {
            return Err(Status::unavailable(errors::NOT_LEADER));
        }
        let mut waits = Vec::new();
        for handle in led {
            let region = handle.status().region;
            let Some(peer) = region
                .peers
                .iter()
                .find(|p| p.node_id == target && p.role() == metapb::PeerRole::Voter)
            else {
                if region.id == main.region.id {
                    return Err(Status::failed_precondition(errors::BAD_LEADER_TRANSFEREE));
                }
                // A region without a voter on the target keeps its leader.
                continue;
            };
            if peer.id == handle.status().peer_id {
                continue;
            }
            let peer_id = peer.id;
            waits.push(async move {
                let deadline = Instant::now() + MOVE_LEADER_TIMEOUT;
                while Instant::now() < deadline {
                    let status = handle.status();
                    if status.leader_peer_id == peer_id {
                        return Ok(());
                    }
                    // raft-rs abandons a transfer that did not finish within
                    // an election timeout; asking again restarts it.
                    if status.ready_leader {
                        handle
                            .transfer_leader(peer_id)
                            .await
                            .map_err(|e| errors::status(router::Error::Region(e)))?;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(Status::deadline_exceeded(errors::LEADER_TRANSFER_TIMEOUT))
            });
        }
        futures::future::try_join_all(waits).await?;
        let mut header = Some(ResponseHeader::default());
        self.ctx.fill_header(&mut header);
        Ok(Response::new(MoveLeaderResponse { header }))
    }

    async fn downgrade(
        &self,
        _req: Request<DowngradeRequest>,
    ) -> Result<Response<DowngradeResponse>, Status> {
        Err(Status::unimplemented("downgrade is not supported"))
    }
}
