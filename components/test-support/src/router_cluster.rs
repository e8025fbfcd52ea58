//! An in-process cluster of whole node storage stacks: the raftstore
//! cluster of [`raft_cluster`] (its transport filters are the faults), one
//! [`Router`] per node reaching the others through a
//! [`router::forward::LocalNetwork`] that obeys the same filters, and one
//! placement driver whose oracle each node reaches through its own
//! [`FaultyPd`] (so one node's oracle can be slowed or stalled alone).
//!
//! Requests go straight to a node's router — the etcd KV semantics, the
//! write and read protocols, forwarding, retries — without gRPC, so a
//! history checker can run under partitions, loss, delay, restarts, leader
//! transfers, oracle stalls and client cancellations in seconds.
//! [`RouterExecutor`] is the checker's [`Executor`] over it.
//!
//! Nodes stopped by anyone (a test, [`crate::RaftNemesis`]) lose their
//! router first (requests to them fail as "node down") and get a new one
//! when restarted.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use checker::{Consistency, Kv, Outcome, Request, RereadResult, Response};
use mvcc::exec::{WriteRequest, WriteResponse};
use parking_lot::RwLock;
use pd::{LocalPdClient, PdClient, PdConfig, PdCore};
use proto::{etcdserverpb, metapb};
use raftstore::StoreOptions;
use rand::Rng;
use router::forward::{Delivery, LocalNetwork};
use router::Router;
use tempfile::TempDir;

use crate::faulty_pd::FaultyPd;
use crate::history::Executor;
use crate::raft_cluster::{self, NodeEvent};

/// Routers by node id, shared with the raft cluster's node hooks.
struct Nodes {
    raft: std::sync::Weak<raft_cluster::Cluster>,
    net: Arc<LocalNetwork>,
    pds: HashMap<u64, Arc<FaultyPd>>,
    routers: RwLock<HashMap<u64, Arc<Router>>>,
}

impl Nodes {
    fn start_router(&self, id: u64) {
        let Some(raft) = self.raft.upgrade() else {
            return;
        };
        let router = Arc::new(Router::new(
            raft.store(id),
            self.pds[&id].clone(),
            self.net.forwarder(id),
        ));
        self.net.register(id, &router);
        router.start_lock_resolver();
        router.start_resolved_tracker();
        router.start_merge_driver();
        router.start_compaction_catch_up();
        self.routers.write().insert(id, router);
    }
}

pub struct RouterCluster {
    raft: Arc<raft_cluster::Cluster>,
    nodes: Arc<Nodes>,
    /// Percentage of delivered forwards whose reply is lost.
    lose_reply_percent: Arc<RwLock<u32>>,
    _pd_dir: TempDir,
}

impl RouterCluster {
    /// `n` nodes, each with a replica of region 1 (all voters).
    pub async fn new(n: u64) -> Arc<RouterCluster> {
        Self::with_options(n, StoreOptions::default()).await
    }

    /// Like [`RouterCluster::new`], every node's store opened with
    /// `options`.
    pub async fn with_options(n: u64, options: StoreOptions) -> Arc<RouterCluster> {
        let raft = Arc::new(raft_cluster::Cluster::with_options(n, options));
        let pd_dir = tempfile::tempdir().expect("temp dir");
        let core = PdCore::open(PdConfig::new(pd_dir.path())).expect("open PD");
        let pd: Arc<dyn PdClient> = Arc::new(LocalPdClient::new(core));
        let node = |id: u64| metapb::Node {
            id,
            name: format!("n{id}"),
            ..Default::default()
        };
        pd.bootstrap(node(1), raft_cluster::region(n))
            .await
            .expect("bootstrap PD");
        for id in 2..=n {
            pd.put_node(node(id)).await.expect("register node");
        }
        let net = LocalNetwork::new();
        let lose_reply_percent = Arc::new(RwLock::new(0));
        {
            let raft = Arc::downgrade(&raft);
            let lose = lose_reply_percent.clone();
            net.set_filter(move |from, to| {
                let Some(raft) = raft.upgrade() else {
                    return Delivery::Drop;
                };
                if !raft.delivers(from, to) {
                    return Delivery::Drop;
                }
                if rand::thread_rng().gen_range(0..100) < *lose.read() {
                    return Delivery::LoseReply;
                }
                Delivery::Deliver
            });
        }
        let nodes = Arc::new(Nodes {
            raft: Arc::downgrade(&raft),
            net,
            pds: (1..=n).map(|id| (id, FaultyPd::new(pd.clone()))).collect(),
            routers: RwLock::new(HashMap::new()),
        });
        for id in 1..=n {
            nodes.start_router(id);
        }
        let hooks = Arc::downgrade(&nodes);
        raft.on_node_event(move |id, event| {
            let Some(nodes) = hooks.upgrade() else {
                return;
            };
            match event {
                NodeEvent::Stopping => {
                    // The store closes only once nobody holds it.
                    nodes.routers.write().remove(&id);
                }
                NodeEvent::Started => nodes.start_router(id),
            }
        });
        Arc::new(RouterCluster {
            raft,
            nodes,
            lose_reply_percent,
            _pd_dir: pd_dir,
        })
    }

    /// The raftstore cluster underneath (filters, partitions, restarts).
    pub fn raft(&self) -> &Arc<raft_cluster::Cluster> {
        &self.raft
    }

    /// Every node's id, running or not.
    pub fn ids(&self) -> Vec<u64> {
        self.raft.nodes()
    }

    /// Node `id`'s router, if it runs.
    pub fn router(&self, id: u64) -> Option<Arc<Router>> {
        self.nodes.routers.read().get(&id).cloned()
    }

    /// The oracle as node `id` sees it (to slow it down or stall it).
    pub fn oracle(&self, id: u64) -> &FaultyPd {
        &self.nodes.pds[&id]
    }

    /// Every node's oracle back to normal.
    pub fn clear_oracle_faults(&self) {
        for pd in self.nodes.pds.values() {
            pd.set_fault(crate::OracleFault::None);
        }
    }

    /// Makes `percent` % of forwarded requests lose their reply.
    pub fn set_lose_reply_percent(&self, percent: u32) {
        *self.lose_reply_percent.write() = percent;
    }

    /// The node whose replica is the ready leader, waiting up to 20 s.
    pub async fn leader(&self) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(id) = self.raft.try_leader() {
                return id;
            }
            assert!(Instant::now() < deadline, "no leader within 20 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Splits the region holding `key` at `key`, on whichever node leads
    /// it (`Router::split_region`); says why not if it could not.
    pub async fn split(&self, key: &[u8]) -> Result<(), String> {
        for id in self.raft.running() {
            let Some(router) = self.router(id) else {
                continue;
            };
            let led = router.store().regions().into_iter().find(|h| {
                let s = h.status();
                s.ready_leader
                    && key >= s.region.start_key.as_slice()
                    && (s.region.end_key.is_empty() || key < s.region.end_key.as_slice())
            });
            if let Some(h) = led {
                return router
                    .split_region(h.region_id(), key.to_vec())
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string());
            }
        }
        Err("no ready leader holds the key".into())
    }

    /// Asks the leader of the region starting at `start` to merge it into
    /// its right neighbour (`Router::merge_region`; the router's merge
    /// driver finishes or rolls it back in the background); says why not
    /// if it could not.
    pub async fn merge(&self, start: &[u8]) -> Result<(), String> {
        for id in self.raft.running() {
            let Some(router) = self.router(id) else {
                continue;
            };
            let regions: Vec<_> = router
                .store()
                .regions()
                .into_iter()
                .map(|h| (h.region_id(), h.status()))
                .collect();
            let Some((source_id, source)) = regions
                .iter()
                .find(|(_, s)| s.ready_leader && s.region.start_key == start)
            else {
                continue;
            };
            if source.region.end_key.is_empty() {
                return Err("the last region has no right neighbour".into());
            }
            let Some((_, target)) = regions
                .iter()
                .find(|(_, s)| s.region.start_key == source.region.end_key)
            else {
                return Err("the right neighbour has no replica here".into());
            };
            return router
                .merge_region(*source_id, target.region.clone())
                .await
                .map_err(|e| e.to_string());
        }
        Err("no ready leader of a region starting there".into())
    }

    /// Hands leadership of every region led elsewhere to node `to`.
    pub async fn transfer_all_leaders(&self, to: u64) {
        let Some(target) = self.router(to) else {
            return;
        };
        for h in target.store().regions() {
            let status = h.status();
            let Some(to_peer) = status.region.peers.iter().find(|p| p.node_id == to) else {
                continue;
            };
            let Some(leader) = status
                .region
                .peers
                .iter()
                .find(|p| p.id == status.leader_peer_id)
            else {
                continue;
            };
            if let Some(lh) = self.raft.try_region(leader.node_id, status.region.id) {
                let _ = lh.transfer_leader(to_peer.id).await;
            }
        }
    }

    /// Asks the leader to hand leadership to node `to` (a no-op if there is
    /// no leader or `to` leads).
    pub async fn transfer_leader(&self, to: u64) {
        let Some(leader) = self.raft.try_leader() else {
            return;
        };
        if let Some(h) = self.raft.try_handle(leader) {
            let _ = h.transfer_leader(to).await;
        }
    }
}

/// The checker's requests straight to the routers of a [`RouterCluster`]:
/// endpoint i is node i + 1. A call cut by its deadline is dropped
/// mid-flight — exactly a client cancelling — and is `Unknown`; router
/// errors keep their class (`router::error`): those that certainly did not
/// apply are `Failed`, so the checker holds the router to that claim.
pub struct RouterExecutor {
    cluster: Arc<RouterCluster>,
}

impl RouterExecutor {
    pub fn new(cluster: Arc<RouterCluster>) -> RouterExecutor {
        RouterExecutor { cluster }
    }
}

fn classify(err: router::Error) -> Outcome {
    let text = err.to_string();
    match err {
        router::Error::Mvcc(_) | router::Error::CrossRegion | router::Error::Pd(_) => {
            Outcome::Failed(text)
        }
        e if e.is_retryable() => Outcome::Failed(text),
        _ => Outcome::Unknown(text),
    }
}

fn to_kv(kv: &proto::mvccpb::KeyValue) -> Kv {
    Kv {
        value: kv.value.clone(),
        create_revision: kv.create_revision,
        mod_revision: kv.mod_revision,
        version: kv.version,
    }
}

fn header_rev(h: &Option<etcdserverpb::ResponseHeader>) -> i64 {
    h.as_ref().map_or(0, |h| h.revision)
}

/// The first Range result (or Put prev_kv) of a txn's responses.
fn txn_kv(t: &etcdserverpb::TxnResponse) -> Option<Kv> {
    use etcdserverpb::response_op::Response as R;
    match t.responses.first().and_then(|r| r.response.as_ref()) {
        Some(R::ResponsePut(p)) => p.prev_kv.as_ref().map(to_kv),
        Some(R::ResponseRange(r)) => r.kvs.first().map(to_kv),
        _ => None,
    }
}

/// The etcd request a checker request stands for.
fn to_etcd(req: &Request) -> Result<WriteRequest, etcdserverpb::RangeRequest> {
    use etcdserverpb::{
        compare, request_op, Compare, DeleteRangeRequest, PutRequest, RangeRequest, RequestOp,
        TxnRequest,
    };
    let range = |key: &Vec<u8>, serializable: bool| RangeRequest {
        key: key.clone(),
        serializable,
        ..Default::default()
    };
    let put = |key: &Vec<u8>, value: &Vec<u8>| PutRequest {
        key: key.clone(),
        value: value.clone(),
        prev_kv: true,
        ..Default::default()
    };
    match req {
        Request::Put { key, value } => Ok(WriteRequest::Put(put(key, value))),
        Request::Get {
            key,
            consistency,
            txn,
        } => {
            let r = range(key, *consistency == Consistency::Serializable);
            if *txn {
                Ok(WriteRequest::Txn(TxnRequest {
                    success: vec![RequestOp {
                        request: Some(request_op::Request::RequestRange(r)),
                    }],
                    ..Default::default()
                }))
            } else {
                Err(r)
            }
        }
        Request::Cas {
            key,
            expected_mod_revision,
            value,
        } => Ok(WriteRequest::Txn(TxnRequest {
            compare: vec![Compare {
                result: compare::CompareResult::Equal as i32,
                target: compare::CompareTarget::Mod as i32,
                key: key.clone(),
                target_union: Some(compare::TargetUnion::ModRevision(*expected_mod_revision)),
                ..Default::default()
            }],
            success: vec![RequestOp {
                request: Some(request_op::Request::RequestPut(put(key, value))),
            }],
            failure: vec![RequestOp {
                request: Some(request_op::Request::RequestRange(range(key, false))),
            }],
        })),
        Request::Delete { key } => Ok(WriteRequest::DeleteRange(DeleteRangeRequest {
            key: key.clone(),
            prev_kv: true,
            ..Default::default()
        })),
    }
}

async fn call(router: &Router, req: &Request) -> router::Result<Response> {
    let write = match to_etcd(req) {
        Ok(w) => w,
        Err(range) => {
            let r = router.range(&range).await?;
            return Ok(Response::Get {
                revision: header_rev(&r.header),
                kv: r.kvs.first().map(to_kv),
            });
        }
    };
    Ok(match (req, router.write(&write).await?) {
        (Request::Put { .. }, WriteResponse::Put(p)) => Response::Put {
            revision: header_rev(&p.header),
            prev: p.prev_kv.as_ref().map(to_kv),
        },
        (Request::Get { .. }, WriteResponse::Txn(t)) => Response::Get {
            revision: header_rev(&t.header),
            kv: txn_kv(&t),
        },
        (Request::Cas { .. }, WriteResponse::Txn(t)) => Response::Cas {
            revision: header_rev(&t.header),
            succeeded: t.succeeded,
            kv: txn_kv(&t),
        },
        (Request::Delete { .. }, WriteResponse::DeleteRange(d)) => Response::Delete {
            revision: header_rev(&d.header),
            deleted: d.prev_kvs.first().map(to_kv),
        },
        (_, other) => {
            return Err(router::Error::Internal(format!(
                "mismatched response {other:?}"
            )))
        }
    })
}

#[async_trait::async_trait]
impl Executor for RouterExecutor {
    fn endpoints(&self) -> usize {
        self.cluster.ids().len()
    }

    async fn execute(&self, endpoint: usize, req: &Request, deadline: Duration) -> Outcome {
        let id = self.cluster.ids()[endpoint];
        let Some(router) = self.cluster.router(id) else {
            return Outcome::Failed(format!("node {id} is down"));
        };
        match tokio::time::timeout(deadline, call(&router, req)).await {
            Ok(Ok(resp)) => Outcome::Ok(resp),
            Ok(Err(e)) => classify(e),
            Err(_) => Outcome::Unknown(format!("cancelled after {deadline:?}")),
        }
    }

    async fn reread(&self, key: &[u8], revision: i64) -> Result<RereadResult, String> {
        let mut last = String::from("no node running");
        for id in self.cluster.ids() {
            let Some(router) = self.cluster.router(id) else {
                continue;
            };
            let req = etcdserverpb::RangeRequest {
                key: key.to_vec(),
                revision,
                ..Default::default()
            };
            match router.range(&req).await {
                Ok(r) => return Ok(RereadResult::Kv(r.kvs.first().map(to_kv))),
                Err(router::Error::Mvcc(mvcc::Error::Compacted)) => {
                    return Ok(RereadResult::Compacted)
                }
                Err(e) => last = e.to_string(),
            }
        }
        Err(last)
    }
}
