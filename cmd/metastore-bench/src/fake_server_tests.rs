//! End-to-end runs against an in-process server that implements only KV
//! (Watch and Lease answer Unimplemented, as an early MetaStore node may):
//! every request must be sent exactly once and accounted for, and missing
//! services must show up as errors by kind, not as a crash.

use crate::cli::Cli;
use clap::Parser;
use proto::etcdserverpb::kv_server::{Kv, KvServer};
use proto::etcdserverpb::{
    CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse, PutRequest,
    PutResponse, RangeRequest, RangeResponse, TxnRequest, TxnResponse,
};
use serde_json::Value;
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

#[derive(Default)]
struct Seen {
    puts: AtomicU64,
    ranges: AtomicU64,
    txns: AtomicU64,
    txn_ops: AtomicU64,
    serializable: AtomicU64,
    keys: Mutex<HashSet<Vec<u8>>>,
    peers: Mutex<HashSet<std::net::SocketAddr>>,
}

#[derive(Clone, Default)]
struct FakeKv(Arc<Seen>);

impl FakeKv {
    fn note_peer<T>(&self, r: &Request<T>) {
        if let Some(a) = r.remote_addr() {
            self.0.peers.lock().unwrap().insert(a);
        }
    }
}

#[tonic::async_trait]
impl Kv for FakeKv {
    async fn range(&self, r: Request<RangeRequest>) -> Result<Response<RangeResponse>, Status> {
        self.note_peer(&r);
        self.0.ranges.fetch_add(1, Ordering::Relaxed);
        if r.get_ref().serializable {
            self.0.serializable.fetch_add(1, Ordering::Relaxed);
        }
        Ok(Response::new(RangeResponse::default()))
    }
    async fn put(&self, r: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        self.note_peer(&r);
        self.0.puts.fetch_add(1, Ordering::Relaxed);
        self.0.keys.lock().unwrap().insert(r.into_inner().key);
        Ok(Response::new(PutResponse::default()))
    }
    async fn delete_range(
        &self,
        _: Request<DeleteRangeRequest>,
    ) -> Result<Response<DeleteRangeResponse>, Status> {
        Err(Status::unimplemented("not in the fake"))
    }
    async fn txn(&self, r: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        self.note_peer(&r);
        self.0.txns.fetch_add(1, Ordering::Relaxed);
        let ops = r.get_ref().success.len() as u64;
        self.0.txn_ops.fetch_add(ops, Ordering::Relaxed);
        Ok(Response::new(TxnResponse {
            succeeded: true,
            ..Default::default()
        }))
    }
    async fn compact(
        &self,
        _: Request<CompactionRequest>,
    ) -> Result<Response<CompactionResponse>, Status> {
        Err(Status::unimplemented("not in the fake"))
    }
}

async fn serve() -> (String, Arc<Seen>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let kv = FakeKv::default();
    let seen = kv.0.clone();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(KvServer::new(kv))
            .serve_with_incoming(TcpIncoming::from(listener)),
    );
    (format!("127.0.0.1:{}", addr.port()), seen)
}

async fn bench(ep: &str, args: &[&str]) -> Value {
    let mut argv = vec!["metastore-bench", "--endpoints", ep, "--output", "json"];
    argv.extend_from_slice(args);
    let cli = Cli::try_parse_from(argv).unwrap();
    let (_text, js) = crate::run(cli).await.unwrap();
    js
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_sends_exactly_total_over_the_given_connections() {
    let (ep, seen) = serve().await;
    let v = bench(
        &ep,
        &[
            "--conns=3",
            "--clients=7",
            "put",
            "--total=500",
            "--key-space-size=40",
            "--sequential-keys",
        ],
    )
    .await;
    assert_eq!(v["total"], 500);
    assert_eq!(v["errors"], 0);
    assert_eq!(seen.puts.load(Ordering::Relaxed), 500);
    // Sequential keys over a space of 40 touch exactly 40 distinct keys.
    assert_eq!(seen.keys.lock().unwrap().len(), 40);
    // Three separate TCP connections, not one multiplexed channel.
    assert_eq!(seen.peers.lock().unwrap().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_and_txns_are_counted() {
    let (ep, seen) = serve().await;
    let v = bench(
        &ep,
        &[
            "--clients=4",
            "range",
            "k",
            "--consistency=s",
            "--total=120",
        ],
    )
    .await;
    assert_eq!(
        (v["total"].as_u64(), v["errors"].as_u64()),
        (Some(120), Some(0))
    );
    assert_eq!(seen.ranges.load(Ordering::Relaxed), 120);
    assert_eq!(seen.serializable.load(Ordering::Relaxed), 120);

    let v = bench(
        &ep,
        &[
            "--clients=4",
            "txn-put",
            "--txn-ops=3",
            "--key-space-size=9",
            "--total=50",
        ],
    )
    .await;
    assert_eq!(
        (v["total"].as_u64(), v["errors"].as_u64()),
        (Some(50), Some(0))
    );
    assert_eq!(seen.txns.load(Ordering::Relaxed), 50);
    assert_eq!(seen.txn_ops.load(Ordering::Relaxed), 150);

    let v = bench(
        &ep,
        &["--clients=4", "txn-mixed", "--total=80", "--rw-ratio=1"],
    )
    .await;
    assert_eq!(v["total"], 80);
    let r = v["parts"]["read"]["total"].as_u64().unwrap();
    let w = v["parts"]["write"]["total"].as_u64().unwrap();
    assert_eq!(r + w, 80);
    assert_eq!(seen.txns.load(Ordering::Relaxed), 130);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_lease_service_is_reported_by_kind() {
    let (ep, _seen) = serve().await;
    let v = bench(&ep, &["--clients=3", "lease-keepalive", "--total=90"]).await;
    assert_eq!(v["total"], 90);
    assert_eq!(v["errors"], 90);
    assert_eq!(v["errors_by_kind"]["Unimplemented"]["count"], 90);
    assert!(v["latency_ms"]["p99"].is_null());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_watch_service_is_reported_by_kind() {
    let (ep, seen) = serve().await;
    let v = bench(
        &ep,
        &[
            "--clients=2",
            "watch",
            "--streams=2",
            "--watch-per-stream=3",
            "--watched-key-total=2",
            "--put-total=10",
            "--event-timeout=5s",
        ],
    )
    .await;
    // 6 watchers, 3 per key, 5 puts per key: 30 events due, none possible.
    assert_eq!(v["total"], 30);
    assert_eq!(v["errors_by_kind"]["Unimplemented"]["count"], 30);
    assert_eq!(v["parts"]["watch-create"]["errors"], 6);
    assert_eq!(v["parts"]["put"]["total"], 10);
    assert_eq!(v["parts"]["put"]["errors"], 0);
    assert_eq!(seen.puts.load(Ordering::Relaxed), 10);
}
