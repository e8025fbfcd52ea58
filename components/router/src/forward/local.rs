//! In-process forwarding for tests: the routers of an in-process cluster
//! reach each other's `serve_forwarded_*` methods directly, through a
//! network whose filter decides, per (from, to) node pair, whether a
//! request arrives and whether its reply comes back. Follows the
//! [`super::Forward`] contract exactly as the gRPC forwarder does, so the
//! router, its retries and its outcome classification can be tested
//! without sockets and under partitions.
//!
//! A node that stops ([`LocalNetwork::stop`]) drops whatever it was
//! serving, as a killed process does: the caller gets `Unreachable` for a
//! read and `OutcomeUnknown` for anything that may have applied, and the
//! stopped router is released at once (nothing it served keeps its store
//! open).

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Weak};

use mvcc::exec::{WriteRequest, WriteResponse};
use mvcc::KeyRange;
use parking_lot::RwLock;
use proto::etcdserverpb::{RangeRequest, RangeResponse};
use proto::forwardpb::{txn_step_request::Step, txn_step_response};
use tokio::sync::watch;

use super::{Forward, ReadIndex, RegionChanges, RegionHash, Target};
use crate::lease::{LeaseAnswer, LeaseOp};
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
    /// Per running node: fires (or is dropped) when the node stops.
    stops: RwLock<HashMap<u64, watch::Sender<bool>>>,
    filter: RwLock<Filter>,
}

impl LocalNetwork {
    /// A network that delivers everything.
    pub fn new() -> Arc<LocalNetwork> {
        Arc::new(LocalNetwork {
            routers: RwLock::new(HashMap::new()),
            stops: RwLock::new(HashMap::new()),
            filter: RwLock::new(Arc::new(|_, _| Delivery::Deliver)),
        })
    }

    /// Makes `router` the receiver of requests for `node_id` (replacing a
    /// previous one, e.g. after a restart). A dropped router is unreachable.
    pub fn register(&self, node_id: u64, router: &Arc<Router>) {
        self.routers.write().insert(node_id, Arc::downgrade(router));
        self.stops.write().insert(node_id, watch::channel(false).0);
    }

    /// Node `node_id` stops: it is unreachable, and what it was serving is
    /// dropped (see the module docs).
    pub fn stop(&self, node_id: u64) {
        self.routers.write().remove(&node_id);
        if let Some(stop) = self.stops.write().remove(&node_id) {
            stop.send_replace(true);
        }
    }

    /// Completes once node `node_id` stops (at once if it is not running):
    /// for a test's own calls into the node's router, which must end with
    /// it as forwarded ones do.
    pub fn stopped(&self, node_id: u64) -> impl Future<Output = ()> + Send + 'static {
        until_stopped(
            self.stops
                .read()
                .get(&node_id)
                .map(watch::Sender::subscribe),
        )
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

    fn route(&self, from: u64, to: u64) -> Result<(Arc<Router>, Delivery, Served)> {
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
        let served = Served {
            node_id: to,
            stop: self.stops.read().get(&to).map(watch::Sender::subscribe),
        };
        Ok((router, delivery, served))
    }
}

async fn until_stopped(stop: Option<watch::Receiver<bool>>) {
    if let Some(mut stop) = stop {
        // An error: the sender went, with the node.
        let _ = stop.wait_for(|stopped| *stopped).await;
    }
}

/// One request arriving at a node, which ends when the node stops.
struct Served {
    node_id: u64,
    stop: Option<watch::Receiver<bool>>,
}

impl Served {
    /// `serve`'s result, or the error for a node that stopped meanwhile:
    /// `Unreachable` for a read, `OutcomeUnknown` for a request that may
    /// have applied (`applies`).
    async fn run<T>(self, applies: bool, serve: impl Future<Output = Result<T>>) -> Result<T> {
        tokio::select! {
            r = serve => r,
            () = until_stopped(self.stop) => Err(if applies {
                Error::OutcomeUnknown(format!("node {} stopped while serving", self.node_id))
            } else {
                Error::Unreachable {
                    node_id: self.node_id,
                    reason: "node stopped while serving".into(),
                }
            }),
        }
    }
}

struct LocalForwarder {
    net: Arc<LocalNetwork>,
    from: u64,
}

fn reply_lost() -> Error {
    Error::OutcomeUnknown("reply lost by the test network".into())
}

/// A read's answer as the caller sees it: a lost reply is `Unreachable`
/// (running a read again is harmless).
fn read_reply<T>(node_id: u64, delivery: Delivery, res: Result<T>) -> Result<T> {
    match delivery {
        Delivery::LoseReply => Err(Error::Unreachable {
            node_id,
            reason: "reply lost by the test network".into(),
        }),
        _ => res,
    }
}

#[async_trait::async_trait]
impl Forward for LocalForwarder {
    async fn write(&self, target: &Target, req: &WriteRequest) -> Result<WriteResponse> {
        let (router, delivery, served) = self.net.route(self.from, target.node_id)?;
        let header = target.header();
        if delivery == Delivery::LoseReply {
            let req = req.clone();
            tokio::spawn(async move {
                served
                    .run(true, router.serve_forwarded_write(Some(&header), &req))
                    .await
            });
            return Err(reply_lost());
        }
        served
            .run(true, router.serve_forwarded_write(Some(&header), req))
            .await
    }

    async fn range(&self, target: &Target, req: &RangeRequest) -> Result<RangeResponse> {
        let (router, delivery, served) = self.net.route(self.from, target.node_id)?;
        let header = target.header();
        let res = served
            .run(false, router.serve_forwarded_range(Some(&header), req))
            .await;
        read_reply(target.node_id, delivery, res)
    }

    async fn compact(&self, target: &Target, revision: i64, physical: bool) -> Result<(i64, u64)> {
        let (router, delivery, served) = self.net.route(self.from, target.node_id)?;
        let header = target.header();
        if delivery == Delivery::LoseReply {
            tokio::spawn(async move {
                let serve = router.serve_forwarded_compact(Some(&header), revision, physical);
                served.run(true, serve).await
            });
            return Err(reply_lost());
        }
        let serve = router.serve_forwarded_compact(Some(&header), revision, physical);
        served.run(true, serve).await
    }

    async fn lease(&self, target: &Target, op: LeaseOp) -> Result<LeaseAnswer> {
        let (router, delivery, served) = self.net.route(self.from, target.node_id)?;
        let header = target.header();
        if op.is_idempotent() {
            let res = served
                .run(false, router.serve_forwarded_lease(Some(&header), op))
                .await;
            return read_reply(target.node_id, delivery, res);
        }
        if delivery == Delivery::LoseReply {
            tokio::spawn(async move {
                let serve = router.serve_forwarded_lease(Some(&header), op);
                served.run(true, serve).await
            });
            return Err(reply_lost());
        }
        let serve = router.serve_forwarded_lease(Some(&header), op);
        served.run(true, serve).await
    }

    async fn txn_step(
        &self,
        target: &Target,
        step: Step,
    ) -> Result<Option<txn_step_response::Result>> {
        let (router, delivery, served) = self.net.route(self.from, target.node_id)?;
        let header = target.header();
        if delivery == Delivery::LoseReply {
            tokio::spawn(async move {
                served
                    .run(true, router.serve_txn_step(Some(&header), step))
                    .await
            });
            return Err(reply_lost());
        }
        served
            .run(true, router.serve_txn_step(Some(&header), step))
            .await
    }

    async fn hash(&self, target: &Target, span: &KeyRange, revision: i64) -> Result<RegionHash> {
        let (router, delivery, served) = self.net.route(self.from, target.node_id)?;
        let header = target.header();
        let res = served
            .run(
                false,
                router.serve_forwarded_hash(Some(&header), span, revision),
            )
            .await;
        read_reply(target.node_id, delivery, res)
    }

    async fn watch_events(
        &self,
        target: &Target,
        span: &KeyRange,
        from: i64,
        prev_kv: bool,
    ) -> Result<RegionChanges> {
        let (router, delivery, served) = self.net.route(self.from, target.node_id)?;
        let header = target.header();
        let res = served
            .run(
                false,
                router.serve_forwarded_watch_events(Some(&header), span, from, prev_kv),
            )
            .await;
        read_reply(target.node_id, delivery, res)
    }

    async fn read_index(&self, target: &Target) -> Result<ReadIndex> {
        let (router, delivery, served) = self.net.route(self.from, target.node_id)?;
        let header = target.header();
        let res = served
            .run(false, router.serve_read_index(Some(&header)))
            .await;
        read_reply(target.node_id, delivery, res)
    }
}
