//! Every node serves every request: three nodes (stores joined by the gRPC
//! raft transport, each with its own router, serving RaftTransport and
//! RegionForward on its peer port) over one placement driver. Writes and
//! compactions through followers are forwarded to the leader's node,
//! linearizable reads on followers use the leader's read index, etcd errors
//! found on the leader reach the caller unchanged, a node without a replica
//! forwards everything, and writes through a follower succeed again once a
//! new leader replaced a stopped one.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mvcc::exec::{WriteRequest, WriteResponse};
use pd::{LocalPdClient, PdClient, PdConfig, PdCore};
use proto::etcdserverpb::{request_op, PutRequest, RangeRequest, RequestOp, TxnRequest};
use proto::metapb;
use raftstore::{NodeIdent, Store};
use router::forward::GrpcForwarder;
use router::Router;
use server::forward::ForwardService;
use server::raft_transport::{GrpcTransport, RaftTransportService, StaticResolver};
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;

const REGION_ID: u64 = 1;

fn region() -> metapb::Region {
    metapb::Region {
        id: REGION_ID,
        start_key: vec![],
        end_key: vec![],
        region_epoch: Some(metapb::RegionEpoch {
            conf_ver: 1,
            version: 1,
        }),
        peers: (1..=3)
            .map(|i| metapb::Peer {
                id: i,
                node_id: i,
                role: 0,
            })
            .collect(),
    }
}

struct Node {
    store: Arc<Store>,
    router: Arc<Router>,
    stop: Option<watch::Sender<bool>>,
    server: Option<JoinHandle<Result<(), tonic::transport::Error>>>,
    _dir: TempDir,
}

struct Cluster {
    nodes: HashMap<u64, Node>,
    pd: Arc<dyn PdClient>,
    _pd_dir: TempDir,
}

impl Cluster {
    /// Nodes 1-3 hold the region; node 4 (if `with_bare_node`) holds none.
    async fn new(with_bare_node: bool) -> Cluster {
        let pd_dir = tempfile::tempdir().unwrap();
        let core = PdCore::open(PdConfig::new(pd_dir.path())).unwrap();
        let pd: Arc<dyn PdClient> = Arc::new(LocalPdClient::new(core));
        let ids: Vec<u64> = if with_bare_node {
            vec![1, 2, 3, 4]
        } else {
            vec![1, 2, 3]
        };
        let mut listeners = HashMap::new();
        let mut urls = HashMap::new();
        for &id in &ids {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            urls.insert(id, format!("http://{}", l.local_addr().unwrap()));
            listeners.insert(id, l);
        }
        let resolver = Arc::new(StaticResolver::new(urls.clone()));
        let mut nodes = HashMap::new();
        for &id in &ids {
            let dir = tempfile::tempdir().unwrap();
            let transport = Arc::new(GrpcTransport::new(
                tokio::runtime::Handle::current(),
                resolver.clone(),
            ));
            let store = Arc::new(Store::open_with_transport(dir.path(), transport).unwrap());
            let router = Arc::new(Router::new(
                store.clone(),
                pd.clone(),
                Arc::new(GrpcForwarder::new(resolver.clone())),
            ));
            let listener = listeners.remove(&id).unwrap();
            let (stop, server) = serve(store.clone(), router.clone(), listener);
            nodes.insert(
                id,
                Node {
                    store,
                    router,
                    stop: Some(stop),
                    server: Some(server),
                    _dir: dir,
                },
            );
        }
        let ident = |node_id| NodeIdent {
            cluster_id: 1,
            node_id,
        };
        for id in 1..=3 {
            nodes[&id].store.bootstrap(ident(id), region()).unwrap();
        }
        if with_bare_node {
            nodes[&4].store.set_node_ident(ident(4)).unwrap();
        }
        let node_meta = |id: u64| metapb::Node {
            id,
            peer_urls: vec![urls[&id].clone()],
            ..Default::default()
        };
        pd.bootstrap(node_meta(1), region()).await.unwrap();
        for &id in &ids[1..] {
            pd.put_node(node_meta(id)).await.unwrap();
        }
        Cluster {
            nodes,
            pd,
            _pd_dir: pd_dir,
        }
    }

    fn router(&self, id: u64) -> &Arc<Router> {
        &self.nodes[&id].router
    }

    fn live(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = (1..=3)
            .filter(|id| self.nodes[id].server.is_some())
            .collect();
        ids.sort();
        ids
    }

    /// Waits until exactly one live replica is a ready leader and tells PD,
    /// as the leader's heartbeat would.
    async fn leader(&self) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let leaders: Vec<u64> = self
                .live()
                .into_iter()
                .filter(|id| {
                    self.nodes[id]
                        .store
                        .region(REGION_ID)
                        .is_some_and(|h| h.status().ready_leader)
                })
                .collect();
            if let [leader] = leaders[..] {
                let peer = region().peers[leader as usize - 1];
                let hb = pd::RegionHeartbeat {
                    region: region(),
                    leader: peer,
                    ..Default::default()
                };
                self.pd.region_heartbeat(hb).await.unwrap();
                return leader;
            }
            assert!(Instant::now() < deadline, "no single leader: {leaders:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops node `id` entirely: its peer server and its replicas.
    async fn stop_node(&mut self, id: u64) {
        let node = self.nodes.get_mut(&id).unwrap();
        if let Some(stop) = node.stop.take() {
            let _ = stop.send(true);
        }
        if let Some(server) = node.server.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), server).await;
        }
        let store = node.store.clone();
        tokio::task::spawn_blocking(move || store.shutdown())
            .await
            .unwrap();
    }

    async fn shutdown(mut self) {
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        for id in ids {
            self.stop_node(id).await;
        }
    }
}

fn serve(
    store: Arc<Store>,
    router: Arc<Router>,
    listener: TcpListener,
) -> (
    watch::Sender<bool>,
    JoinHandle<Result<(), tonic::transport::Error>>,
) {
    let (stop, stopped) = watch::channel(false);
    let raft = RaftTransportService::new(store, stopped.clone()).into_server();
    let forward = ForwardService::new(router).into_server();
    let mut signal = stopped;
    let task = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(raft)
            .add_service(forward)
            .serve_with_incoming_shutdown(
                TcpIncoming::from(listener).with_nodelay(Some(true)),
                async move {
                    let _ = signal.wait_for(|s| *s).await;
                },
            ),
    );
    (stop, task)
}

fn put(key: &str, value: &str) -> WriteRequest {
    WriteRequest::Put(PutRequest {
        key: key.into(),
        value: value.into(),
        ..Default::default()
    })
}

fn get(key: &str, serializable: bool) -> RangeRequest {
    RangeRequest {
        key: key.into(),
        serializable,
        ..Default::default()
    }
}

async fn must_put(r: &Arc<Router>, key: &str, value: &str) -> i64 {
    match r.write(&put(key, value)).await {
        Ok(WriteResponse::Put(p)) => p.header.unwrap().revision,
        other => panic!("put {key}: {other:?}"),
    }
}

async fn value_of(r: &Arc<Router>, req: &RangeRequest) -> Option<Vec<u8>> {
    let resp = r.range(req).await.unwrap();
    resp.kvs.into_iter().next().map(|kv| kv.value)
}

/// The etcd status (code and text) a client would get for `err`.
fn etcd_status(err: router::Error) -> (tonic::Code, String) {
    let s = server::errors::status(err);
    (s.code(), s.message().to_string())
}

fn others(of: u64) -> Vec<u64> {
    (1..=3).filter(|&id| id != of).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn follower_writes_are_forwarded_and_readable_everywhere() {
    let c = Cluster::new(false).await;
    let leader = c.leader().await;
    for follower in others(leader) {
        let key = format!("from-{follower}");
        let rev = must_put(c.router(follower), &key, "v").await;
        assert!(rev > 1);
        for id in 1..=3 {
            assert_eq!(
                value_of(c.router(id), &get(&key, false)).await.as_deref(),
                Some(&b"v"[..]),
                "linearizable read on node {id}"
            );
        }
    }
    // Every kind of write goes through a follower.
    let follower = others(leader)[0];
    let r = c.router(follower);
    let del = WriteRequest::DeleteRange(proto::etcdserverpb::DeleteRangeRequest {
        key: b"from-".to_vec(),
        range_end: b"from.".to_vec(),
        ..Default::default()
    });
    match r.write(&del).await.unwrap() {
        WriteResponse::DeleteRange(d) => assert_eq!(d.deleted, 2),
        other => panic!("{other:?}"),
    }
    let txn = WriteRequest::Txn(TxnRequest {
        success: vec![RequestOp {
            request: Some(request_op::Request::RequestPut(PutRequest {
                key: b"t".to_vec(),
                value: b"1".to_vec(),
                ..Default::default()
            })),
        }],
        ..Default::default()
    });
    match r.write(&txn).await.unwrap() {
        WriteResponse::Txn(t) => assert!(t.succeeded),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        value_of(c.router(leader), &get("t", false))
            .await
            .as_deref(),
        Some(&b"1"[..])
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn linearizable_follower_reads_see_every_acknowledged_write() {
    let c = Cluster::new(false).await;
    c.leader().await;
    for i in 0..150u64 {
        let writer = i % 3 + 1;
        let reader = (i + 1) % 3 + 1;
        let value = format!("v{i}");
        let rev = must_put(c.router(writer), "k", &value).await;
        let resp = c.router(reader).range(&get("k", false)).await.unwrap();
        assert_eq!(
            resp.kvs.first().map(|kv| kv.value.clone()),
            Some(value.into_bytes()),
            "iteration {i}: write on node {writer}, read on node {reader}"
        );
        assert!(resp.header.unwrap().revision >= rev);
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn serializable_reads_are_served_by_followers() {
    let c = Cluster::new(false).await;
    let leader = c.leader().await;
    let rev = must_put(c.router(leader), "s", "x").await;
    for id in others(leader) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let resp = c.router(id).range(&get("s", true)).await.unwrap();
            let header_rev = resp.header.unwrap().revision;
            // The local replica's applied revision, never beyond it.
            let applied = c.nodes[&id]
                .store
                .region(REGION_ID)
                .unwrap()
                .status()
                .applied_revision;
            assert!(header_rev <= applied.max(1));
            if resp.kvs.first().map(|kv| kv.value.as_slice()) == Some(b"x") {
                assert!(header_rev >= rev);
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node {id} never applied the write"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn etcd_errors_through_followers_match_the_leaders() {
    let c = Cluster::new(false).await;
    let leader = c.leader().await;
    let follower = others(leader)[0];
    let dup = || {
        let op = || RequestOp {
            request: Some(request_op::Request::RequestPut(PutRequest {
                key: b"d".to_vec(),
                value: b"1".to_vec(),
                ..Default::default()
            })),
        };
        WriteRequest::Txn(TxnRequest {
            success: vec![op(), op()],
            ..Default::default()
        })
    };
    let on_leader = etcd_status(c.router(leader).write(&dup()).await.unwrap_err());
    let on_follower = etcd_status(c.router(follower).write(&dup()).await.unwrap_err());
    assert_eq!(on_follower, on_leader);
    assert_eq!(
        on_follower.1,
        "etcdserver: duplicate key given in txn request"
    );

    // Errors found only while evaluating on the leader: a txn whose
    // range reads a compacted revision (the follower cannot see it).
    let mut rev = 0;
    for i in 0..5 {
        rev = must_put(c.router(leader), "h", &format!("{i}")).await;
    }
    c.router(leader).compact(rev - 1, false).await.unwrap();
    let stale_txn = || {
        WriteRequest::Txn(TxnRequest {
            success: vec![RequestOp {
                request: Some(request_op::Request::RequestRange(RangeRequest {
                    key: b"h".to_vec(),
                    revision: rev - 2,
                    ..Default::default()
                })),
            }],
            ..Default::default()
        })
    };
    let on_leader = etcd_status(c.router(leader).write(&stale_txn()).await.unwrap_err());
    let on_follower = etcd_status(c.router(follower).write(&stale_txn()).await.unwrap_err());
    assert_eq!(on_follower, on_leader);
    assert_eq!(
        on_follower,
        (
            tonic::Code::OutOfRange,
            "etcdserver: mvcc: required revision has been compacted".to_string()
        )
    );
    // Range at a compacted and at a future revision, on every node.
    for id in 1..=3 {
        let mut req = get("h", false);
        req.revision = rev - 2;
        let err = etcd_status(c.router(id).range(&req).await.unwrap_err());
        assert_eq!(err.0, tonic::Code::OutOfRange, "node {id}: {err:?}");
        assert!(err.1.ends_with("has been compacted"), "node {id}: {err:?}");
        req.revision = rev + 1000;
        let err = etcd_status(c.router(id).range(&req).await.unwrap_err());
        assert!(
            err.1.ends_with("is a future revision"),
            "node {id}: {err:?}"
        );
    }
    // Compacting again at or below the compaction revision.
    let on_leader = etcd_status(c.router(leader).compact(rev - 1, false).await.unwrap_err());
    let on_follower = etcd_status(
        c.router(follower)
            .compact(rev - 1, false)
            .await
            .unwrap_err(),
    );
    assert_eq!(on_follower, on_leader);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn compact_and_hash_through_followers() {
    let c = Cluster::new(false).await;
    let leader = c.leader().await;
    let follower = others(leader)[1];
    let mut rev = 0;
    for i in 0..10 {
        rev = must_put(c.router(i % 3 + 1), &format!("c{}", i % 4), &format!("{i}")).await;
    }
    let current = c.router(follower).compact(rev - 2, true).await.unwrap();
    assert!(current >= rev);
    let status = c.nodes[&follower].store.region(REGION_ID).unwrap().status();
    assert_eq!(
        status.compact_revision,
        rev - 2,
        "physical compact through a follower waits for the follower's replica"
    );
    for id in 1..=3 {
        let mut req = get("c0", false);
        req.revision = rev - 3;
        let err = c.router(id).range(&req).await.unwrap_err();
        assert!(
            matches!(err, router::Error::Mvcc(mvcc::Error::Compacted)),
            "node {id}: {err:?}"
        );
    }
    // Replicas hash the same history the same way, asked on each node.
    let hashes: Vec<(u32, i64, i64)> = {
        let mut v = Vec::new();
        for id in 1..=3 {
            v.push(c.router(id).hash_kv(rev).await.unwrap());
        }
        v
    };
    assert!(hashes.iter().all(|h| *h == hashes[0]), "{hashes:?}");
    assert_eq!(hashes[0].1, rev - 2);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_without_a_replica_forwards_everything() {
    let c = Cluster::new(true).await;
    c.leader().await;
    let bare = c.router(4);
    assert!(c.nodes[&4].store.regions().is_empty());
    let rev = must_put(bare, "b", "1").await;
    assert_eq!(
        value_of(bare, &get("b", false)).await.as_deref(),
        Some(&b"1"[..])
    );
    assert_eq!(
        value_of(bare, &get("b", true)).await.as_deref(),
        Some(&b"1"[..])
    );
    for id in 1..=3 {
        assert_eq!(
            value_of(c.router(id), &get("b", false)).await.as_deref(),
            Some(&b"1"[..])
        );
    }
    let err = etcd_status(
        bare.range(&RangeRequest {
            key: b"b".to_vec(),
            revision: rev + 1000,
            ..Default::default()
        })
        .await
        .unwrap_err(),
    );
    assert!(err.1.ends_with("is a future revision"), "{err:?}");
    bare.compact(rev, false).await.unwrap();
    // HashKV of a node without a replica: the leader's node hashes the
    // region, and the answer is the replicas' own.
    let remote = bare.hash_kv(rev).await.unwrap();
    for id in 1..=3 {
        assert_eq!(c.router(id).hash_kv(rev).await.unwrap(), remote);
    }
    assert_eq!(remote.2, rev);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn follower_writes_succeed_after_the_leaders_node_stops() {
    let mut c = Cluster::new(false).await;
    let old = c.leader().await;
    let survivors = others(old);
    must_put(c.router(survivors[0]), "before", "1").await;
    c.stop_node(old).await;
    // The survivors elect a new leader; writes through either one succeed
    // (each call retries region errors for a while by itself).
    let deadline = Instant::now() + Duration::from_secs(30);
    for (i, &id) in survivors.iter().cycle().take(6).enumerate() {
        let key = format!("after{i}");
        loop {
            match c.router(id).write(&put(&key, "2")).await {
                Ok(_) => break,
                Err(e) => assert!(Instant::now() < deadline, "write on node {id}: {e}"),
            }
        }
        for &reader in &survivors {
            assert_eq!(
                value_of(c.router(reader), &get(&key, false))
                    .await
                    .as_deref(),
                Some(&b"2"[..])
            );
        }
    }
    let new = c.leader().await;
    assert_ne!(new, old);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forwarded_responses_carry_the_serving_nodes_header() {
    use proto::etcdserverpb::kv_server::Kv;
    let c = Cluster::new(false).await;
    let leader = c.leader().await;
    let follower = others(leader)[0];
    let ctx = Arc::new(server::NodeContext {
        router: c.nodes[&follower].router.clone(),
        pd: c.pd.clone(),
        ident: NodeIdent {
            cluster_id: 1,
            node_id: follower,
        },
        config: server::Config::default(),
        region_sizes: Default::default(),
        alarms: Default::default(),
    });
    let kv = server::kv::KvService::new(ctx);
    let resp = kv
        .put(tonic::Request::new(PutRequest {
            key: b"m".to_vec(),
            value: b"1".to_vec(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    let header = resp.header.unwrap();
    let term = c.nodes[&follower]
        .store
        .region(REGION_ID)
        .unwrap()
        .status()
        .term;
    assert_eq!(header.member_id, follower);
    assert_eq!(header.cluster_id, 1);
    assert_eq!(header.raft_term, term);
    assert!(header.revision > 1);
    let resp = kv
        .range(tonic::Request::new(get("m", false)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.header.unwrap().member_id, follower);
    assert_eq!(resp.kvs[0].value, b"1");
    // etcd's status for a request error found on the leader.
    let err = kv
        .range(tonic::Request::new(RangeRequest {
            key: b"m".to_vec(),
            revision: header.revision + 1000,
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::OutOfRange);
    c.shutdown().await;
}
