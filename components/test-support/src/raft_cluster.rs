//! An in-process cluster for replication tests, in the spirit of TiKV's
//! `test_raftstore`: N [`Store`]s in temp dirs joined by one transport that
//! routes each message by `to_peer.node_id`, through filters that partition,
//! lose, delay or duplicate messages.
//!
//! Contracts:
//! - Every node bootstraps region [`REGION_ID`] with peers `1..=n` on nodes
//!   `1..=n` (peer id = node id); spare nodes host nothing until a test adds
//!   a replica.
//! - Filters apply to every message sent after they are added, in the order
//!   added; [`Cluster::heal`] removes them all (messages already delayed are
//!   still delivered).
//! - The `must_*` and `wait_*` helpers retry until they succeed and panic
//!   after a deadline (15–20 s) with what they saw.
//! - Every method takes `&self`: a workload and a
//!   [`RaftNemesis`](crate::nemesis::RaftNemesis) can share the cluster in
//!   an `Arc`, the nemesis stopping and restarting nodes and setting filters
//!   from its own thread.
//! - On drop the filters are removed, every store is shut down with its
//!   engines closed, the delayer thread ends and the data dirs are removed.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use proto::metapb;
use proto::raft_cmdpb::{
    mutation::Op, raft_cmd_request::Cmd, Mutation, RaftCmdRequest, RaftRequestHeader, WriteRequest,
};
use proto::raft_serverpb::RaftMessage;
use raft::eraftpb::ConfChangeType;
use raftstore::{NodeIdent, RegionHandle, SnapshotDone, Store, StoreOptions, Transport};
use tempfile::TempDir;

/// The region every node bootstraps.
pub const REGION_ID: u64 = 1;
const CLUSTER_ID: u64 = 1;

/// Decides the fate of one message from node `from` to node `to`. On entry
/// `copies` holds one delay per copy to deliver (initially one, zero);
/// a filter may remove copies (loss), add some (duplication) or lengthen
/// their delays (delay, reordering).
pub trait Filter: Send + Sync {
    fn apply(&self, from: u64, to: u64, copies: &mut Vec<Duration>);

    /// Like `apply`, seeing the message itself (its region, its peers);
    /// by default decided by the nodes alone.
    fn apply_msg(&self, msg: &RaftMessage, from: u64, to: u64, copies: &mut Vec<Duration>) {
        let _ = msg;
        self.apply(from, to, copies);
    }
}

/// Drops every message of region `region_id` to node `to`: that node's
/// replica of the region hears nothing (its other regions are unaffected).
pub struct BlockRegion {
    pub region_id: u64,
    pub to: u64,
}

impl Filter for BlockRegion {
    fn apply(&self, _: u64, _: u64, _: &mut Vec<Duration>) {}

    fn apply_msg(&self, msg: &RaftMessage, _: u64, to: u64, copies: &mut Vec<Duration>) {
        if msg.region_id == self.region_id && to == self.to {
            copies.clear();
        }
    }
}

/// Drops every message between a node of `a` and a node of `b`, both ways.
pub struct Partition {
    pub a: Vec<u64>,
    pub b: Vec<u64>,
}

impl Filter for Partition {
    fn apply(&self, from: u64, to: u64, copies: &mut Vec<Duration>) {
        let (a, b) = (&self.a, &self.b);
        if (a.contains(&from) && b.contains(&to)) || (b.contains(&from) && a.contains(&to)) {
            copies.clear();
        }
    }
}

/// A uniform draw in [0, 1) from a process-wide splitmix64 sequence; test
/// randomness needs no reproducibility here (thread timing has none).
fn random() -> f64 {
    static STATE: AtomicU64 = AtomicU64::new(0);
    let _ = STATE.compare_exchange(
        0,
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64 | 1),
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    let mut z = STATE
        .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
        .wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

/// Drops each message with probability `rate`.
pub struct Loss {
    pub rate: f64,
}

impl Filter for Loss {
    fn apply(&self, _: u64, _: u64, copies: &mut Vec<Duration>) {
        copies.retain(|_| random() >= self.rate);
    }
}

/// Delays each message by a random time up to `max`, which also reorders.
pub struct Delay {
    pub max: Duration,
}

impl Filter for Delay {
    fn apply(&self, _: u64, _: u64, copies: &mut Vec<Duration>) {
        for d in copies.iter_mut() {
            *d += self.max.mul_f64(random());
        }
    }
}

/// Delivers each message a second time with probability `rate`, a little
/// later.
pub struct Duplicate {
    pub rate: f64,
}

impl Filter for Duplicate {
    fn apply(&self, _: u64, _: u64, copies: &mut Vec<Duration>) {
        let extra: Vec<Duration> = copies
            .iter()
            .filter(|_| random() < self.rate)
            .map(|d| *d + Duration::from_millis(20).mul_f64(random()))
            .collect();
        copies.extend(extra);
    }
}

struct Delayed {
    at: Instant,
    seq: u64,
    msg: RaftMessage,
}

impl PartialEq for Delayed {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Delayed {}
impl PartialOrd for Delayed {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Delayed {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(o.at, o.seq))
    }
}

/// The network: the running stores by node id, and the filters between
/// them. Stores hold it as their transport.
pub struct Router {
    stores: RwLock<HashMap<u64, Arc<Store>>>,
    filters: RwLock<Vec<Arc<dyn Filter>>>,
    delayed: Mutex<mpsc::Sender<Delayed>>,
    seq: AtomicU64,
    /// Region snapshot messages handed to a store with their file.
    snapshots_delivered: Arc<AtomicU64>,
}

impl Router {
    /// Region snapshot messages delivered so far (every copy counts).
    pub fn snapshots_delivered(&self) -> u64 {
        self.snapshots_delivered.load(Ordering::Relaxed)
    }

    fn deliver(&self, msg: RaftMessage) {
        let to = msg.to_peer.map(|p| p.node_id).unwrap_or_default();
        // Cloned out so no lock is held while the store takes the message.
        let store = self.stores.read().get(&to).cloned();
        if let Some(store) = store {
            store.on_raft_message(msg);
        }
    }
}

impl Transport for Router {
    /// The filters decide as for any message: dropped, the send fails;
    /// delayed or duplicated, the file and message go once per copy, each
    /// after its delay, on a thread of their own (the sender never waits),
    /// and the send succeeds if one copy arrived.
    fn send_snapshot(&self, msg: RaftMessage, path: PathBuf, done: SnapshotDone) {
        let from = msg.from_peer.map(|p| p.node_id).unwrap_or_default();
        let to = msg.to_peer.map(|p| p.node_id).unwrap_or_default();
        let mut copies = vec![Duration::ZERO];
        for f in self.filters.read().iter() {
            f.apply_msg(&msg, from, to, &mut copies);
        }
        copies.sort_unstable();
        let store = self.stores.read().get(&to).cloned();
        let Some(store) = store.filter(|_| !copies.is_empty()) else {
            done(false);
            return;
        };
        let counter = self.snapshots_delivered.clone();
        std::thread::spawn(move || {
            let start = Instant::now();
            let mut delivered = false;
            // Copies due at once arrive back to back: every file first,
            // then the messages.
            for due in copies.chunk_by(|a, b| a == b) {
                std::thread::sleep(due[0].saturating_sub(start.elapsed()));
                let received = due
                    .iter()
                    .filter(|_| receive_snapshot(&store, &msg, &path))
                    .count();
                for _ in 0..received {
                    store.on_raft_message(msg.clone());
                    delivered = true;
                }
                counter.fetch_add(received as u64, Ordering::Relaxed);
            }
            done(delivered);
        });
    }

    fn send(&self, msg: RaftMessage) {
        let from = msg.from_peer.map(|p| p.node_id).unwrap_or_default();
        let to = msg.to_peer.map(|p| p.node_id).unwrap_or_default();
        let mut copies = vec![Duration::ZERO];
        for f in self.filters.read().iter() {
            f.apply_msg(&msg, from, to, &mut copies);
        }
        for d in copies {
            if d.is_zero() {
                self.deliver(msg.clone());
            } else {
                let seq = self.seq.fetch_add(1, Ordering::Relaxed);
                let _ = self.delayed.lock().send(Delayed {
                    at: Instant::now() + d,
                    seq,
                    msg: msg.clone(),
                });
            }
        }
    }
}

/// Copies the snapshot file of `msg` at `path` into `store` in small
/// chunks, as the gRPC transport does; whether that worked.
fn receive_snapshot(store: &Store, msg: &RaftMessage, path: &std::path::Path) -> bool {
    use std::io::Read;
    let copied = (|| -> Result<(), Box<dyn std::error::Error>> {
        let mut sink = store.snapshot_sink(msg)?;
        let mut file = std::fs::File::open(path)?;
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            let n = file.read(&mut chunk)?;
            if n == 0 {
                break;
            }
            sink.write(&chunk[..n])?;
        }
        sink.finish()?;
        Ok(())
    })();
    copied.is_ok()
}

/// Delivers delayed messages when due. Holds the router weakly so the
/// cluster can drop it; ends when the router is gone.
fn run_delayer(router: Weak<Router>, rx: mpsc::Receiver<Delayed>) {
    let mut heap: BinaryHeap<Reverse<Delayed>> = BinaryHeap::new();
    loop {
        let wait = heap
            .peek()
            .map(|Reverse(d)| d.at.saturating_duration_since(Instant::now()))
            .unwrap_or(Duration::from_millis(100));
        match rx.recv_timeout(wait) {
            Ok(d) => heap.push(Reverse(d)),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
        let now = Instant::now();
        while heap.peek().is_some_and(|Reverse(d)| d.at <= now) {
            let Some(Reverse(d)) = heap.pop() else { break };
            let Some(router) = router.upgrade() else {
                return;
            };
            router.deliver(d.msg);
        }
    }
}

/// What happens to a node, for [`Cluster::on_node_event`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeEvent {
    /// The node is about to stop: whoever holds its store must let go.
    Stopping,
    /// The node restarted; its new store is registered.
    Started,
}

type NodeHook = Box<dyn Fn(u64, NodeEvent) + Send + Sync>;

/// The in-process cluster; see the module doc.
pub struct Cluster {
    pub router: Arc<Router>,
    dirs: HashMap<u64, TempDir>,
    delayer: Option<JoinHandle<()>>,
    options: StoreOptions,
    hooks: RwLock<Vec<NodeHook>>,
}

/// Region [`REGION_ID`] over the whole keyspace with voters `1..=n` on
/// nodes `1..=n`, at epoch (1, 1).
pub fn region(n: u64) -> metapb::Region {
    metapb::Region {
        id: REGION_ID,
        start_key: vec![],
        end_key: vec![],
        region_epoch: Some(metapb::RegionEpoch {
            conf_ver: 1,
            version: 1,
        }),
        peers: (1..=n)
            .map(|i| metapb::Peer {
                id: i,
                node_id: i,
                role: 0,
            })
            .collect(),
    }
}

/// A write deleting `key` at `rev`.
pub fn delete(rev: i64, key: &str) -> RaftCmdRequest {
    let mut cmd = write(rev, key, "");
    if let Some(Cmd::Write(w)) = cmd.cmd.as_mut() {
        w.mutations[0].op = Op::Delete as i32;
        w.mutations[0].version = 0;
    }
    cmd
}

/// A write putting `key` = `value` at `rev` (version 1) in region
/// [`REGION_ID`].
pub fn write(rev: i64, key: &str, value: &str) -> RaftCmdRequest {
    write_to(REGION_ID, rev, key, value)
}

/// `cmd` for `region` at its current epoch, not bound to a term.
pub fn cmd_for(region: &metapb::Region, cmd: Cmd) -> RaftCmdRequest {
    RaftCmdRequest {
        header: Some(RaftRequestHeader {
            region_id: region.id,
            region_epoch: region.region_epoch,
            term: 0,
        }),
        cmd: Some(cmd),
    }
}

/// [`write`] for region `region_id` at epoch (1, 1), not bound to a term.
pub fn write_to(region_id: u64, rev: i64, key: &str, value: &str) -> RaftCmdRequest {
    RaftCmdRequest {
        header: Some(RaftRequestHeader {
            region_id,
            region_epoch: region(1).region_epoch,
            term: 0,
        }),
        cmd: Some(Cmd::Write(WriteRequest {
            revision: rev,
            mutations: vec![Mutation {
                op: Op::Put as i32,
                key: key.into(),
                sub: 0,
                create_revision: 0,
                version: 1,
                lease: 0,
                value: value.into(),
            }],
        })),
    }
}

impl Cluster {
    /// `n` nodes, each bootstrapping region 1 with peers 1..=n on nodes
    /// 1..=n.
    pub fn new(n: u64) -> Cluster {
        Self::with_options(n, StoreOptions::default())
    }

    /// `n` nodes bootstrapping region 1 as in [`Cluster::new`], plus
    /// `spare` more nodes (ids n+1..) that host no region but are reachable,
    /// ready to receive new replicas.
    pub fn new_with_spare(n: u64, spare: u64) -> Cluster {
        Self::with_spare_and_options(n, spare, StoreOptions::default())
    }

    /// Like [`Cluster::new_with_spare`], every node opened with `options`.
    pub fn with_spare_and_options(n: u64, spare: u64, options: StoreOptions) -> Cluster {
        let mut c = Self::with_options(n, options);
        for id in n + 1..=n + spare {
            let dir = tempfile::tempdir().unwrap();
            let store =
                Store::open_with_options(dir.path(), c.router.clone(), c.options.clone()).unwrap();
            store
                .set_node_ident(NodeIdent {
                    cluster_id: CLUSTER_ID,
                    node_id: id,
                })
                .unwrap();
            c.router.stores.write().insert(id, Arc::new(store));
            c.dirs.insert(id, dir);
        }
        c
    }

    /// Like [`Cluster::new`], every node opened (and reopened) with
    /// `options`.
    pub fn with_options(n: u64, options: StoreOptions) -> Cluster {
        crate::init_tracing();
        let (tx, rx) = mpsc::channel();
        let router = Arc::new(Router {
            stores: RwLock::new(HashMap::new()),
            filters: RwLock::new(Vec::new()),
            delayed: Mutex::new(tx),
            seq: Default::default(),
            snapshots_delivered: Default::default(),
        });
        let weak = Arc::downgrade(&router);
        let delayer = std::thread::spawn(move || run_delayer(weak, rx));
        let mut cluster = Cluster {
            router,
            dirs: HashMap::new(),
            delayer: Some(delayer),
            options,
            hooks: RwLock::new(Vec::new()),
        };
        for id in 1..=n {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open_with_options(
                dir.path(),
                cluster.router.clone(),
                cluster.options.clone(),
            )
            .unwrap();
            let ident = NodeIdent {
                cluster_id: CLUSTER_ID,
                node_id: id,
            };
            // Registered first so no early message to it is lost for nothing.
            let store = Arc::new(store);
            cluster.router.stores.write().insert(id, store.clone());
            store.bootstrap(ident, region(n)).unwrap();
            cluster.dirs.insert(id, dir);
        }
        cluster
    }

    /// Ids of the running nodes, ascending.
    pub fn running(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = self.router.stores.read().keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// Node `id`'s data directory.
    pub fn data_dir(&self, id: u64) -> &std::path::Path {
        self.dirs[&id].path()
    }

    /// Node `id`'s store; panics if it is not running.
    pub fn store(&self, id: u64) -> Arc<Store> {
        self.router.stores.read()[&id].clone()
    }

    /// Node `id`'s replica of the region; panics if it has none.
    pub fn handle(&self, id: u64) -> RegionHandle {
        self.store(id).region(REGION_ID).unwrap()
    }

    /// Node `id`'s replica of the region, if the node runs and hosts one
    /// (safe while another thread stops and restarts nodes).
    pub fn try_handle(&self, id: u64) -> Option<RegionHandle> {
        let store = self.router.stores.read().get(&id).cloned()?;
        store.region(REGION_ID)
    }

    /// Node `id`'s replica of region `region_id`, if the node runs and
    /// hosts one.
    pub fn try_region(&self, id: u64, region_id: u64) -> Option<RegionHandle> {
        let store = self.router.stores.read().get(&id).cloned()?;
        store.region(region_id)
    }

    /// Waits until exactly one running replica of region `region_id` is a
    /// ready leader.
    pub async fn region_leader(&self, region_id: u64) -> (u64, RegionHandle) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let leaders: Vec<(u64, RegionHandle)> = self
                .running()
                .into_iter()
                .filter_map(|id| Some((id, self.try_region(id, region_id)?)))
                .filter(|(_, h)| h.status().ready_leader)
                .collect();
            if leaders.len() == 1 {
                return leaders.into_iter().next().unwrap();
            }
            assert!(
                Instant::now() < deadline,
                "region {region_id}: no single leader"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Every node's id, running or stopped, ascending.
    pub fn nodes(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = self.dirs.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// The node of the one running replica that is a ready leader, if
    /// exactly one is, without waiting.
    pub fn try_leader(&self) -> Option<u64> {
        let leaders: Vec<u64> = self
            .running()
            .into_iter()
            .filter(|&id| self.try_handle(id).is_some_and(|h| h.status().ready_leader))
            .collect();
        match leaders[..] {
            [one] => Some(one),
            _ => None,
        }
    }

    /// Proposes `changes` on the current leader until one attempt is
    /// applied; retryable failures (leader change, a change in progress)
    /// are retried.
    pub async fn must_change_peers(&self, changes: Vec<(ConfChangeType, metapb::Peer)>) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (_, h) = self.leader().await;
            let res =
                tokio::time::timeout(Duration::from_secs(5), h.change_peers(changes.clone())).await;
            match res {
                Ok(Ok(())) => return,
                Ok(Err(e)) if e.is_retryable() || matches!(e, raftstore::Error::Stopped(_)) => {
                    assert!(Instant::now() < deadline, "change {changes:?}: {e}")
                }
                Ok(Err(e)) => panic!("change {changes:?}: {e}"),
                Err(_) => assert!(Instant::now() < deadline, "change {changes:?}: timed out"),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until exactly one running replica is a ready leader.
    pub async fn leader(&self) -> (u64, RegionHandle) {
        self.leader_among(&self.running()).await
    }

    /// Waits until exactly one replica on `nodes` is a ready leader.
    pub async fn leader_among(&self, nodes: &[u64]) -> (u64, RegionHandle) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            // Nodes without a replica (spare, removed) are skipped.
            let leaders: Vec<(u64, RegionHandle)> = nodes
                .iter()
                .filter_map(|&id| Some((id, self.try_handle(id)?)))
                .filter(|(_, h)| h.status().ready_leader)
                .collect();
            if leaders.len() == 1 {
                return leaders.into_iter().next().unwrap();
            }
            assert!(
                Instant::now() < deadline,
                "no single leader among {nodes:?}: {:?}",
                nodes
                    .iter()
                    .filter_map(|&id| self.try_handle(id).map(|h| h.status()))
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Proposes a one-key write on the current leader.
    pub async fn put(&self, rev: i64, key: &str, value: &str) -> raftstore::Result<()> {
        let (_, h) = self.leader().await;
        h.propose(write(rev, key, value)).await.map(|_| ())
    }

    /// Writes `key` until one attempt is acknowledged, each attempt with the
    /// next revision from `rev` (a revision is used at most once).
    pub async fn must_put(&self, rev: &mut i64, key: &str, value: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            *rev += 1;
            match tokio::time::timeout(Duration::from_secs(3), self.put(*rev, key, value)).await {
                Ok(Ok(())) => return,
                Ok(Err(e)) => assert!(Instant::now() < deadline, "put {key}: {e}"),
                Err(_) => assert!(Instant::now() < deadline, "put {key}: timed out"),
            }
        }
    }

    /// Writes all of `kvs` concurrently, retrying the ones not acknowledged
    /// with fresh revisions from `rev` until every one is.
    pub async fn must_put_all(&self, rev: &mut i64, kvs: &[(String, String)]) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut pending: Vec<&(String, String)> = kvs.iter().collect();
        while !pending.is_empty() {
            assert!(
                Instant::now() < deadline,
                "{} writes never acknowledged",
                pending.len()
            );
            let (_, h) = self.leader().await;
            let mut waits = Vec::new();
            for kv in pending {
                *rev += 1;
                // Submitted in revision order, so they reach the log in it.
                let (tx, rx) = tokio::sync::oneshot::channel();
                h.propose_with(
                    write(*rev, &kv.0, &kv.1),
                    Box::new(move |res| {
                        let _ = tx.send(res);
                    }),
                );
                waits.push((kv, tokio::time::timeout(Duration::from_secs(3), rx)));
            }
            pending = Vec::new();
            for (kv, wait) in waits {
                let acked = matches!(wait.await, Ok(Ok(Ok(_))));
                if !acked {
                    pending.push(kv);
                }
            }
        }
    }

    /// The value of `key` on node `id`'s state machine.
    pub fn get(&self, id: u64, key: &str) -> Option<Vec<u8>> {
        self.store(id)
            .mvcc()
            .snapshot()
            .get(key.as_bytes(), i64::MAX)
            .unwrap()
            .map(|kv| kv.value)
    }

    /// Waits until every replica on `nodes` has `key` = `value`.
    pub async fn must_get_on(&self, nodes: &[u64], key: &str, value: &str) {
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

    /// Waits until the replicas on `nodes` have all applied the same index,
    /// and returns it.
    pub async fn wait_same_applied(&self, nodes: &[u64]) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let applied: Vec<u64> = nodes
                .iter()
                .map(|&id| self.handle(id).status().applied_index)
                .collect();
            let commit = nodes
                .iter()
                .map(|&id| self.handle(id).status().commit_index)
                .max()
                .unwrap_or(0);
            if applied.iter().all(|&a| a == applied[0] && a >= commit) {
                return applied[0];
            }
            assert!(
                Instant::now() < deadline,
                "applied indexes never met: {applied:?} (commit {commit})"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Adds a filter for every message sent from now on.
    pub fn add_filter(&self, f: impl Filter + 'static) {
        self.router.filters.write().push(Arc::new(f));
    }

    /// Whether a message from node `from` to node `to` would get through
    /// the filters now (delays aside), e.g. for a layer above raft that
    /// shares this network.
    pub fn delivers(&self, from: u64, to: u64) -> bool {
        let mut copies = vec![Duration::ZERO];
        for f in self.router.filters.read().iter() {
            f.apply(from, to, &mut copies);
        }
        !copies.is_empty()
    }

    /// Runs `f` when a node stops or restarts (see [`NodeEvent`]), on the
    /// thread that stops or restarts it.
    pub fn on_node_event(&self, f: impl Fn(u64, NodeEvent) + Send + Sync + 'static) {
        self.hooks.write().push(Box::new(f));
    }

    fn node_event(&self, id: u64, event: NodeEvent) {
        for hook in self.hooks.read().iter() {
            hook(id, event);
        }
    }

    /// Cuts nodes `a` off from nodes `b`, both ways.
    pub fn partition(&self, a: &[u64], b: &[u64]) {
        self.add_filter(Partition {
            a: a.to_vec(),
            b: b.to_vec(),
        });
    }

    /// Removes every filter.
    pub fn heal(&self) {
        self.router.filters.write().clear();
    }

    /// Shuts node `id` down and closes its engines.
    pub fn stop_node(&self, id: u64) {
        self.node_event(id, NodeEvent::Stopping);
        let store = self.router.stores.write().remove(&id).unwrap();
        store.shutdown();
        // The engines close when the last reference goes; a message in
        // flight may hold one briefly, and reopening needs them closed.
        let mut store = store;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match Arc::try_unwrap(store) {
                Ok(s) => {
                    drop(s);
                    return;
                }
                Err(s) => {
                    assert!(
                        Instant::now() < deadline,
                        "node {id} still referenced ({} other references)",
                        Arc::strong_count(&s) - 1
                    );
                    store = s;
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
    }

    /// Reopens node `id` from its data dir.
    pub fn restart_node(&self, id: u64) {
        let store = Store::open_with_options(
            self.dirs[&id].path(),
            self.router.clone(),
            self.options.clone(),
        )
        .unwrap();
        self.router.stores.write().insert(id, Arc::new(store));
        self.node_event(id, NodeEvent::Started);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.heal();
        for id in self.running() {
            self.stop_node(id);
        }
        // Replacing the sender ends the delayer once it has nothing due.
        *self.router.delayed.lock() = mpsc::channel().0;
        if let Some(t) = self.delayer.take() {
            let _ = t.join();
        }
    }
}
