//! Three stores in one process joined only by the gRPC raft transport:
//! writes replicate, a follower whose server goes away catches up once it
//! is back (reconnect with backoff), one further behind than the leader's
//! log gets a region snapshot of several chunks as a file, messages to one
//! node travel in batches, and `send` never blocks even when its peer is
//! unreachable.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use proto::metapb;
use proto::raft_cmdpb::RaftCmdRequest;
use proto::raft_serverpb::RaftMessage;
use raftstore::{NodeIdent, RegionHandle, Store, StoreOptions, Transport};
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

fn write(rev: i64, key: &str, value: &str) -> RaftCmdRequest {
    test_support::raft_cluster::write_to(REGION_ID, rev, key, value)
}

struct Server {
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
}

struct Node {
    store: Arc<Store>,
    addr: SocketAddr,
    server: Option<Server>,
    batches: Arc<AtomicU64>,
    messages: Arc<AtomicU64>,
    dir: TempDir,
}

fn serve(store: Arc<Store>, listener: TcpListener, counters: &AtomicCounters) -> Server {
    let (stop, stopped) = watch::channel(false);
    let service = RaftTransportService::new(store, stopped.clone())
        .with_counters(counters.0.clone(), counters.1.clone())
        .into_server();
    let mut signal = stopped;
    let task = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming_shutdown(
                TcpIncoming::from(listener).with_nodelay(Some(true)),
                async move {
                    let _ = signal.wait_for(|s| *s).await;
                },
            ),
    );
    Server { stop, task }
}

type AtomicCounters = (Arc<AtomicU64>, Arc<AtomicU64>);

struct Cluster {
    nodes: HashMap<u64, Node>,
}

impl Cluster {
    async fn new() -> Cluster {
        Cluster::with_options(StoreOptions::default()).await
    }

    async fn with_options(options: StoreOptions) -> Cluster {
        let mut listeners = HashMap::new();
        let mut urls = HashMap::new();
        for id in 1..=3u64 {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            urls.insert(id, format!("http://{}", l.local_addr().unwrap()));
            listeners.insert(id, l);
        }
        let resolver = Arc::new(StaticResolver::new(urls));
        let mut nodes = HashMap::new();
        for id in 1..=3u64 {
            let dir = tempfile::tempdir().unwrap();
            let transport = Arc::new(GrpcTransport::new(
                tokio::runtime::Handle::current(),
                resolver.clone(),
            ));
            let store =
                Arc::new(Store::open_with_options(dir.path(), transport, options.clone()).unwrap());
            let listener = listeners.remove(&id).unwrap();
            let addr = listener.local_addr().unwrap();
            let counters: AtomicCounters = Default::default();
            let server = serve(store.clone(), listener, &counters);
            nodes.insert(
                id,
                Node {
                    store,
                    addr,
                    server: Some(server),
                    batches: counters.0,
                    messages: counters.1,
                    dir,
                },
            );
        }
        for (&id, node) in &nodes {
            node.store
                .bootstrap(
                    NodeIdent {
                        cluster_id: 1,
                        node_id: id,
                    },
                    region(),
                )
                .unwrap();
        }
        Cluster { nodes }
    }

    fn handle(&self, id: u64) -> RegionHandle {
        self.nodes[&id].store.region(REGION_ID).unwrap()
    }

    /// Waits until exactly one replica is a ready leader.
    async fn leader(&self) -> (u64, RegionHandle) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let leaders: Vec<(u64, RegionHandle)> = (1..=3)
                .map(|id| (id, self.handle(id)))
                .filter(|(_, h)| h.status().ready_leader)
                .collect();
            if leaders.len() == 1 {
                return leaders.into_iter().next().unwrap();
            }
            assert!(
                Instant::now() < deadline,
                "no single leader: {:?}",
                (1..=3)
                    .map(|id| self.handle(id).status())
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Writes `key` until one attempt is acknowledged, each attempt with the
    /// next revision after `rev`, on whichever replica leads then.
    async fn must_put(&self, rev: &mut i64, key: &str, value: &str) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            *rev += 1;
            let (_, h) = self.leader().await;
            match tokio::time::timeout(Duration::from_secs(3), h.propose(write(*rev, key, value)))
                .await
            {
                Ok(Ok(_)) => return,
                Ok(Err(e)) => assert!(Instant::now() < deadline, "put {key}: {e}"),
                Err(_) => assert!(Instant::now() < deadline, "put {key}: timed out"),
            }
        }
    }

    fn get(&self, id: u64, key: &str) -> Option<Vec<u8>> {
        self.nodes[&id]
            .store
            .mvcc()
            .snapshot()
            .get(key.as_bytes(), i64::MAX)
            .unwrap()
            .map(|kv| kv.value)
    }

    async fn must_get_on(&self, nodes: &[u64], key: &str, value: &str) {
        let deadline = Instant::now() + Duration::from_secs(15);
        for &id in nodes {
            while self.get(id, key).as_deref() != Some(value.as_bytes()) {
                assert!(
                    Instant::now() < deadline,
                    "node {id}: {key} = {:?}, want {value}",
                    self.get(id, key)
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    async fn stop_server(&mut self, id: u64) {
        let server = self.nodes.get_mut(&id).unwrap().server.take().unwrap();
        server.stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(10), server.task)
            .await
            .expect("server shuts down though peers hold streams open")
            .unwrap()
            .unwrap();
    }

    async fn start_server(&mut self, id: u64) {
        let node = self.nodes.get_mut(&id).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match TcpListener::bind(node.addr).await {
                Ok(l) => break l,
                Err(e) => {
                    assert!(Instant::now() < deadline, "rebind {}: {e}", node.addr);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        let counters = (node.batches.clone(), node.messages.clone());
        node.server = Some(serve(node.store.clone(), listener, &counters));
    }

    fn counters(&self) -> (u64, u64) {
        self.nodes.values().fold((0, 0), |(b, m), n| {
            (
                b + n.batches.load(Ordering::Relaxed),
                m + n.messages.load(Ordering::Relaxed),
            )
        })
    }

    async fn shutdown(mut self) {
        for id in 1..=3 {
            if self.nodes[&id].server.is_some() {
                self.stop_server(id).await;
            }
        }
        for node in self.nodes.values() {
            let store = node.store.clone();
            tokio::task::spawn_blocking(move || store.shutdown())
                .await
                .unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_replicate_over_grpc() {
    let c = Cluster::new().await;
    let (leader, h) = c.leader().await;
    for rev in 1..=100 {
        h.propose(write(rev, &format!("k{rev}"), &format!("v{rev}")))
            .await
            .unwrap();
    }
    c.must_get_on(&[1, 2, 3], "k100", "v100").await;
    for id in 1..=3 {
        for rev in 1..=100 {
            assert_eq!(
                c.get(id, &format!("k{rev}")).as_deref(),
                Some(format!("v{rev}").as_bytes()),
                "node {id}"
            );
        }
    }
    for id in (1..=3).filter(|&id| id != leader) {
        assert_eq!(c.handle(id).status().leader_peer_id, leader);
    }
    let (batches, messages) = c.counters();
    assert!(
        messages > 0 && batches > 0,
        "{batches} batches, {messages} messages"
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn follower_catches_up_after_its_server_returns() {
    let mut c = Cluster::new().await;
    let mut rev = 0;
    for i in 0..10 {
        c.must_put(&mut rev, &format!("a{i}"), "x").await;
    }
    let (leader, _) = c.leader().await;
    let follower = (1..=3).find(|&id| id != leader).unwrap();
    c.must_get_on(&[1, 2, 3], "a9", "x").await;

    c.stop_server(follower).await;
    for i in 0..50 {
        c.must_put(&mut rev, &format!("b{i}"), &format!("v{i}"))
            .await;
    }
    let others: Vec<u64> = (1..=3).filter(|&id| id != follower).collect();
    c.must_get_on(&others, "b49", "v49").await;
    // Proves the follower really was cut off, so catching up below needs
    // the senders to reconnect.
    assert_eq!(
        c.get(follower, "b49"),
        None,
        "follower got writes while down"
    );

    // Long enough for the senders' backoff to grow past its first steps.
    tokio::time::sleep(Duration::from_millis(500)).await;
    c.start_server(follower).await;
    c.must_get_on(&[follower], "b49", "v49").await;
    for i in 0..50 {
        assert_eq!(
            c.get(follower, &format!("b{i}")).as_deref(),
            Some(format!("v{i}").as_bytes())
        );
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_follower_behind_the_log_gets_a_snapshot_of_many_chunks() {
    let mut c = Cluster::with_options(StoreOptions {
        log_gc_threshold: 20,
        ..Default::default()
    })
    .await;
    let mut rev = 0;
    c.must_put(&mut rev, "first", "x").await;
    let (leader, _) = c.leader().await;
    let follower = (1..=3).find(|&id| id != leader).unwrap();
    c.must_get_on(&[1, 2, 3], "first", "x").await;
    c.stop_server(follower).await;
    // About 2.5 MiB: three chunks of the stream, and far past the log GC.
    let value = "s".repeat(64 * 1024);
    for i in 0..40 {
        c.must_put(&mut rev, &format!("k{i:02}"), &value).await;
    }
    assert!(c.handle(leader).status().truncated_index > 20);
    c.start_server(follower).await;
    c.must_get_on(&[follower], "k39", &value).await;
    for i in 0..40 {
        assert_eq!(
            c.get(follower, &format!("k{i:02}")).as_deref(),
            Some(value.as_bytes())
        );
    }
    // Installed files are deleted.
    let deadline = Instant::now() + Duration::from_secs(5);
    let snap_dir = c.nodes[&follower].dir.path().join("snap");
    while std::fs::read_dir(&snap_dir).unwrap().count() > 0 {
        assert!(Instant::now() < deadline, "snapshot files left behind");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn messages_to_a_node_travel_in_batches() {
    let c = Cluster::new().await;
    let (_, h) = c.leader().await;
    // Warm the connections so the counted phase is steady-state streaming.
    h.propose(write(1, "warm", "x")).await.unwrap();
    c.must_get_on(&[1, 2, 3], "warm", "x").await;

    let (b0, m0) = c.counters();
    let mut waits = Vec::new();
    for rev in 2..=401 {
        // Submitted in revision order, so they reach the log in it.
        let (tx, rx) = tokio::sync::oneshot::channel();
        h.propose_with(
            write(rev, &format!("k{rev}"), "v"),
            Box::new(move |res| {
                let _ = tx.send(res);
            }),
        );
        waits.push(rx);
    }
    for w in waits {
        w.await.unwrap().unwrap();
    }
    c.must_get_on(&[1, 2, 3], "k401", "v").await;
    let (b1, m1) = c.counters();
    let (batches, messages) = (b1 - b0, m1 - m0);
    assert!(
        batches < messages,
        "{batches} batches for {messages} messages"
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_never_blocks_on_an_unreachable_node() {
    // Nothing listens there: every connect fails and the sender backs off.
    let dead = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    let resolver = Arc::new(StaticResolver::new(HashMap::from([(2, url)])));
    let transport = GrpcTransport::new(tokio::runtime::Handle::current(), resolver);
    let start = Instant::now();
    // From a plain thread, as the raft loops call it.
    std::thread::spawn(move || {
        for i in 0..20_000u64 {
            transport.send(RaftMessage {
                region_id: 1,
                from_peer: Some(metapb::Peer {
                    id: 1,
                    node_id: 1,
                    role: 0,
                }),
                to_peer: Some(metapb::Peer {
                    id: 2,
                    node_id: 2 + (i % 2) * 10, // node 12 has no address at all
                    role: 0,
                }),
                region_epoch: None,
                message: vec![0; 64],
                ..Default::default()
            });
        }
    })
    .join()
    .unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "send blocked: {:?}",
        start.elapsed()
    );
}

fn free_port_url() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    format!("http://{}", l.local_addr().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn occupied_peer_port_fails_node_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_addr = busy.local_addr().unwrap();
    let config = server::Config {
        data_dir: dir.path().join("data"),
        listen_client_urls: vec![free_port_url()],
        listen_peer_urls: vec![format!("http://{busy_addr}")],
        ..Default::default()
    };
    let err = match server::node::start(config).await {
        Ok(_) => panic!("started on an occupied peer port"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.starts_with(&format!("listen tcp {busy_addr}: ")) && !err.contains('\n'),
        "{err}"
    );
    // Ports are checked before storage is touched.
    assert!(!dir.path().join("data").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_node_serves_raft_peers_and_shuts_down() {
    let dir = tempfile::tempdir().unwrap();
    let peer_url = free_port_url();
    let config = server::Config {
        data_dir: dir.path().join("data"),
        listen_client_urls: vec![free_port_url()],
        listen_peer_urls: vec![peer_url.clone()],
        ..Default::default()
    };
    let node = server::node::start(config).await.unwrap();
    // A peer can open the raft stream and send (for an unknown region,
    // which the store drops) while the node runs.
    let channel = tonic::transport::Endpoint::from_shared(peer_url)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = proto::raft_serverpb::raft_transport_client::RaftTransportClient::new(channel);
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(proto::raft_serverpb::RaftMessageBatch {
        messages: vec![RaftMessage {
            region_id: 999,
            from_peer: Some(metapb::Peer::default()),
            to_peer: Some(metapb::Peer::default()),
            region_epoch: None,
            message: b"not a raft message".to_vec(),
            ..Default::default()
        }],
    })
    .await
    .unwrap();
    let call = tokio::spawn(async move {
        client
            .send(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The stream is still open (tx alive): shutdown must end it, not wait.
    tokio::time::timeout(Duration::from_secs(10), node.shutdown())
        .await
        .expect("shutdown waits on an open raft stream");
    let res = tokio::time::timeout(Duration::from_secs(5), call)
        .await
        .unwrap()
        .unwrap();
    assert!(res.is_ok(), "{res:?}");
    drop(tx);
}
