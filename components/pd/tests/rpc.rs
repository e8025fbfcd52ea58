//! Drives the PD gRPC service through `RpcPdClient`, in-process.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pd::service::PdService;
use pd::{
    PdClient, PdConfig, PdCore, PdError, RegionOperator, RegionWithLeader, RpcPdClient,
    RpcPdClientConfig,
};
use proto::metapb;
use proto::pdpb::pd_server::PdServer;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

struct Server {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    handle: JoinHandle<()>,
}

impl Server {
    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Graceful stop: the listener closes and open connections get GOAWAY.
    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        tokio::time::timeout(Duration::from_secs(10), self.handle)
            .await
            .expect("server did not stop")
            .expect("server task");
    }
}

async fn start(core: Arc<PdCore>) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    let handle = tokio::spawn(async move {
        pd::service::serve(core, listener, async {
            let _ = rx.await;
        })
        .await
        .expect("serve");
    });
    Server {
        addr,
        stop: Some(tx),
        handle,
    }
}

fn open(dir: &std::path::Path) -> Arc<PdCore> {
    PdCore::open(PdConfig::new(dir)).unwrap()
}

fn config() -> RpcPdClientConfig {
    RpcPdClientConfig {
        connect_timeout: Duration::from_secs(2),
        request_timeout: Duration::from_secs(5),
    }
}

/// A 127.0.0.1 port on which nothing listens (connections are refused).
async fn dead_url() -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    format!("http://{addr}")
}

fn peer(id: u64, node_id: u64) -> metapb::Peer {
    metapb::Peer {
        id,
        node_id,
        role: metapb::PeerRole::Voter as i32,
    }
}

fn region(
    id: u64,
    start: &[u8],
    end: &[u8],
    version: u64,
    peers: Vec<metapb::Peer>,
) -> metapb::Region {
    metapb::Region {
        id,
        start_key: start.to_vec(),
        end_key: end.to_vec(),
        region_epoch: Some(metapb::RegionEpoch {
            conf_ver: 1,
            version,
        }),
        peers,
    }
}

fn node(id: u64) -> metapb::Node {
    metapb::Node {
        id,
        name: format!("n{id}"),
        peer_urls: vec![format!("http://127.0.0.1:{}", 3000 + id)],
        client_urls: vec![format!("http://127.0.0.1:{}", 4000 + id)],
        state: metapb::NodeState::Up as i32,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn full_api_over_grpc() {
    let dir = tempfile::tempdir().unwrap();
    let core = open(dir.path());
    let server = start(core.clone()).await;
    let pd = RpcPdClient::connect(&[server.url()], config())
        .await
        .unwrap();

    assert_eq!(pd.cluster_id().await.unwrap(), core.cluster_id());
    assert!(!pd.is_bootstrapped().await.unwrap());
    assert_eq!(pd.get_region(b"a").await, Err(PdError::NotBootstrapped));
    assert_eq!(pd.current_revision().await.unwrap(), 1);
    assert_eq!(pd.alloc_revisions(1).await.unwrap(), 2);
    assert!(matches!(
        pd.alloc_revisions(0).await,
        Err(PdError::InvalidArgument(_))
    ));

    let node_id = pd.alloc_id().await.unwrap();
    let region_id = pd.alloc_id().await.unwrap();
    let peer_id = pd.alloc_id().await.unwrap();
    assert!(0 < node_id && node_id < region_id && region_id < peer_id);
    let p1 = peer(peer_id, node_id);
    let r1 = region(region_id, b"", b"", 1, vec![p1]);
    pd.bootstrap(node(node_id), r1.clone()).await.unwrap();
    assert!(pd.is_bootstrapped().await.unwrap());
    assert_eq!(
        pd.bootstrap(node(node_id), r1.clone()).await,
        Err(PdError::AlreadyBootstrapped)
    );

    // Nodes.
    let n2 = node(pd.alloc_id().await.unwrap());
    pd.put_node(n2.clone()).await.unwrap();
    assert_eq!(pd.get_node(n2.id).await.unwrap(), Some(n2.clone()));
    assert_eq!(pd.get_node(999_999).await.unwrap(), None);
    assert_eq!(pd.get_all_nodes().await.unwrap().len(), 2);
    assert!(matches!(
        pd.put_node(node(0)).await,
        Err(PdError::InvalidArgument(_))
    ));

    // Regions: bootstrap region has no leader until a heartbeat.
    let found = pd.get_region(b"k").await.unwrap().unwrap();
    assert_eq!(found, RegionWithLeader::new(r1.clone()));
    // Split into [, m) and [m, ).
    let r2_id = pd.alloc_id().await.unwrap();
    let p2 = peer(pd.alloc_id().await.unwrap(), node_id);
    let left = region(region_id, b"", b"m", 2, vec![p1]);
    let right = region(r2_id, b"m", b"", 2, vec![p2]);
    pd.region_heartbeat(hb(left.clone(), p1)).await.unwrap();
    let mut right_hb = hb(right.clone(), p2);
    right_hb.approximate_size = 4096;
    right_hb.approximate_keys = 12;
    pd.region_heartbeat(right_hb).await.unwrap();
    let with = |region: &metapb::Region, leader, size, keys| {
        Some(RegionWithLeader {
            region: region.clone(),
            leader: Some(leader),
            approximate_size: size,
            approximate_keys: keys,
        })
    };
    assert_eq!(pd.get_region(b"a").await.unwrap(), with(&left, p1, 0, 0));
    assert_eq!(
        pd.get_region(b"m").await.unwrap(),
        with(&right, p2, 4096, 12)
    );
    assert_eq!(
        pd.get_region_by_id(r2_id).await.unwrap(),
        with(&right, p2, 4096, 12)
    );
    assert_eq!(pd.get_region_by_id(424_242).await.unwrap(), None);
    let all = pd.scan_regions(b"", b"", 0).await.unwrap();
    assert_eq!(
        all.iter().map(|r| r.region.id).collect::<Vec<_>>(),
        vec![region_id, r2_id]
    );
    assert_eq!(
        (all[1].approximate_size, all[1].approximate_keys),
        (4096, 12)
    );
    assert_eq!(pd.scan_regions(b"n", b"", 0).await.unwrap().len(), 1);
    assert_eq!(pd.scan_regions(b"", b"", 1).await.unwrap().len(), 1);
    // Stale heartbeat (older version) is ignored, not an error.
    pd.region_heartbeat(hb(r1.clone(), p1)).await.unwrap();
    assert_eq!(pd.get_region(b"z").await.unwrap().unwrap().region.id, r2_id);
    // A leader outside the region is rejected.
    assert!(matches!(
        pd.region_heartbeat(hb(left.clone(), peer(77, 77))).await,
        Err(PdError::InvalidArgument(_))
    ));

    let members = pd.get_members().await.unwrap();
    assert_eq!(members.members.len(), 1);

    server.stop().await;
}

/// Many concurrent callers: allocations are disjoint and, failure-free,
/// consecutive; every current_revision is at least every revision whose
/// allocation completed before the read started; and batching happens.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_revisions_are_batched_disjoint_and_linearizable() {
    let dir = tempfile::tempdir().unwrap();
    let core = open(dir.path());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let rpcs = Arc::new(AtomicUsize::new(0));
    let counter = rpcs.clone();
    let svc = PdServer::with_interceptor(PdService::new(core.clone()), move |req| {
        counter.fetch_add(1, Ordering::Relaxed);
        Ok(req)
    });
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener),
                async {
                    let _ = stop_rx.await;
                },
            ),
    );

    let pd = RpcPdClient::connect(&[format!("http://{addr}")], config())
        .await
        .unwrap();
    let before = rpcs.load(Ordering::Relaxed);

    const TASKS: usize = 64;
    const OPS: usize = 40;
    // Several rounds: a batcher that serves a reader from an RPC that started
    // before the reader arrived fails the floor check only now and then.
    const ROUNDS: usize = 20;
    let max_done = Arc::new(AtomicI64::new(1));
    let client_calls = Arc::new(AtomicUsize::new(0));
    let mut seen = BTreeSet::new();
    let mut count = 0usize;
    for _ in 0..ROUNDS {
        let mut tasks = Vec::new();
        for t in 0..TASKS {
            let pd = pd.clone();
            let core = core.clone();
            let max_done = max_done.clone();
            let client_calls = client_calls.clone();
            tasks.push(tokio::spawn(async move {
                let mut mine = Vec::new();
                for i in 0..OPS {
                    if t % 4 == 0 && (t + i) % 3 != 0 {
                        // Another node allocating through its own path: a
                        // reader of this client must see it once completed.
                        let n = (i % 3 + 1) as u32;
                        let first = core.alloc_revisions(n).await.unwrap();
                        let last = first + i64::from(n) - 1;
                        mine.push((first, last));
                        max_done.fetch_max(last, Ordering::SeqCst);
                        tokio::task::yield_now().await;
                    } else if (t + i) % 3 == 0 {
                        let floor = max_done.load(Ordering::SeqCst);
                        client_calls.fetch_add(1, Ordering::Relaxed);
                        let cur = pd.current_revision().await.unwrap();
                        assert!(cur >= floor, "current_revision {cur} < completed {floor}");
                    } else {
                        let n = ((t * 7 + i) % 5 + 1) as u32;
                        client_calls.fetch_add(1, Ordering::Relaxed);
                        let first = pd.alloc_revisions(n).await.unwrap();
                        let last = first + i64::from(n) - 1;
                        mine.push((first, last));
                        max_done.fetch_max(last, Ordering::SeqCst);
                    }
                }
                mine
            }));
        }
        for t in tasks {
            for (first, last) in t.await.unwrap() {
                for r in first..=last {
                    count += 1;
                    assert!(seen.insert(r), "revision {r} handed out twice");
                }
            }
        }
    }
    let calls = client_calls.load(Ordering::Relaxed);
    let used = rpcs.load(Ordering::Relaxed) - before;
    assert!(used < calls, "no batching: {used} RPCs for {calls} calls");
    // The client's own account agrees with what the server saw.
    let stats = pd.oracle_stats();
    assert_eq!(stats.rpcs() as usize, used);
    assert_eq!(stats.calls() as usize, calls);
    assert_eq!(stats.cancelled, 0);
    // Failure-free: consecutive from 2 (a fresh cluster is at 1).
    assert_eq!(seen.first().copied(), Some(2));
    assert_eq!(seen.last().copied(), Some(1 + count as i64));
    assert_eq!(pd.current_revision().await.unwrap(), 1 + count as i64);
    assert_eq!(core.current_revision().await.unwrap(), 1 + count as i64);

    let _ = stop_tx.send(());
    server.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_skips_dead_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let core = open(dir.path());
    let server = start(core.clone()).await;
    let dead = dead_url().await;
    let pd = RpcPdClient::connect(&[dead.clone(), server.url()], config())
        .await
        .unwrap();
    assert_eq!(
        pd.current_endpoint().await,
        Some(format!("{}/", server.url()))
    );
    assert_eq!(pd.alloc_revisions(2).await.unwrap(), 2);
    server.stop().await;

    // Nothing alive at all: a clear Unavailable naming the endpoints.
    let err = RpcPdClient::connect(std::slice::from_ref(&dead), config())
        .await
        .unwrap_err();
    match err {
        PdError::Unavailable(m) => assert!(m.contains(&dead), "{m}"),
        other => panic!("unexpected {other:?}"),
    }
    assert!(matches!(
        RpcPdClient::connect::<String>(&[], config()).await,
        Err(PdError::InvalidArgument(_))
    ));
    assert!(matches!(
        RpcPdClient::connect(&["http://"], config()).await,
        Err(PdError::InvalidArgument(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fails_over_when_the_connected_endpoint_dies() {
    let dir = tempfile::tempdir().unwrap();
    let core = open(dir.path());
    let a = start(core.clone()).await;
    // B's port is reserved now and served later by the same core.
    let b_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let b_url = format!("http://{}", b_listener.local_addr().unwrap());

    let pd = RpcPdClient::connect(&[a.url(), b_url.clone()], config())
        .await
        .unwrap();
    assert_eq!(pd.alloc_revisions(1).await.unwrap(), 2);
    assert_eq!(pd.current_endpoint().await, Some(format!("{}/", a.url())));

    a.stop().await;
    let (stop_b, rx) = oneshot::channel::<()>();
    let b = tokio::spawn(pd::service::serve(core.clone(), b_listener, async {
        let _ = rx.await;
    }));

    // The broken connection is detected and B takes over, transparently.
    assert_eq!(pd.alloc_revisions(1).await.unwrap(), 3);
    assert_eq!(pd.current_revision().await.unwrap(), 3);
    assert!(pd.alloc_id().await.unwrap() > 0);
    assert_eq!(pd.current_endpoint().await, Some(format!("{b_url}/")));

    let _ = stop_b.send(());
    b.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_an_endpoint_of_another_cluster() {
    let dir_a = tempfile::tempdir().unwrap();
    let dir_b = tempfile::tempdir().unwrap();
    let a = start(open(dir_a.path())).await;
    let b_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let b_url = format!("http://{}", b_listener.local_addr().unwrap());
    let pd = RpcPdClient::connect(&[a.url(), b_url], config())
        .await
        .unwrap();
    let cluster_a = pd.cluster_id().await.unwrap();

    a.stop().await;
    let other = open(dir_b.path());
    assert_ne!(other.cluster_id(), cluster_a);
    let (stop_b, rx) = oneshot::channel::<()>();
    let b = tokio::spawn(pd::service::serve(other, b_listener, async {
        let _ = rx.await;
    }));

    match pd.alloc_revisions(1).await {
        Err(PdError::Unavailable(m)) => assert!(m.contains("cluster id"), "{m}"),
        other => panic!("expected Unavailable, got {other:?}"),
    }
    let _ = stop_b.send(());
    b.await.unwrap().unwrap();
}

/// Split and merge requests, their errors and the scheduling status, over
/// gRPC.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn split_and_merge_requests_and_scheduling_over_grpc() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = PdConfig::new(dir.path());
    cfg.schedule.max_replicas = 1;
    let core = PdCore::open(cfg).unwrap();
    let server = start(core.clone()).await;
    let pd = RpcPdClient::connect(&[server.url()], config())
        .await
        .unwrap();
    assert_eq!(pd.split_region(b"k").await, Err(PdError::NotBootstrapped));
    let p1 = peer(3, 1);
    let whole = region(2, b"", b"", 1, vec![p1]);
    pd.bootstrap(node(1), whole.clone()).await.unwrap();

    assert!(matches!(
        pd.split_region(b"").await,
        Err(PdError::InvalidArgument(_))
    ));
    let asked = pd.split_region(b"k").await.unwrap();
    assert_eq!(asked, RegionWithLeader::new(whole.clone()));
    let ops = pd.get_operators().await.unwrap();
    assert_eq!(ops.len(), 1);
    assert_eq!(
        (ops[0].region_id, ops[0].source.as_str()),
        (2, pd::operators::SOURCE_SPLIT_REQUEST)
    );
    assert_eq!(
        pd.region_heartbeat(hb(whole.clone(), p1)).await.unwrap(),
        Some(RegionOperator::Split { key: b"k".to_vec() })
    );
    // Only the right half reported: the keys left of k have no region.
    let right = region(4, b"k", b"", 2, vec![peer(5, 1)]);
    pd.region_heartbeat(hb(right, peer(5, 1))).await.unwrap();
    assert!(matches!(
        pd.split_region(b"a").await,
        Err(PdError::RegionNotFound(_))
    ));
    assert!(matches!(
        pd.split_region(b"k").await,
        Err(PdError::InvalidArgument(_))
    ));

    // Merges: asked right first, ordered left into right; handed to the
    // left one's leader with PD's meta of the right one.
    let left = region(2, b"", b"k", 2, vec![p1]);
    pd.region_heartbeat(hb(left.clone(), p1)).await.unwrap();
    assert_eq!(
        pd.merge_regions(2, 99).await,
        Err(PdError::RegionNotFound("region 99 not found".into()))
    );
    assert!(matches!(
        pd.merge_regions(4, 4).await,
        Err(PdError::InvalidArgument(_))
    ));
    let (source, target) = pd.merge_regions(4, 2).await.unwrap();
    assert_eq!((source.region.id, target.region.id), (2, 4));
    assert_eq!(source.leader, Some(p1));
    let ops = pd.get_operators().await.unwrap();
    assert_eq!(
        ops.iter()
            .map(|o| (o.region_id, o.source.as_str()))
            .collect::<Vec<_>>(),
        [(2, pd::operators::SOURCE_MERGE_REQUEST)]
    );
    assert_eq!(
        pd.region_heartbeat(hb(left, p1)).await.unwrap(),
        Some(RegionOperator::Merge {
            target: target.region
        })
    );

    let status = pd.get_schedulers().await.unwrap();
    assert_eq!(status.max_replicas, 1);
    let names: Vec<&str> = status.schedulers.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "replica-placement",
            "leader-balance",
            "region-balance",
            "merge-checker"
        ]
    );
    assert_eq!(status.split_timeout, Duration::from_secs(60));
    assert_eq!(status.merge_timeout, Duration::from_secs(60));
    assert_eq!(status.max_merge_region_keys, 200_000);
    assert_eq!(status.split_merge_interval, Duration::from_secs(600));
    assert_eq!(status.merge_limit, 4);

    server.stop().await;
}

/// Batched heartbeats over gRPC: outcomes in order, per-heartbeat errors
/// in their place, one proposal for the batch's meta changes, and errors
/// of the whole batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batched_heartbeats_over_grpc() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = PdConfig::new(dir.path());
    cfg.schedule.max_replicas = 1;
    let core = PdCore::open(cfg).unwrap();
    let server = start(core.clone()).await;
    let pd = RpcPdClient::connect(&[server.url()], config())
        .await
        .unwrap();
    let p1 = peer(3, 1);
    let whole = region(2, b"", b"", 1, vec![p1]);
    assert_eq!(
        pd.region_heartbeats(vec![hb(whole.clone(), p1)]).await,
        Err(PdError::NotBootstrapped)
    );
    assert_eq!(pd.region_heartbeats(Vec::new()).await, Ok(Vec::new()));
    pd.bootstrap(node(1), whole.clone()).await.unwrap();
    pd.split_region(b"k").await.unwrap();

    let outcomes = pd
        .region_heartbeats(vec![hb(whole.clone(), peer(77, 77)), hb(whole.clone(), p1)])
        .await
        .unwrap();
    assert_eq!(outcomes.len(), 2);
    assert!(matches!(outcomes[0], Err(PdError::InvalidArgument(_))));
    assert_eq!(
        outcomes[1],
        Ok(Some(RegionOperator::Split { key: b"k".to_vec() }))
    );

    // The split's two sides in one batch: one raft proposal.
    let left = region(2, b"", b"k", 2, vec![p1]);
    let right = region(4, b"k", b"", 2, vec![peer(5, 1)]);
    let mut right_hb = hb(right.clone(), peer(5, 1));
    right_hb.approximate_size = 4096;
    let before = core.heartbeat_stats();
    let outcomes = pd
        .region_heartbeats(vec![hb(left.clone(), p1), right_hb])
        .await
        .unwrap();
    assert_eq!(outcomes, vec![Ok(None), Ok(None)]);
    let after = core.heartbeat_stats();
    assert_eq!(
        (
            after.batches - before.batches,
            after.heartbeats - before.heartbeats,
            after.proposals - before.proposals
        ),
        (1, 2, 1)
    );
    let all = pd.scan_regions(b"", b"", 0).await.unwrap();
    assert_eq!(
        all.iter()
            .map(|r| (r.region.clone(), r.approximate_size))
            .collect::<Vec<_>>(),
        vec![(left.clone(), 0), (right.clone(), 4096)]
    );

    // On the wire: a heartbeat without a region is answered in its place,
    // the others as usual.
    let mut raw = proto::pdpb::pd_client::PdClient::connect(server.url())
        .await
        .unwrap();
    let resp = raw
        .region_heartbeats(proto::pdpb::RegionHeartbeatsRequest {
            header: None,
            heartbeats: vec![
                proto::pdpb::RegionHeartbeatRequest {
                    region: Some(left.clone()),
                    leader: Some(p1),
                    ..Default::default()
                },
                proto::pdpb::RegionHeartbeatRequest::default(),
            ],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(resp.header.unwrap().error.is_none());
    let errors: Vec<Option<i32>> = resp
        .responses
        .iter()
        .map(|r| r.header.as_ref().unwrap().error.as_ref().map(|e| e.r#type))
        .collect();
    assert_eq!(
        errors,
        [None, Some(proto::pdpb::ErrorType::InvalidArgument as i32)]
    );
    // A batch for another cluster is refused as a whole.
    let resp = raw
        .region_heartbeats(proto::pdpb::RegionHeartbeatsRequest {
            header: Some(proto::pdpb::RequestHeader {
                cluster_id: core.cluster_id() + 1,
            }),
            heartbeats: vec![proto::pdpb::RegionHeartbeatRequest::default()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        resp.header.unwrap().error.map(|e| e.r#type),
        Some(proto::pdpb::ErrorType::ClusterIdMismatch as i32)
    );
    assert!(resp.responses.is_empty());

    server.stop().await;
}

fn hb(region: metapb::Region, leader: metapb::Peer) -> pd::RegionHeartbeat {
    pd::RegionHeartbeat {
        region,
        leader,
        ..Default::default()
    }
}
