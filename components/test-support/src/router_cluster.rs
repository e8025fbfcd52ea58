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
//! [`crate::RouterExecutor`] is the checker's [`crate::Executor`] over it.
//!
//! Every node reports the regions it leads to PD, as a node's heartbeat
//! loop does, so a node with no replica of a region finds it through PD.
//!
//! Nodes stopped by anyone (a test, [`crate::RaftNemesis`]) lose their
//! router first (requests to them fail as "node down") and get a new one
//! when restarted.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::RwLock;
use pd::{LocalPdClient, PdClient, PdConfig, PdCore, RegionHeartbeat};
use proto::metapb;
use raft::eraftpb::ConfChangeType;
use raftstore::StoreOptions;
use rand::Rng;
use router::forward::{Delivery, LocalNetwork};
use router::Router;
use tempfile::TempDir;

use crate::faulty_pd::FaultyPd;
use crate::raft_cluster::{self, NodeEvent};

/// Routers by node id, shared with the raft cluster's node hooks.
struct Nodes {
    raft: std::sync::Weak<raft_cluster::Cluster>,
    net: Arc<LocalNetwork>,
    pds: HashMap<u64, Arc<FaultyPd>>,
    routers: RwLock<HashMap<u64, Arc<Router>>>,
    /// Each running router's background tasks, stopped with its node (as
    /// a real node stops them at shutdown): a round in flight holds the
    /// router, and with it the store the stop waits for.
    tasks: RwLock<HashMap<u64, Vec<tokio::task::JoinHandle<()>>>>,
    /// The test's runtime, where every router's background tasks run.
    runtime: tokio::runtime::Handle,
}

impl Nodes {
    fn start_router(&self, id: u64) {
        let Some(raft) = self.raft.upgrade() else {
            return;
        };
        // A restart may come from a nemesis thread with a runtime of its
        // own, which blocks while it stops a node: a task of the node's
        // router running there, holding the router, would keep the next
        // stop of that node waiting for ever.
        let _runtime = self.runtime.enter();
        let router = Arc::new(Router::new(
            raft.store(id),
            self.pds[&id].clone(),
            self.net.forwarder(id),
        ));
        self.net.register(id, &router);
        let tasks = vec![
            router.start_lock_resolver(),
            router.start_resolved_tracker(),
            router.start_merge_driver(),
            router.start_compaction_catch_up(),
            router.start_lease_expiry(),
            start_heartbeats(&router, self.pds[&id].clone()),
        ];
        self.tasks.write().insert(id, tasks);
        self.routers.write().insert(id, router);
    }
}

/// Reports the regions `router`'s node leads to PD every 300 ms, as a
/// node's heartbeat loop does (PD's operators in the answers are left
/// alone): a node holding no replica of a region finds it, and its leader,
/// through PD. It ends with the router.
fn start_heartbeats(router: &Arc<Router>, pd: Arc<FaultyPd>) -> tokio::task::JoinHandle<()> {
    let weak = Arc::downgrade(router);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let Some(router) = weak.upgrade() else {
                return;
            };
            let beats: Vec<RegionHeartbeat> = router
                .store()
                .regions()
                .into_iter()
                .map(|h| h.status())
                .filter(|s| s.ready_leader)
                .filter_map(|s| {
                    let leader = s.region.peers.iter().find(|p| p.id == s.peer_id).copied()?;
                    Some(RegionHeartbeat {
                        region: s.region,
                        leader,
                        pending_peers: Vec::new(),
                        down_peers: Vec::new(),
                        approximate_size: 0,
                        approximate_keys: 0,
                    })
                })
                .collect();
            drop(router);
            if !beats.is_empty() {
                let _ = pd.region_heartbeats(beats).await;
            }
        }
    })
}

/// Says so if node `id`'s stopped router is still held after 5 s, for
/// diagnosing a stop that waits for its store (the router holds it).
fn report_if_held(id: u64, router: std::sync::Weak<Router>) {
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(5));
        let held = router.strong_count();
        if held > 0 {
            eprintln!(
                "node {id} stopped, but its router is still held ({held} references) after 5 s"
            );
        }
    });
}

/// `call` on node `id`'s router, unless the node stops first (the call is
/// then dropped, and with it the router it holds).
async fn unless_stopped<T>(
    stopped: impl std::future::Future<Output = ()>,
    id: u64,
    call: impl std::future::Future<Output = router::Result<T>>,
) -> Result<(), String> {
    tokio::select! {
        r = call => r.map(|_| ()).map_err(|e| e.to_string()),
        () = stopped => Err(format!("node {id} stopped")),
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
        Self::with_spare(n, 0, options).await
    }

    /// `n` nodes with a replica of region 1 and `spare` more with none
    /// (ids `n + 1 ..`), where replicas can be moved to.
    pub async fn with_spare(n: u64, spare: u64, options: StoreOptions) -> Arc<RouterCluster> {
        crate::init_tracing();
        let raft = Arc::new(raft_cluster::Cluster::with_spare_and_options(
            n, spare, options,
        ));
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
        for id in 2..=n + spare {
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
            pds: (1..=n + spare)
                .map(|id| (id, FaultyPd::new(pd.clone())))
                .collect(),
            routers: RwLock::new(HashMap::new()),
            tasks: RwLock::new(HashMap::new()),
            runtime: tokio::runtime::Handle::current(),
        });
        for id in 1..=n + spare {
            nodes.start_router(id);
        }
        let hooks = Arc::downgrade(&nodes);
        raft.on_node_event(move |id, event| {
            let Some(nodes) = hooks.upgrade() else {
                return;
            };
            match event {
                NodeEvent::Stopping => {
                    // The store closes only once nobody holds it: what the
                    // node serves or runs for itself ends with it.
                    nodes.net.stop(id);
                    for task in nodes.tasks.write().remove(&id).unwrap_or_default() {
                        task.abort();
                    }
                    if let Some(router) = nodes.routers.write().remove(&id) {
                        router.abort_detached();
                        report_if_held(id, Arc::downgrade(&router));
                    }
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

    /// Completes once node `id` stops (at once if it is not running): a
    /// client's call into its router is to end then, as one to a killed
    /// process does, so that it does not keep the stopped node's store
    /// open.
    pub fn stopped(&self, id: u64) -> impl std::future::Future<Output = ()> + Send + 'static {
        self.nodes.net.stopped(id)
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
                let split = router.split_region(h.region_id(), key.to_vec());
                return unless_stopped(self.stopped(id), id, split).await;
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
            let merge = router.merge_region(*source_id, target.region.clone());
            return unless_stopped(self.stopped(id), id, merge).await;
        }
        Err("no ready leader of a region starting there".into())
    }

    /// Moves region `region_id`'s replica from node `from` to node `to` as
    /// PD's balance does: a learner on `to`, caught up, promoted, then the
    /// replica on `from` removed. If `from` leads, leadership is handed to
    /// another voter instead, for a later call. Says why not if a step
    /// failed (faults, a leader change): the region may then keep an extra
    /// learner or voter, which a later move of it deals with.
    pub async fn move_replica(&self, region_id: u64, from: u64, to: u64) -> Result<(), String> {
        let step = Duration::from_secs(5);
        let led = self.raft.running().into_iter().find_map(|id| {
            let h = self.raft.try_region(id, region_id)?;
            h.status().ready_leader.then_some((id, h))
        });
        let Some((leader, h)) = led else {
            return Err("no ready leader".into());
        };
        let region = h.status().region;
        let on = |node: u64| region.peers.iter().find(|p| p.node_id == node).copied();
        let Some(old) = on(from) else {
            return Err(format!("no replica on node {from}"));
        };
        if leader == from {
            let voter = region
                .peers
                .iter()
                .find(|p| p.node_id != from && p.role == metapb::PeerRole::Voter as i32);
            if let Some(voter) = voter {
                let _ = h.transfer_leader(voter.id).await;
            }
            return Err("the leader's replica: leadership handed over first".into());
        }
        let change = |changes: Vec<(ConfChangeType, metapb::Peer)>| {
            let h = h.clone();
            async move {
                match tokio::time::timeout(step, h.change_peers(changes)).await {
                    Ok(r) => r.map_err(|e| e.to_string()),
                    Err(_) => Err("membership change timed out".into()),
                }
            }
        };
        let new = match on(to) {
            Some(p) => p,
            None => {
                let id = self.nodes.pds[&leader]
                    .alloc_id()
                    .await
                    .map_err(|e| e.to_string())?;
                let learner = metapb::Peer {
                    id,
                    node_id: to,
                    role: metapb::PeerRole::Learner as i32,
                };
                change(vec![(ConfChangeType::AddLearnerNode, learner)]).await?;
                learner
            }
        };
        if new.role != metapb::PeerRole::Voter as i32 {
            // Caught up first, as PD waits for, so the region does not
            // lean on a voter that has nothing yet.
            let target = h.status().applied_index;
            let deadline = Instant::now() + step;
            while self
                .raft
                .try_region(to, region_id)
                .is_none_or(|r| r.status().applied_index < target)
            {
                if Instant::now() > deadline {
                    return Err("the learner did not catch up".into());
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let voter = metapb::Peer {
                role: metapb::PeerRole::Voter as i32,
                ..new
            };
            change(vec![(ConfChangeType::AddNode, voter)]).await?;
        }
        change(vec![(ConfChangeType::RemoveNode, old)]).await
    }

    /// Every running node's view of the region holding `key` (or, for a
    /// node with no replica of it, "none"), one line per node: for
    /// diagnosing requests that keep failing.
    pub fn describe_region(&self, key: &[u8]) -> String {
        let mut out = String::new();
        for id in self.raft.running() {
            let held = self.raft.store(id).regions().into_iter().find(|h| {
                let r = h.status().region;
                key >= r.start_key.as_slice()
                    && (r.end_key.is_empty() || key < r.end_key.as_slice())
            });
            let line = match held {
                None => "none".to_string(),
                Some(h) => {
                    let s = h.status();
                    format!(
                        "region {} peer {} term {} leader {} ready {} commit {} applied {} epoch {:?} peers {:?}",
                        s.region.id,
                        s.peer_id,
                        s.term,
                        s.leader_peer_id,
                        s.ready_leader,
                        s.commit_index,
                        s.applied_index,
                        s.region.region_epoch,
                        s.region.peers.iter().map(|p| (p.id, p.node_id, p.role)).collect::<Vec<_>>()
                    )
                }
            };
            out.push_str(&format!("  node {id}: {line}\n"));
        }
        out
    }

    /// Hands leadership of every region led elsewhere to node `to`.
    pub async fn transfer_all_leaders(&self, to: u64) {
        let Some(target) = self.router(to) else {
            return;
        };
        let regions = target.store().regions();
        drop(target);
        for h in regions {
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

/// Runs `op` until it succeeds (30 s at most, then fails the test with
/// `what` and the last error): for requests a fault may refuse for a
/// while.
pub async fn must<T, F, Fut>(what: &str, mut op: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = router::Result<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match op().await {
            Ok(v) => return v,
            Err(e) => {
                assert!(Instant::now() < deadline, "{what} failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
