//! Three-member clusters of real processes behind one interface,
//! [`Cluster`], so a workload and a fault driver run unchanged against
//! MetaStore ([`ProcessCluster`]: 3 PD members + 3 nodes) and against etcd
//! ([`EtcdCluster`]: 3 etcd members).
//!
//! Contracts:
//! - Members are numbered by index `0..size()`; a member keeps its index,
//!   ports, member id and data dir across `kill9`/`restart`, so
//!   `endpoints()` never changes.
//! - A constructor returns once the cluster serves: for MetaStore, PD
//!   reports the region with 3 voters and a leader and the nodes name that
//!   leader; for etcd, the members name a leader.
//! - `leader_index` comes from Maintenance.Status of the reachable members
//!   (killed and paused ones are skipped); when members disagree, the
//!   answer with the highest raft term wins (a paused leader that woke up
//!   may still believe it leads).
//! - `move_leader(to)` sends Maintenance.MoveLeader to the current leader's
//!   endpoint, as etcd requires.
//! - Dropping a cluster kills every process (paused ones are resumed first)
//!   and removes every data dir; proxies close.

use std::time::Duration;

use async_trait::async_trait;
use etcd_client::ConnectOptions;
use pd::{RpcPdClient, RpcPdClientConfig};

use crate::process::{try_pd_leader, wait_for_voters, Etcd, Node, Pd};
use crate::proxy::{Proxy, ProxyMode};

/// How long [`Cluster::leader_index`] waits for a leader to be named.
pub const LEADER_WAIT: Duration = Duration::from_secs(20);

/// What tests and the nemesis need of a cluster; see the module doc.
#[async_trait]
pub trait Cluster: Send + Sync {
    /// Number of members (nodes).
    fn size(&self) -> usize;

    /// Client URLs of the members, by index.
    fn endpoints(&self) -> Vec<String>;

    /// Member ids (as in response headers and Status), by index.
    fn member_ids(&self) -> Vec<u64>;

    /// The leader's index, if the reachable members name one within
    /// `timeout`.
    async fn try_leader_index(&self, timeout: Duration) -> Option<usize>;

    /// The leader's index; panics if none is named within [`LEADER_WAIT`].
    async fn leader_index(&self) -> usize {
        self.try_leader_index(LEADER_WAIT)
            .await
            .expect("no leader reported")
    }

    /// Whether member `i`'s process exists (paused or not).
    fn is_running(&self, i: usize) -> bool;

    fn is_paused(&self, i: usize) -> bool;

    /// SIGKILL of member `i`.
    fn kill9(&mut self, i: usize);

    /// Starts member `i` again after [`Cluster::kill9`], same data dir;
    /// returns once it listens.
    fn restart(&mut self, i: usize);

    /// SIGSTOP of member `i`.
    fn pause(&mut self, i: usize);

    /// SIGCONT of member `i` after [`Cluster::pause`].
    fn resume(&mut self, i: usize);

    /// Hands the leadership to member `to` (Ok at once if it leads).
    async fn move_leader(&self, to: usize) -> Result<(), String>;

    /// Resumes paused members and restarts killed ones; with a placement
    /// driver also its members, and its proxies pass again.
    fn heal(&mut self) {
        for i in 0..self.size() {
            if self.is_paused(i) {
                self.resume(i);
            }
            if !self.is_running(i) {
                self.restart(i);
            }
        }
        if let Some(pd) = self.placement_driver() {
            pd.heal_pd();
        }
    }

    /// The cluster's separate placement driver, for faults only MetaStore
    /// has; `None` (the default) for etcd.
    fn placement_driver(&mut self) -> Option<&mut dyn PdControl> {
        None
    }
}

/// Fault hooks of a separate placement driver (MetaStore's PD).
#[async_trait]
pub trait PdControl: Send + Sync {
    fn pd_size(&self) -> usize;

    /// The PD leader's index, if a member names one within `timeout`.
    async fn try_pd_leader_index(&self, timeout: Duration) -> Option<usize>;

    fn is_pd_running(&self, i: usize) -> bool;

    fn kill9_pd(&mut self, i: usize);

    fn restart_pd(&mut self, i: usize);

    /// Whether the nodes reach PD through proxies (see
    /// [`ProcessClusterOptions::pd_proxies`]).
    fn has_pd_proxies(&self) -> bool;

    /// Sets every PD proxy's mode; panics without proxies.
    fn set_pd_proxy_mode(&mut self, mode: ProxyMode);

    /// Restarts killed PD members; proxies pass again.
    fn heal_pd(&mut self) {
        for i in 0..self.pd_size() {
            if !self.is_pd_running(i) {
                self.restart_pd(i);
            }
        }
        if self.has_pd_proxies() {
            self.set_pd_proxy_mode(ProxyMode::Pass);
        }
    }
}

/// Options of [`ProcessCluster::start_with`].
#[derive(Clone, Debug, Default)]
pub struct ProcessClusterOptions {
    /// Put a [`Proxy`] in front of each PD member's client port and start
    /// the nodes with `--pd-endpoints` naming the proxies (PD members
    /// advertise the proxies as their client URLs, so a node following the
    /// PD leader stays behind them): a test can then make the revision
    /// oracle slow, stalled or unreachable.
    pub pd_proxies: bool,
    /// More flags for every node (e.g. small split limits).
    pub node_args: Vec<String>,
}

/// A connection for one harness query: short timeouts, as the member may be
/// paused or dead.
async fn quick_client(endpoint: &str) -> Option<etcd_client::Client> {
    let options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_millis(500))
        .with_timeout(Duration::from_secs(1));
    tokio::time::timeout(
        Duration::from_secs(1),
        etcd_client::Client::connect([endpoint], Some(options)),
    )
    .await
    .ok()?
    .ok()
}

/// (member id, leader id, raft term) from member `endpoint`'s Status.
async fn status_of(endpoint: &str) -> Option<(u64, u64, u64)> {
    let mut c = quick_client(endpoint).await?;
    let s = tokio::time::timeout(Duration::from_secs(1), c.status())
        .await
        .ok()?
        .ok()?;
    Some((s.header()?.member_id(), s.leader(), s.raft_term()))
}

/// The leader named by the members at `endpoints` (only those `ask` lets
/// through), the highest raft term winning; polls until `timeout`.
async fn leader_from_status(
    endpoints: &[String],
    ids: &[u64],
    ask: impl Fn(usize) -> bool,
    timeout: Duration,
) -> Option<usize> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let asked = endpoints
            .iter()
            .enumerate()
            .filter(|(i, _)| ask(*i))
            .map(|(_, ep)| status_of(ep));
        let answers = futures::future::join_all(asked).await;
        let best = answers
            .into_iter()
            .flatten()
            .filter_map(|(_, leader, term)| Some((term, ids.iter().position(|id| *id == leader)?)))
            .max_by_key(|(term, _)| *term);
        if let Some((_, i)) = best {
            return Some(i);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// MoveLeader to member `to`, sent to the current leader's endpoint.
async fn move_leader_via_status<C: Cluster + ?Sized>(c: &C, to: usize) -> Result<(), String> {
    let ids = c.member_ids();
    let target = *ids.get(to).ok_or_else(|| format!("no member {to}"))?;
    let leader = c
        .try_leader_index(Duration::from_secs(5))
        .await
        .ok_or("no leader known")?;
    if leader == to {
        return Ok(());
    }
    let endpoint = &c.endpoints()[leader];
    let mut client = quick_client(endpoint)
        .await
        .ok_or_else(|| format!("connect {endpoint}"))?;
    // Both etcd and MetaStore give a transfer 5 s.
    match tokio::time::timeout(Duration::from_secs(7), client.move_leader(target)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("move-leader {leader} -> {to}: {e}")),
        Err(_) => Err(format!("move-leader {leader} -> {to}: timed out")),
    }
}

/// Member ids of `endpoints`, from their Status headers (waits up to 20 s).
async fn member_ids_of(endpoints: &[String]) -> Vec<u64> {
    let mut ids = Vec::new();
    for ep in endpoints {
        let deadline = tokio::time::Instant::now() + LEADER_WAIT;
        loop {
            if let Some((id, _, _)) = status_of(ep).await {
                ids.push(id);
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{ep} never answered Status"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    ids
}

/// MetaStore as real processes: 3 `metastore-pd` members (`pd1`..`pd3`) and
/// 3 `metastore-node`s (`n1`..`n3`) joined through them, optionally behind
/// PD proxies.
pub struct ProcessCluster {
    // Nodes first: they go before the PD they talk to.
    nodes: Vec<Node>,
    pds: Vec<Pd>,
    pd_proxies: Vec<Proxy>,
    ids: Vec<u64>,
}

impl ProcessCluster {
    /// A cluster with the nodes talking to PD directly.
    pub async fn start() -> ProcessCluster {
        Self::start_with(ProcessClusterOptions::default()).await
    }

    pub async fn start_with(options: ProcessClusterOptions) -> ProcessCluster {
        let mut pd_proxies = Vec::new();
        let pds = Pd::start_cluster_with(3, |_, client_port| {
            if !options.pd_proxies {
                return Vec::new();
            }
            let proxy = Proxy::to_local_port(client_port);
            let args = vec!["--advertise-client-urls".to_owned(), proxy.endpoint()];
            pd_proxies.push(proxy);
            args
        });
        let node_pd_endpoints = if options.pd_proxies {
            pd_proxies.iter().map(Proxy::endpoint).collect::<Vec<_>>()
        } else {
            pds.iter().map(Pd::endpoint).collect()
        }
        .join(",");
        let mut nodes = Vec::new();
        for i in 1..=3 {
            let name = format!("n{i}");
            let mut args = vec!["--name", &name, "--pd-endpoints", &node_pd_endpoints];
            args.extend(options.node_args.iter().map(String::as_str));
            nodes.push(Node::start_dev_with(&args));
        }
        let direct: Vec<String> = pds.iter().map(Pd::endpoint).collect();
        let pd_client = RpcPdClient::connect(&direct, RpcPdClientConfig::default())
            .await
            .expect("connect to PD");
        wait_for_voters(&pd_client, 3).await;
        let endpoints: Vec<String> = nodes.iter().map(Node::endpoint).collect();
        let ids = member_ids_of(&endpoints).await;
        let cluster = ProcessCluster {
            nodes,
            pds,
            pd_proxies,
            ids,
        };
        cluster.leader_index().await;
        cluster
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    pub fn node(&self, i: usize) -> &Node {
        &self.nodes[i]
    }

    pub fn node_mut(&mut self, i: usize) -> &mut Node {
        &mut self.nodes[i]
    }

    pub fn pds(&self) -> &[Pd] {
        &self.pds
    }

    /// The PD members' own client URLs (never the proxies').
    pub fn pd_endpoints(&self) -> Vec<String> {
        self.pds.iter().map(Pd::endpoint).collect()
    }

    /// The PD proxies, by PD index (empty unless started with them).
    pub fn pd_proxies(&self) -> &[Proxy] {
        &self.pd_proxies
    }

    /// The PD leader's index; panics if none is named within 20 s.
    pub async fn pd_leader_index(&self) -> usize {
        try_pd_leader(&self.pds, LEADER_WAIT)
            .await
            .expect("no PD leader")
    }

    pub fn kill9_pd(&mut self, i: usize) {
        self.pds[i].kill9();
    }

    pub fn restart_pd(&mut self, i: usize) {
        self.pds[i].restart();
    }

    /// Sets every PD proxy's mode; panics without proxies.
    pub fn set_pd_proxy_mode(&self, mode: ProxyMode) {
        assert!(
            !self.pd_proxies.is_empty(),
            "started without PD proxies (ProcessClusterOptions::pd_proxies)"
        );
        for p in &self.pd_proxies {
            p.set_mode(mode);
        }
    }
}

#[async_trait]
impl Cluster for ProcessCluster {
    fn size(&self) -> usize {
        self.nodes.len()
    }

    fn endpoints(&self) -> Vec<String> {
        self.nodes.iter().map(Node::endpoint).collect()
    }

    fn member_ids(&self) -> Vec<u64> {
        self.ids.clone()
    }

    async fn try_leader_index(&self, timeout: Duration) -> Option<usize> {
        let ask = |i: usize| self.nodes[i].is_running() && !self.nodes[i].is_paused();
        leader_from_status(&self.endpoints(), &self.ids, ask, timeout).await
    }

    fn is_running(&self, i: usize) -> bool {
        self.nodes[i].is_running()
    }

    fn is_paused(&self, i: usize) -> bool {
        self.nodes[i].is_paused()
    }

    fn kill9(&mut self, i: usize) {
        self.nodes[i].kill9();
    }

    fn restart(&mut self, i: usize) {
        self.nodes[i].restart();
    }

    fn pause(&mut self, i: usize) {
        self.nodes[i].pause();
    }

    fn resume(&mut self, i: usize) {
        self.nodes[i].resume();
    }

    async fn move_leader(&self, to: usize) -> Result<(), String> {
        move_leader_via_status(self, to).await
    }

    fn placement_driver(&mut self) -> Option<&mut dyn PdControl> {
        Some(self)
    }
}

#[async_trait]
impl PdControl for ProcessCluster {
    fn pd_size(&self) -> usize {
        self.pds.len()
    }

    async fn try_pd_leader_index(&self, timeout: Duration) -> Option<usize> {
        try_pd_leader(&self.pds, timeout).await
    }

    fn is_pd_running(&self, i: usize) -> bool {
        self.pds[i].is_running()
    }

    fn kill9_pd(&mut self, i: usize) {
        ProcessCluster::kill9_pd(self, i);
    }

    fn restart_pd(&mut self, i: usize) {
        ProcessCluster::restart_pd(self, i);
    }

    fn has_pd_proxies(&self) -> bool {
        !self.pd_proxies.is_empty()
    }

    fn set_pd_proxy_mode(&mut self, mode: ProxyMode) {
        ProcessCluster::set_pd_proxy_mode(self, mode);
    }
}

/// A real 3-member etcd cluster (Debian's etcd 3.4), `etcd1`..`etcd3`.
pub struct EtcdCluster {
    members: Vec<Etcd>,
    ids: Vec<u64>,
}

impl EtcdCluster {
    pub async fn start() -> EtcdCluster {
        let members = Etcd::start_cluster(3);
        let endpoints: Vec<String> = members.iter().map(Etcd::endpoint).collect();
        let ids = member_ids_of(&endpoints).await;
        let cluster = EtcdCluster { members, ids };
        cluster.leader_index().await;
        cluster
    }

    pub fn members(&self) -> &[Etcd] {
        &self.members
    }

    pub fn member(&self, i: usize) -> &Etcd {
        &self.members[i]
    }
}

#[async_trait]
impl Cluster for EtcdCluster {
    fn size(&self) -> usize {
        self.members.len()
    }

    fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(Etcd::endpoint).collect()
    }

    fn member_ids(&self) -> Vec<u64> {
        self.ids.clone()
    }

    async fn try_leader_index(&self, timeout: Duration) -> Option<usize> {
        let ask = |i: usize| self.members[i].is_running() && !self.members[i].is_paused();
        leader_from_status(&self.endpoints(), &self.ids, ask, timeout).await
    }

    fn is_running(&self, i: usize) -> bool {
        self.members[i].is_running()
    }

    fn is_paused(&self, i: usize) -> bool {
        self.members[i].is_paused()
    }

    fn kill9(&mut self, i: usize) {
        self.members[i].kill9();
    }

    fn restart(&mut self, i: usize) {
        self.members[i].restart();
    }

    fn pause(&mut self, i: usize) {
        self.members[i].pause();
    }

    fn resume(&mut self, i: usize) {
        self.members[i].resume();
    }

    async fn move_leader(&self, to: usize) -> Result<(), String> {
        move_leader_via_status(self, to).await
    }
}
