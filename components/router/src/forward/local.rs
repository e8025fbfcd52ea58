//! In-process forwarding for tests: the routers of an in-process cluster
//! reach each other's `serve_forwarded_*` methods directly, through a
//! network whose filter decides, per (from, to) node pair, whether a
//! request arrives and whether its reply comes back. Follows the
//! [`super::Forward`] contract exactly as the gRPC forwarder does, so the
//! router, its retries and its outcome classification can be tested
//! without sockets and under partitions.

use std::collections::HashMap;
use std::sync::{Arc, Weak};

use mvcc::exec::{WriteRequest, WriteResponse};
use mvcc::KeyRange;
use parking_lot::RwLock;
use proto::etcdserverpb::{RangeRequest, RangeResponse};
use proto::forwardpb::{txn_step_request::Step, txn_step_response};

use super::{Forward, ReadIndex, RegionHash, Target};
use crate::{Error, Result, Router};

/// What happens to one forwarded request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    Deliver,
    /// The request never arrives (a partition): the caller may retry.
    Drop,
    /// The request runs but its reply is lost: a write's outcome is unknown.
    LoseReply,
}

type Filter = Arc<dyn Fn(u64, u64) -> Delivery + Send + Sync>;

/// The in-process "network" between the routers of a test cluster.
pub struct LocalNetwork {
    routers: RwLock<HashMap<u64, Weak<Router>>>,
    filter: RwLock<Filter>,
}

impl LocalNetwork {
    /// A network that delivers everything.
    pub fn new() -> Arc<LocalNetwork> {
        Arc::new(LocalNetwork {
            routers: RwLock::new(HashMap::new()),
            filter: RwLock::new(Arc::new(|_, _| Delivery::Deliver)),
        })
    }

    /// Makes `router` the receiver of requests for `node_id` (replacing a
    /// previous one, e.g. after a restart). A dropped router is unreachable.
    pub fn register(&self, node_id: u64, router: &Arc<Router>) {
        self.routers.write().insert(node_id, Arc::downgrade(router));
    }

    /// Decides every later request's fate by `f(from_node, to_node)`.
    pub fn set_filter(&self, f: impl Fn(u64, u64) -> Delivery + Send + Sync + 'static) {
        *self.filter.write() = Arc::new(f);
    }

    /// The forwarder of node `from`.
    pub fn forwarder(self: &Arc<Self>, from: u64) -> Arc<dyn Forward> {
        Arc::new(LocalForwarder {
            net: self.clone(),
            from,
        })
    }

    fn route(&self, from: u64, to: u64) -> Result<(Arc<Router>, Delivery)> {
        let unreachable = |reason: &str| Error::Unreachable {
            node_id: to,
            reason: reason.into(),
        };
        let delivery = (self.filter.read())(from, to);
        if delivery == Delivery::Drop {
            return Err(unreachable("dropped by the test network"));
        }
        let router = self
            .routers
            .read()
            .get(&to)
            .and_then(Weak::upgrade)
            .ok_or_else(|| unreachable("node not running"))?;
        Ok((router, delivery))
    }
}

struct LocalForwarder {
    net: Arc<LocalNetwork>,
    from: u64,
}

fn reply_lost() -> Error {
    Error::OutcomeUnknown("reply lost by the test network".into())
}

#[async_trait::async_trait]
impl Forward for LocalForwarder {
    async fn write(&self, target: &Target, req: &WriteRequest) -> Result<WriteResponse> {
        let (router, delivery) = self.net.route(self.from, target.node_id)?;
        let header = target.header();
        if delivery == Delivery::LoseReply {
            let req = req.clone();
            tokio::spawn(async move { router.serve_forwarded_write(Some(&header), &req).await });
            return Err(reply_lost());
        }
        router.serve_forwarded_write(Some(&header), req).await
    }

    async fn range(&self, target: &Target, req: &RangeRequest) -> Result<RangeResponse> {
        let (router, delivery) = self.net.route(self.from, target.node_id)?;
        let res = router
            .serve_forwarded_range(Some(&target.header()), req)
            .await;
        match delivery {
            Delivery::LoseReply => Err(Error::Unreachable {
                node_id: target.node_id,
                reason: "reply lost by the test network".into(),
            }),
            _ => res,
        }
    }

    async fn compact(&self, target: &Target, revision: i64, physical: bool) -> Result<(i64, u64)> {
        let (router, delivery) = self.net.route(self.from, target.node_id)?;
        let header = target.header();
        if delivery == Delivery::LoseReply {
            tokio::spawn(async move {
                router
                    .serve_forwarded_compact(Some(&header), revision, physical)
                    .await
            });
            return Err(reply_lost());
        }
        router
            .serve_forwarded_compact(Some(&header), revision, physical)
            .await
    }

    async fn txn_step(
        &self,
        target: &Target,
        step: Step,
    ) -> Result<Option<txn_step_response::Result>> {
        let (router, delivery) = self.net.route(self.from, target.node_id)?;
        let header = target.header();
        if delivery == Delivery::LoseReply {
            tokio::spawn(async move { router.serve_txn_step(Some(&header), step).await });
            return Err(reply_lost());
        }
        router.serve_txn_step(Some(&header), step).await
    }

    async fn hash(&self, target: &Target, span: &KeyRange, revision: i64) -> Result<RegionHash> {
        let (router, delivery) = self.net.route(self.from, target.node_id)?;
        let res = router
            .serve_forwarded_hash(Some(&target.header()), span, revision)
            .await;
        match delivery {
            Delivery::LoseReply => Err(Error::Unreachable {
                node_id: target.node_id,
                reason: "reply lost by the test network".into(),
            }),
            _ => res,
        }
    }

    async fn read_index(&self, target: &Target) -> Result<ReadIndex> {
        let (router, delivery) = self.net.route(self.from, target.node_id)?;
        let res = router.serve_read_index(Some(&target.header())).await;
        match delivery {
            Delivery::LoseReply => Err(Error::Unreachable {
                node_id: target.node_id,
                reason: "reply lost by the test network".into(),
            }),
            _ => res,
        }
    }
}
