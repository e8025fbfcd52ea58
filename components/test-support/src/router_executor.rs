//! [`RouterExecutor`]: the checker's requests straight to the routers of a
//! [`RouterCluster`], as etcd requests (`mvcc::exec::WriteRequest` or a
//! Range): Put, Range, Cas as a Txn with a compare, Delete, a MultiPut as
//! one Txn without compares (over several regions the router commits it in
//! two phases), a RangeAll as a Range over the prefix (or a read-only Txn
//! holding one; over several regions a multi-region read).

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use checker::{Consistency, KeyKv, Kv, Outcome, Request, RereadResult, Response};
use mvcc::exec::{WriteRequest, WriteResponse};
use proto::etcdserverpb;
use router::watch::WatchUpdate;
use router::Router;

use crate::history::Executor;
use crate::watch_recorder::{WatchSource, WatchStream};
use crate::RouterCluster;

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

/// How long one node may take to answer a re-read.
const REREAD_TIMEOUT: Duration = Duration::from_secs(10);

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
        Request::MultiPut { keys, values } => Ok(WriteRequest::Txn(TxnRequest {
            success: keys
                .iter()
                .zip(values)
                .map(|(k, v)| RequestOp {
                    request: Some(request_op::Request::RequestPut(put(k, v))),
                })
                .collect(),
            ..Default::default()
        })),
        Request::RangeAll {
            prefix,
            consistency,
            txn,
        } => {
            let r = RangeRequest {
                range_end: checker::watch::prefix_end(prefix),
                ..range(prefix, *consistency == Consistency::Serializable)
            };
            range_or_txn(r, *txn)
        }
        Request::Get {
            key,
            consistency,
            txn,
        } => {
            let r = range(key, *consistency == Consistency::Serializable);
            range_or_txn(r, *txn)
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

/// Every KeyValue of a Range result, with its key.
fn key_kvs(kvs: &[proto::mvccpb::KeyValue]) -> Vec<KeyKv> {
    kvs.iter()
        .map(|kv| KeyKv {
            key: kv.key.clone(),
            kv: to_kv(kv),
        })
        .collect()
}

/// A MultiPut's prev_kvs from its Txn's responses: one ResponsePut per key,
/// else an error (the outcome is then unknown, not a malformed history).
fn multi_put_prevs(t: &etcdserverpb::TxnResponse, keys: usize) -> router::Result<Vec<Option<Kv>>> {
    use etcdserverpb::response_op::Response as R;
    let prevs: Vec<Option<Kv>> = t
        .responses
        .iter()
        .filter_map(|r| match r.response.as_ref() {
            Some(R::ResponsePut(p)) => Some(p.prev_kv.as_ref().map(to_kv)),
            _ => None,
        })
        .collect();
    if prevs.len() != keys || t.responses.len() != keys || !t.succeeded {
        return Err(router::Error::Internal(format!(
            "a Txn of {keys} puts answered {t:?}"
        )));
    }
    Ok(prevs)
}

async fn call(router: &Arc<Router>, req: &Request) -> router::Result<Response> {
    let write = match to_etcd(req) {
        Ok(w) => w,
        Err(range) => {
            let r = router.range(&range).await?;
            let revision = header_rev(&r.header);
            return Ok(match req {
                Request::RangeAll { .. } => Response::RangeAll {
                    revision,
                    kvs: key_kvs(&r.kvs),
                },
                _ => Response::Get {
                    revision,
                    kv: r.kvs.first().map(to_kv),
                },
            });
        }
    };
    Ok(match (req, router.write(&write).await?) {
        (Request::MultiPut { keys, .. }, WriteResponse::Txn(t)) => Response::MultiPut {
            revision: header_rev(&t.header),
            prevs: multi_put_prevs(&t, keys.len())?,
        },
        (Request::RangeAll { .. }, WriteResponse::Txn(t)) => {
            use etcdserverpb::response_op::Response as R;
            let kvs = match t.responses.first().and_then(|r| r.response.as_ref()) {
                Some(R::ResponseRange(r)) => key_kvs(&r.kvs),
                _ => Vec::new(),
            };
            Response::RangeAll {
                revision: header_rev(&t.header),
                kvs,
            }
        }
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
        let stopped = self.cluster.stopped(id);
        let Some(router) = self.cluster.router(id) else {
            return Outcome::Failed(format!("node {id} is down"));
        };
        tokio::select! {
            r = tokio::time::timeout(deadline, call(&router, req)) => match r {
                Ok(Ok(resp)) => Outcome::Ok(resp),
                Ok(Err(e)) => classify(e),
                Err(_) => Outcome::Unknown(format!("cancelled after {deadline:?}")),
            },
            () = stopped => Outcome::Unknown(format!("node {id} stopped during the call")),
        }
    }

    /// Each node in turn, each for at most [`REREAD_TIMEOUT`].
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
            // Bounded: a read that never answers is reported (by the
            // caller's retries running out), not a hung test.
            match tokio::time::timeout(REREAD_TIMEOUT, router.range(&req)).await {
                Ok(Ok(r)) => return Ok(RereadResult::Kv(r.kvs.first().map(to_kv))),
                Ok(Err(router::Error::Mvcc(mvcc::Error::Compacted))) => {
                    return Ok(RereadResult::Compacted)
                }
                Ok(Err(e)) => last = format!("node {id}: {e}"),
                Err(_) => last = format!("node {id}: no answer within {REREAD_TIMEOUT:?}"),
            }
            eprintln!(
                "re-read through node {id} failed, trying the next: {last}\n{}",
                self.cluster.describe_region(key)
            );
        }
        Err(last)
    }
}

/// `r` as a Range (`Err`), or as a read-only Txn holding it when `txn`.
fn range_or_txn(
    r: etcdserverpb::RangeRequest,
    txn: bool,
) -> Result<WriteRequest, etcdserverpb::RangeRequest> {
    use etcdserverpb::{request_op, RequestOp, TxnRequest};
    if !txn {
        return Err(r);
    }
    Ok(WriteRequest::Txn(TxnRequest {
        success: vec![RequestOp {
            request: Some(request_op::Request::RequestRange(r)),
        }],
        ..Default::default()
    }))
}

/// How often a watch of a [`RouterExecutor`] looks whether it has a
/// progress notification to record.
const PROGRESS_TICK: Duration = Duration::from_millis(100);

/// Watches through the routers' [`Router::watch`] (the aggregator; no
/// gRPC, no filters): one update is one response (its `revision` the
/// header revision), `Compacted` a canceled response with its compaction
/// revision, and every [`PROGRESS_TICK`] a progress notification at the
/// watch's delivered revision when that rose and every update up to it
/// has been taken (`Watch::is_drained`). A watch ends when its node stops
/// (it must not keep the stopped node's router, and with it its store).
#[async_trait::async_trait]
impl WatchSource for RouterExecutor {
    fn endpoints(&self) -> usize {
        self.cluster.ids().len()
    }

    fn filters(&self) -> bool {
        false
    }

    async fn open(
        &self,
        endpoint: usize,
        request: &checker::Watch,
        _catching_up: Arc<AtomicBool>,
    ) -> Result<(Box<dyn WatchStream>, checker::WatchResponse), String> {
        let id = self.cluster.ids()[endpoint];
        let mut stopped = Box::pin(self.cluster.stopped(id));
        let Some(router) = self.cluster.router(id) else {
            return Err(format!("node {id} is down"));
        };
        let range = mvcc::KeyRange::from_etcd(&request.key, &request.range_end);
        let watch = tokio::select! {
            w = router.watch(range, request.start_revision, request.prev_kv) => {
                w.map_err(|e| format!("node {id}: {e}"))?
            }
            () = &mut stopped => return Err(format!("node {id} stopped")),
        };
        drop(router);
        let created = checker::WatchResponse {
            revision: watch.delivered(),
            created: true,
            ..Default::default()
        };
        let stream = RouterWatchStream {
            seen: watch.delivered(),
            watch,
            stopped,
            id,
            tick: tokio::time::interval(PROGRESS_TICK),
        };
        Ok((Box::new(stream), created))
    }

    async fn current_revision(&self) -> Result<i64, String> {
        let mut last = String::from("no node running");
        for id in self.cluster.ids() {
            let Some(router) = self.cluster.router(id) else {
                continue;
            };
            match tokio::time::timeout(REREAD_TIMEOUT, router.current_revision()).await {
                Ok(Ok(r)) => return Ok(r),
                Ok(Err(e)) => last = format!("node {id}: {e}"),
                Err(_) => last = format!("node {id}: no answer within {REREAD_TIMEOUT:?}"),
            }
        }
        Err(last)
    }
}

/// One watch of a [`RouterExecutor`] (see its [`WatchSource`]).
struct RouterWatchStream {
    watch: router::watch::Watch,
    stopped: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
    id: u64,
    tick: tokio::time::Interval,
    /// The highest revision recorded (events, progress notifications).
    seen: i64,
}

#[async_trait::async_trait]
impl WatchStream for RouterWatchStream {
    async fn next(&mut self) -> Result<checker::WatchResponse, String> {
        loop {
            tokio::select! {
                update = self.watch.next() => return match update {
                    Some(Ok(WatchUpdate::Events { events, revision })) => {
                        let events: Vec<checker::WatchEvent> = events.iter().map(to_event).collect();
                        if let Some(top) = events.iter().map(|e| e.kv.mod_revision).max() {
                            self.seen = self.seen.max(top);
                        }
                        Ok(checker::WatchResponse {
                            revision,
                            events,
                            ..Default::default()
                        })
                    }
                    Some(Ok(WatchUpdate::Compacted { compact_revision })) => {
                        Ok(checker::WatchResponse {
                            revision: compact_revision,
                            canceled: true,
                            compact_revision,
                            ..Default::default()
                        })
                    }
                    Some(Err(e)) => Err(format!("node {}: {e}", self.id)),
                    None => Err(format!("node {}: the watch ended", self.id)),
                },
                () = &mut self.stopped => return Err(format!("node {} stopped", self.id)),
                _ = self.tick.tick() => {
                    // Read before looking at the queue: once it is empty,
                    // every update up to this revision has been taken (and
                    // recorded: this stream's caller records each before
                    // asking for the next).
                    let delivered = self.watch.delivered();
                    if delivered > self.seen && self.watch.is_drained() {
                        self.seen = delivered;
                        return Ok(checker::WatchResponse {
                            revision: delivered,
                            progress: true,
                            ..Default::default()
                        });
                    }
                }
            }
        }
    }
}

/// A router event as the checker records it.
fn to_event(e: &proto::mvccpb::Event) -> checker::WatchEvent {
    let kind = if e.r#type == proto::mvccpb::event::EventType::Delete as i32 {
        checker::EventType::Delete
    } else {
        checker::EventType::Put
    };
    let kv = e.kv.clone().unwrap_or_default();
    checker::WatchEvent {
        kind,
        key: kv.key.clone(),
        kv: to_kv(&kv),
        prev_kv: e.prev_kv.as_ref().map(to_kv),
    }
}
