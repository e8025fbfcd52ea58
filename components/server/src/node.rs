//! Start-up, bootstrap and shutdown of a node.

use std::sync::Arc;

use pd::{LocalPdClient, PdClient, PdConfig, PdCore, RpcPdClient, RpcPdClientConfig};
use proto::etcdserverpb::{
    cluster_server::ClusterServer, kv_server::KvServer, lease_server::LeaseServer,
    maintenance_server::MaintenanceServer, watch_server::WatchServer,
};
use proto::metapb;
use raftstore::{NodeIdent, Store, StoreOptions};
use router::forward::GrpcForwarder;
use router::Router;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;
use tracing::info;

use crate::cluster::ClusterService;
use crate::config::{socket_addr, Config};
use crate::forward::ForwardService;
use crate::kv::{KvService, MAX_GRPC_RECV_BYTES};
use crate::lease::LeaseService;
use crate::maintenance::MaintenanceService;
use crate::raft_transport::{GrpcTransport, PdResolver, RaftTransportService};
use crate::split_check::SplitLimits;
use crate::watch::WatchService;
use crate::NodeContext;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("listen tcp {addr}: {err}")]
    Listen { addr: String, err: std::io::Error },
    #[error("cannot use data dir {path}: {err}")]
    DataDir { path: String, err: String },
    #[error("placement driver: {0}")]
    Pd(#[from] pd::PdError),
    #[error("storage: {0}")]
    Store(#[from] raftstore::Error),
    #[error("{0}")]
    Cluster(String),
}

/// A started node; [`RunningNode::shutdown`] stops it cleanly.
pub struct RunningNode {
    pub ctx: Arc<NodeContext>,
    store: Arc<Store>,
    pd_core: Option<Arc<PdCore>>,
    /// Ends the client servers; then `stop_peers` ends the peer servers
    /// (raft transport, forwarding) and the heartbeats.
    stop_clients: watch::Sender<bool>,
    stop_peers: watch::Sender<bool>,
    /// Client servers first, then peer servers (`peer_servers_from` on).
    servers: Vec<JoinHandle<Result<(), tonic::transport::Error>>>,
    peer_servers_from: usize,
    heartbeats: JoinHandle<()>,
    split_checks: JoinHandle<()>,
    /// Keeps the alarm list fresh and raises CORRUPT (see `alarm`).
    alarms: JoinHandle<()>,
    /// Resolves abandoned locks of transactions over several regions.
    lock_resolver: JoinHandle<()>,
    /// Keeps the regions' resolved revisions fresh.
    resolved_tracker: JoinHandle<()>,
    /// Drives the merges of the regions led here (see `router::merge`).
    merge_driver: JoinHandle<()>,
    compaction_catch_up: JoinHandle<()>,
    lease_expiry: JoinHandle<()>,
    removal: JoinHandle<()>,
}

pub async fn start(config: Config) -> Result<RunningNode, StartError> {
    let config = config.finish()?;
    // Ports first: an occupied port is the most common start-up error and
    // must not leave half-opened storage behind.
    let mut listeners = Vec::new();
    for url in &config.listen_client_urls {
        let addr = socket_addr(url)?;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|err| StartError::Listen {
                addr: addr.to_string(),
                err,
            })?;
        listeners.push(listener);
    }
    let mut peer_listeners = Vec::new();
    for url in &config.listen_peer_urls {
        let addr = socket_addr(url)?;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|err| StartError::Listen {
                addr: addr.to_string(),
                err,
            })?;
        peer_listeners.push(listener);
    }
    let data_dir = config.data_dir.clone();
    let data_dir_error = |err: String| StartError::DataDir {
        path: data_dir.display().to_string(),
        err,
    };
    std::fs::create_dir_all(&data_dir).map_err(|e| data_dir_error(e.to_string()))?;
    let probe = data_dir.join(".write-probe");
    std::fs::write(&probe, b"").map_err(|e| data_dir_error(e.to_string()))?;
    let _ = std::fs::remove_file(&probe);

    let (pd, pd_core): (Arc<dyn PdClient>, Option<Arc<PdCore>>) = if config.pd_endpoints.is_empty()
    {
        let mut pd_config = PdConfig::new(data_dir.join("pd"));
        // The embedded PD's API is served on the client URLs (below).
        pd_config.client_urls = config.advertise_client_urls.clone();
        let core = PdCore::open(pd_config).map_err(|e| data_dir_error(e.to_string()))?;
        (Arc::new(LocalPdClient::new(core.clone())), Some(core))
    } else {
        (Arc::new(connect_pd(&config.pd_endpoints).await?), None)
    };
    // One address cache for raft messages and forwarded requests.
    let resolver = Arc::new(PdResolver::new(pd.clone()));
    let transport = Arc::new(GrpcTransport::new(
        tokio::runtime::Handle::current(),
        resolver.clone(),
    ));
    let options = StoreOptions {
        consistency_check_interval: config.consistency_check_interval.0,
        pollers: config.raft_pollers,
        ..Default::default()
    };
    let store = Arc::new(
        Store::open_with_options(&data_dir, transport, options)
            .map_err(|e| data_dir_error(e.to_string()))?,
    );
    let ident = join_cluster(&config, &store, pd.as_ref()).await?;
    info!(
        cluster_id = ident.cluster_id,
        node_id = ident.node_id,
        "node identity"
    );

    let ctx = Arc::new(NodeContext {
        router: Arc::new(Router::new(
            store.clone(),
            pd.clone(),
            Arc::new(GrpcForwarder::new(resolver)),
        )),
        pd,
        ident,
        config: config.clone(),
        region_sizes: Arc::default(),
        alarms: Arc::default(),
    });
    let (stop_clients, clients_stopped) = watch::channel(false);
    let (stop_peers, stopped) = watch::channel(false);
    let mut servers = Vec::new();
    for listener in listeners {
        let addr = listener.local_addr().ok();
        let routes = grpc_routes(ctx.clone(), pd_core.clone());
        let mut stopped = clients_stopped.clone();
        let server = tonic::transport::Server::builder()
            .accept_http1(true)
            .add_routes(routes)
            // Our own incoming stream bypasses the builder's nodelay setting;
            // without it Nagle holds a response's trailers for the client's
            // delayed ACK (40 ms) whenever the connection is otherwise idle.
            .serve_with_incoming_shutdown(
                TcpIncoming::from(listener).with_nodelay(Some(true)),
                async move {
                    let _ = stopped.wait_for(|s| *s).await;
                },
            );
        info!(?addr, "serving etcd clients");
        servers.push(tokio::spawn(server));
    }
    let peer_servers_from = servers.len();
    for listener in peer_listeners {
        let addr = listener.local_addr().ok();
        let mut stopped_signal = stopped.clone();
        let service = RaftTransportService::new(store.clone(), stopped.clone()).into_server();
        let forward = ForwardService::new(ctx.router.clone()).into_server();
        let server = tonic::transport::Server::builder()
            .add_service(service)
            .add_service(forward)
            // Raft heartbeats and appends are small; Nagle would hold them.
            .serve_with_incoming_shutdown(
                TcpIncoming::from(listener).with_nodelay(Some(true)),
                async move {
                    let _ = stopped_signal.wait_for(|s| *s).await;
                },
            );
        info!(?addr, "serving raft peers and forwarded requests");
        servers.push(tokio::spawn(server));
    }
    let heartbeats = tokio::spawn(crate::heartbeat::run(
        ctx.router.clone(),
        ctx.pd.clone(),
        ctx.region_sizes.clone(),
        stopped.clone(),
    ));
    let split_checks = tokio::spawn(crate::split_check::run(
        ctx.router.clone(),
        ctx.region_sizes.clone(),
        SplitLimits {
            max_size: config.region_max_size.0,
            max_keys: config.region_max_keys,
            interval: config.split_check_interval.0,
        },
        stopped.clone(),
    ));
    let alarms = tokio::spawn(crate::alarm::run(
        ctx.pd.clone(),
        store.clone(),
        ctx.alarms.clone(),
        stopped.clone(),
    ));
    let removal = tokio::spawn(removed_from_cluster(ctx.pd.clone(), ctx.ident.node_id));
    let lock_resolver = ctx.router.start_lock_resolver();
    let resolved_tracker = ctx.router.start_resolved_tracker();
    let merge_driver = ctx.router.start_merge_driver();
    let compaction_catch_up = ctx.router.start_compaction_catch_up();
    let lease_expiry = ctx.router.start_lease_expiry();
    Ok(RunningNode {
        ctx,
        store,
        pd_core,
        stop_clients,
        stop_peers,
        servers,
        peer_servers_from,
        heartbeats,
        split_checks,
        alarms,
        removal,
        lock_resolver,
        resolved_tracker,
        merge_driver,
        compaction_catch_up,
        lease_expiry,
    })
}

/// The client port's services: etcd's, and in dev mode the embedded PD's
/// (`pdpb.PD`, for `metastore-ctl`).
fn grpc_routes(ctx: Arc<NodeContext>, pd_core: Option<Arc<PdCore>>) -> tonic::service::Routes {
    let kv = KvServer::new(KvService::new(ctx.clone()))
        .max_decoding_message_size(MAX_GRPC_RECV_BYTES)
        .max_encoding_message_size(usize::MAX);
    let maintenance = MaintenanceServer::new(MaintenanceService::new(ctx.clone()))
        .max_decoding_message_size(MAX_GRPC_RECV_BYTES)
        .max_encoding_message_size(usize::MAX);
    let cluster = ClusterServer::new(ClusterService::new(ctx.clone()));
    let watch = WatchServer::new(WatchService::new(ctx.clone()))
        .max_decoding_message_size(MAX_GRPC_RECV_BYTES)
        .max_encoding_message_size(usize::MAX);
    let lease = LeaseServer::new(LeaseService::new(ctx.clone()));
    let mut routes = tonic::service::Routes::new(kv)
        .add_service(maintenance)
        .add_service(cluster)
        .add_service(watch)
        .add_service(lease);
    if let Some(core) = pd_core {
        routes = routes.add_service(pd::service::PdService::new(core).into_server());
    }
    let router = routes.into_axum_router().merge(crate::http::routes(ctx));
    tonic::service::Routes::from(router)
}

/// Finds this node's identity: the one in its data dir, or a new one from
/// PD — joining the bootstrapped cluster (PD then places replicas here), or
/// bootstrapping the cluster (first node, one region over the whole
/// keyspace) if PD has none yet.
///
/// Bootstrap is two-phase because several first nodes may race: the node
/// records its intent locally, asks PD, and starts the region only once PD
/// accepted it; a node that lost the race forgets its intent and joins. A
/// crash anywhere in between is resolved on the next start from the
/// recorded intent and PD's answer.
async fn join_cluster(
    config: &Config,
    store: &Store,
    pd: &dyn PdClient,
) -> Result<NodeIdent, StartError> {
    let cluster_id = pd.cluster_id().await?;
    let ident = match store.node_ident()? {
        Some(ident) if ident.cluster_id != cluster_id => {
            return Err(StartError::Cluster(format!(
            "data dir belongs to cluster {} but the placement driver serves cluster {cluster_id}",
            ident.cluster_id
        )))
        }
        Some(ident) => {
            if !pd.is_bootstrapped().await? {
                // Bootstrapped before PD's bootstrap record was kept (an
                // embedded PD that lost its data dir): give PD the region.
                let region = store
                    .regions()
                    .first()
                    .map(|r| r.status().region)
                    .ok_or_else(|| StartError::Cluster("node identity without regions".into()))?;
                pd.bootstrap(node_meta(config, ident.node_id), region)
                    .await?;
            }
            ident
        }
        None => {
            let prepared = match store.prepared_bootstrap()? {
                Some((ident, _)) if ident.cluster_id != cluster_id => {
                    // Prepared against a PD that is gone: start afresh.
                    store.clear_prepared_bootstrap()?;
                    None
                }
                other => other,
            };
            let (ident, region) = match prepared {
                Some(p) => p,
                None if pd.is_bootstrapped().await? => {
                    return join_existing(config, store, pd, cluster_id).await
                }
                None => {
                    let node_id = pd.alloc_id().await?;
                    let region = metapb::Region {
                        id: pd.alloc_id().await?,
                        start_key: Vec::new(),
                        end_key: Vec::new(),
                        region_epoch: Some(metapb::RegionEpoch {
                            conf_ver: 1,
                            version: 1,
                        }),
                        peers: vec![metapb::Peer {
                            id: pd.alloc_id().await?,
                            node_id,
                            role: metapb::PeerRole::Voter as i32,
                        }],
                    };
                    let ident = NodeIdent {
                        cluster_id,
                        node_id,
                    };
                    store.prepare_bootstrap(ident, &region)?;
                    (ident, region)
                }
            };
            match pd
                .bootstrap(node_meta(config, ident.node_id), region.clone())
                .await
            {
                Ok(()) => {}
                Err(pd::PdError::AlreadyBootstrapped) => {
                    let ours = pd
                        .get_region_by_id(region.id)
                        .await?
                        .is_some_and(|r| r.region.peers.iter().any(|p| p.node_id == ident.node_id));
                    if !ours {
                        info!("another node bootstrapped the cluster first; joining it");
                        store.clear_prepared_bootstrap()?;
                        return join_existing(config, store, pd, cluster_id).await;
                    }
                    // Our own bootstrap, whose reply was lost before a crash.
                }
                Err(e) => return Err(e.into()),
            }
            store.bootstrap(ident, region)?;
            info!(node_id = ident.node_id, "bootstrapped a new cluster");
            ident
        }
    };
    register(config, pd, ident.node_id).await?;
    Ok(ident)
}

/// Stores this node's current name and URLs in PD, keeping a decommission
/// in progress (`Offline`) and refusing to come back as a removed node.
async fn register(config: &Config, pd: &dyn PdClient, node_id: u64) -> Result<(), StartError> {
    let mut node = node_meta(config, node_id);
    if let Some(known) = pd.get_node(node_id).await? {
        match known.state() {
            metapb::NodeState::Tombstone => {
                return Err(StartError::Cluster(format!(
                    "node {node_id} was removed from the cluster; start with an empty data dir to join again"
                )))
            }
            metapb::NodeState::Offline => node.state = known.state,
            metapb::NodeState::Up => {}
        }
    }
    pd.put_node(node).await?;
    Ok(())
}

/// Joins a bootstrapped cluster as a new, empty node: PD's scheduler then
/// adds replicas of regions here, which fill up by raft snapshot.
async fn join_existing(
    config: &Config,
    store: &Store,
    pd: &dyn PdClient,
    cluster_id: u64,
) -> Result<NodeIdent, StartError> {
    // A member added with MemberAdd for this peer URL (and not started
    // yet: no client URLs) is this node.
    let added = pd.get_all_nodes().await?.into_iter().find(|n| {
        n.state() == metapb::NodeState::Up
            && n.client_urls.is_empty()
            && n.peer_urls
                .iter()
                .any(|u| config.advertise_peer_urls.contains(u))
    });
    let node_id = match added {
        Some(n) => n.id,
        None => pd.alloc_id().await?,
    };
    let ident = NodeIdent {
        cluster_id,
        node_id,
    };
    // Identity first: after a crash before PD heard of the node, the next
    // start re-registers it; the other order could leave PD a node that
    // never starts, on which it would place replicas.
    store.set_node_ident(ident)?;
    register(config, pd, ident.node_id).await?;
    info!(node_id = ident.node_id, "joined the cluster");
    Ok(ident)
}

/// How long a shutdown waits for the requests in flight on each server.
const SHUTDOWN_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// How long a starting node waits for the placement driver to answer.
const PD_START_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Connects to PD, waiting while none of its members answers yet: members
/// and nodes of a cluster are usually started together, in no set order.
async fn connect_pd(endpoints: &[String]) -> Result<RpcPdClient, StartError> {
    let deadline = tokio::time::Instant::now() + PD_START_TIMEOUT;
    let mut logged = false;
    loop {
        match RpcPdClient::connect(endpoints, RpcPdClientConfig::default()).await {
            Err(pd::PdError::Unavailable(why)) if tokio::time::Instant::now() < deadline => {
                if !logged {
                    info!("waiting for the placement driver: {why}");
                    logged = true;
                }
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
            other => return Ok(other?),
        }
    }
}

/// Returns once PD has tombstoned this node: a MemberRemove finished moving
/// its replicas away. Like a removed etcd member, the node then stops.
async fn removed_from_cluster(pd: Arc<dyn PdClient>, node_id: u64) {
    const POLL: std::time::Duration = std::time::Duration::from_secs(2);
    loop {
        tokio::time::sleep(POLL).await;
        if let Ok(Some(node)) = pd.get_node(node_id).await {
            if node.state() == metapb::NodeState::Tombstone {
                return;
            }
        }
    }
}

fn node_meta(config: &Config, node_id: u64) -> metapb::Node {
    metapb::Node {
        id: node_id,
        name: config.name.clone(),
        peer_urls: config.advertise_peer_urls.clone(),
        client_urls: config.advertise_client_urls.clone(),
        state: metapb::NodeState::Up as i32,
    }
}

impl RunningNode {
    /// Stops serving, waits for in-flight requests, stops the replicas and
    /// persists the embedded PD's exact position.
    ///
    /// Order matters: client servers stop first and their in-flight
    /// requests finish while the peer servers still carry raft messages and
    /// forwarded requests (a write in flight needs its followers' acks);
    /// only then do the peer servers, the heartbeats and the replicas stop.
    pub async fn shutdown(mut self) {
        let _ = self.stop_clients.send(true);
        let peers = self.servers.split_off(self.peer_servers_from);
        for s in self.servers {
            if tokio::time::timeout(SHUTDOWN_WAIT, s).await.is_err() {
                tracing::warn!(
                    "client requests still running after {SHUTDOWN_WAIT:?}; stopping anyway"
                );
            }
        }
        // Coordinators of transactions over several regions whose clients
        // are gone finish while the peers can still carry their steps.
        self.ctx.router.stop_detached(SHUTDOWN_WAIT).await;
        let _ = self.stop_peers.send(true);
        for s in peers {
            let _ = tokio::time::timeout(SHUTDOWN_WAIT, s).await;
        }
        let _ = self.heartbeats.await;
        let _ = self.split_checks.await;
        let _ = self.alarms.await;
        self.removal.abort();
        self.lock_resolver.abort();
        self.resolved_tracker.abort();
        self.merge_driver.abort();
        self.compaction_catch_up.abort();
        self.lease_expiry.abort();
        let store = self.store.clone();
        let _ = tokio::task::spawn_blocking(move || store.shutdown()).await;
        if let Some(core) = self.pd_core {
            if let Err(e) = core.close().await {
                tracing::error!("closing the embedded placement driver: {e}");
            }
        }
        info!("node stopped");
    }

    /// Waits until a server task ends on its own (an error), or the node
    /// was removed from the cluster; says why.
    pub async fn wait_failure(&mut self) -> String {
        let servers = async {
            if self.servers.is_empty() {
                return std::future::pending().await;
            }
            let (res, idx, _) = futures::future::select_all(self.servers.iter_mut()).await;
            self.servers.remove(idx);
            if idx < self.peer_servers_from {
                self.peer_servers_from -= 1;
            }
            match res {
                Ok(Ok(())) => "server stopped".into(),
                Ok(Err(e)) => format!("server failed: {e}"),
                Err(e) => format!("server panicked: {e}"),
            }
        };
        tokio::select! {
            why = servers => why,
            Ok(()) = &mut self.removal => {
                "this node was removed from the cluster (member remove); its replicas have moved away".into()
            }
        }
    }
}
