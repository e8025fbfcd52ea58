//! A PD member: cluster metadata, id allocator and revision oracle as a
//! raft-replicated state machine (see [`crate::raft_node`]); only the leader
//! serves.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use proto::pd_raftpb::{self, command::Cmd};
use proto::{metapb, pdpb};
use tokio::sync::oneshot;
use tracing::{debug, info, warn};

use crate::client::{
    HeartbeatOutcome, PdError, RegionHeartbeat, RegionOperator, RegionWithLeader, Result,
};
use crate::load::NodeInfo;
use crate::merge::{order_for_merge, right_neighbour, MergeRequests};
use crate::operators::{PendingOperator, SchedulingStatus};
use crate::raft_node::{RaftConfig, RaftMsg, RaftNode, RaftStatus, RaftStore, Shared, Transport};
use crate::schedule::{ClusterView, ScheduleConfig, Scheduler};
use crate::split::{strictly_inside, SplitRequests};
use crate::state::{ClusterState, HeartbeatEffect, Reported};
use crate::storage::Storage;
use crate::transport::{PdRaftService, PeerTransport};

/// How an id allocator or the oracle persists ahead of what it hands out.
pub const DEFAULT_ID_WINDOW: u64 = 1_000;
pub const DEFAULT_REVISION_WINDOW: i64 = 10_000;

#[derive(Debug, Clone)]
pub struct PdConfig {
    pub data_dir: PathBuf,
    /// This member's name, reported by GetMembers.
    pub name: String,
    /// Reported to clients by GetMembers.
    pub client_urls: Vec<String>,
    /// Where other members reach this one (used when `initial_cluster` is
    /// empty).
    pub peer_urls: Vec<String>,
    /// `(name, peer URL)` of every member of a new cluster, this one
    /// included. Empty: a single member named `name`. Only read when the
    /// data dir is created; afterwards the recorded members count.
    pub initial_cluster: Vec<(String, String)>,
    /// Ids committed ahead per raft proposal; a crash skips at most this
    /// many ids.
    pub id_window: u64,
    /// Revisions committed ahead per raft proposal; a crash or leader change
    /// skips at most this many revisions.
    pub revision_window: i64,
    pub schedule: ScheduleConfig,
    /// Raft tick. Elections take `election_ticks` to `2 * election_ticks`
    /// ticks after the leader is gone.
    pub tick_interval: Duration,
    pub election_ticks: usize,
    /// Applied entries kept before the log is compacted.
    pub log_gc_threshold: u64,
}

impl PdConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        PdConfig {
            data_dir: data_dir.into(),
            name: "default".to_owned(),
            client_urls: Vec::new(),
            peer_urls: Vec::new(),
            initial_cluster: Vec::new(),
            id_window: DEFAULT_ID_WINDOW,
            revision_window: DEFAULT_REVISION_WINDOW,
            schedule: ScheduleConfig::default(),
            tick_interval: Duration::from_millis(100),
            election_ticks: 10,
            log_gc_threshold: 10_000,
        }
    }
}

/// The leader-side state of an allocator: a window `(last, high_water]`
/// whose upper end is committed through raft.
struct Alloc<T> {
    /// The leader term the window belongs to; a window of another term is
    /// never used (0 = none yet).
    term: u64,
    last: T,
    high_water: T,
    closed: bool,
}

pub struct PdCore {
    shared: Arc<Shared>,
    raft_tx: Sender<RaftMsg>,
    raft_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    id_window: u64,
    revision_window: i64,
    /// How long a request waits for this member to become a serving leader
    /// while no other leader is known (an election in progress).
    leader_wait: Duration,
    closed: AtomicBool,
    ids: tokio::sync::Mutex<Alloc<u64>>,
    oracle: tokio::sync::Mutex<Alloc<i64>>,
    scheduler: Scheduler,
    /// Splits asked for by operators, handed out with heartbeat responses.
    splits: SplitRequests,
    /// Merges asked for by operators, handed out likewise.
    merges: MergeRequests,
    heartbeat_stats: HeartbeatCounters,
}

/// Region heartbeats a PD member handled and the raft proposals it made,
/// cumulative since it opened ([`PdCore::heartbeat_stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HeartbeatStats {
    /// Calls handled past validation and the leadership check: one per
    /// `RegionHeartbeats` RPC (or `RegionHeartbeat`, a batch of one).
    pub batches: u64,
    /// Heartbeats in those calls.
    pub heartbeats: u64,
    /// Calls that proposed meta changes (one raft entry each).
    pub meta_proposals: u64,
    /// Every raft proposal of this member, heartbeats' or not.
    pub proposals: u64,
}

/// The counters behind [`HeartbeatStats`], and a debug log of their rates
/// and totals at most every [`HEARTBEAT_STATS_LOG`] (with a heartbeat).
struct HeartbeatCounters {
    batches: AtomicU64,
    heartbeats: AtomicU64,
    meta_proposals: AtomicU64,
    proposals: AtomicU64,
    /// When the rates were last logged, and the counters then.
    logged: Mutex<(Instant, HeartbeatStats)>,
}

const HEARTBEAT_STATS_LOG: Duration = Duration::from_secs(10);

impl HeartbeatCounters {
    fn new() -> Self {
        HeartbeatCounters {
            batches: AtomicU64::new(0),
            heartbeats: AtomicU64::new(0),
            meta_proposals: AtomicU64::new(0),
            proposals: AtomicU64::new(0),
            logged: Mutex::new((Instant::now(), HeartbeatStats::default())),
        }
    }

    fn snapshot(&self) -> HeartbeatStats {
        HeartbeatStats {
            batches: self.batches.load(Ordering::Relaxed),
            heartbeats: self.heartbeats.load(Ordering::Relaxed),
            meta_proposals: self.meta_proposals.load(Ordering::Relaxed),
            proposals: self.proposals.load(Ordering::Relaxed),
        }
    }

    fn batch(&self, heartbeats: usize, proposes: bool) {
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.heartbeats
            .fetch_add(heartbeats as u64, Ordering::Relaxed);
        if proposes {
            self.meta_proposals.fetch_add(1, Ordering::Relaxed);
        }
        let mut logged = self.logged.lock();
        let elapsed = logged.0.elapsed();
        if elapsed < HEARTBEAT_STATS_LOG {
            return;
        }
        let now = self.snapshot();
        let before = logged.1;
        *logged = (Instant::now(), now);
        drop(logged);
        let secs = elapsed.as_secs_f64();
        let rate = |n: u64| (n as f64 / secs * 10.0).round() / 10.0;
        let batches = now.batches - before.batches;
        let heartbeats = now.heartbeats - before.heartbeats;
        debug!(
            batches_per_sec = rate(batches),
            heartbeats_per_sec = rate(heartbeats),
            heartbeats_per_batch =
                (heartbeats as f64 / batches.max(1) as f64 * 10.0).round() / 10.0,
            meta_proposals_per_sec = rate(now.meta_proposals - before.meta_proposals),
            batches = now.batches,
            heartbeats = now.heartbeats,
            meta_proposals = now.meta_proposals,
            "region heartbeats (rates over the last interval, totals since start)"
        );
    }
}

impl std::fmt::Debug for PdCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PdCore")
            .field("cluster_id", &self.shared.cluster_id)
            .field("member_id", &self.shared.self_id)
            .finish_non_exhaustive()
    }
}

fn random_nonzero() -> u64 {
    loop {
        let v = rand::random::<u64>();
        if v != 0 {
            return v;
        }
    }
}

/// FNV-1a: stable across Rust versions and platforms, unlike std's hasher,
/// so every member derives the same cluster id from the same flags.
fn stable_hash(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The member list of a new data dir: ids 1..=n by sorted name, and a
/// cluster id every member derives alike (random for a single member, as
/// nobody else needs to agree with it).
fn new_member_list(config: &PdConfig) -> Result<pd_raftpb::MemberList> {
    let mut initial = config.initial_cluster.clone();
    if initial.is_empty() {
        initial = vec![(
            config.name.clone(),
            config.peer_urls.first().cloned().unwrap_or_default(),
        )];
    }
    initial.sort();
    let mut members: Vec<pdpb::Member> = Vec::new();
    for (name, url) in initial {
        if let Some(m) = members.iter_mut().find(|m| m.name == name) {
            // etcd allows several peer URLs per member: name=a,name=b.
            m.peer_urls.push(url);
            continue;
        }
        members.push(pdpb::Member {
            name,
            member_id: members.len() as u64 + 1,
            peer_urls: vec![url],
            client_urls: Vec::new(),
        });
    }
    let self_id = members
        .iter()
        .find(|m| m.name == config.name)
        .map(|m| m.member_id)
        .ok_or_else(|| {
            PdError::InvalidArgument(format!(
                "the initial cluster has no member named {:?}",
                config.name
            ))
        })?;
    let cluster_id = if members.len() > 1 {
        let canonical = members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_urls.join(",")))
            .collect::<Vec<_>>()
            .join(";");
        match stable_hash(&canonical) {
            0 => 1,
            h => h,
        }
    } else {
        random_nonzero()
    };
    Ok(pd_raftpb::MemberList {
        cluster_id,
        self_id,
        members,
    })
}

impl PdCore {
    /// Opens the PD member in `config.data_dir` (which must exist or be
    /// creatable), creating a new cluster identity on first use, and starts
    /// its raft group. A multi-member PD must be opened inside a tokio
    /// runtime (its peer connections run there); serve the peer traffic with
    /// [`crate::transport::serve_peers`].
    pub fn open(config: PdConfig) -> Result<Arc<PdCore>> {
        if config.id_window == 0 || config.revision_window <= 0 {
            return Err(PdError::InvalidArgument(
                "id and revision windows must be positive".into(),
            ));
        }
        if config.election_ticks < 3 || config.tick_interval.is_zero() {
            return Err(PdError::InvalidArgument(
                "election_ticks must be >= 3 and the tick non-zero".into(),
            ));
        }
        std::fs::create_dir_all(&config.data_dir).map_err(|e| {
            PdError::Storage(format!(
                "cannot create data dir {}: {e}",
                config.data_dir.display()
            ))
        })?;
        let storage = Arc::new(Storage::open(&config.data_dir)?);
        let list = match storage.members()? {
            Some(list) => {
                if !config.initial_cluster.is_empty() {
                    info!("data dir exists; --initial-cluster ignored");
                }
                list
            }
            None => {
                let mut list = new_member_list(&config)?;
                if let Some(legacy) = storage.legacy_cluster_id()? {
                    // A single-member data dir from before replication: keep
                    // its identity; its state becomes the applied state at
                    // index 0.
                    if list.members.len() > 1 {
                        return Err(PdError::InvalidArgument(
                            "a single-member data dir cannot join a multi-member cluster".into(),
                        ));
                    }
                    list.cluster_id = legacy;
                }
                let voters: Vec<u64> = list.members.iter().map(|m| m.member_id).collect();
                storage.init(&list, &voters)?;
                info!(
                    cluster_id = list.cluster_id,
                    members = list.members.len(),
                    "initialized new PD data dir"
                );
                list
            }
        };
        let mut members = list.members.clone();
        let Some(me) = members.iter_mut().find(|m| m.member_id == list.self_id) else {
            return Err(PdError::Storage(
                "member list does not contain this member".into(),
            ));
        };
        if me.name != config.name {
            warn!(recorded = %me.name, given = %config.name, "data dir belongs to another member name; using the recorded one");
        }
        me.client_urls = config.client_urls.clone();
        if !config.peer_urls.is_empty() && list.members.len() == 1 {
            me.peer_urls = config.peer_urls.clone();
        }

        let cluster = ClusterState::from_persisted(storage.load()?)?;
        let (store, applied) = RaftStore::new(storage.clone())?;
        info!(
            cluster_id = list.cluster_id,
            member_id = list.self_id,
            members = members.len(),
            bootstrapped = cluster.bootstrapped,
            nodes = cluster.nodes.len(),
            regions = cluster.region_count(),
            revision = cluster.revision_high_water,
            id = cluster.id_high_water,
            applied = applied.0,
            "PD opened"
        );
        let multi = members.len() > 1;
        let shared = Arc::new(Shared {
            self_id: list.self_id,
            cluster_id: list.cluster_id,
            status: Mutex::new(RaftStatus::default()),
            state: RwLock::new(cluster),
            members: RwLock::new(members),
            isolated: AtomicBool::new(false),
            blocked: Mutex::new(Default::default()),
        });
        let (raft_tx, rx) = std::sync::mpsc::channel();
        let transport: Option<Box<dyn Transport>> = if multi {
            let rt = tokio::runtime::Handle::try_current().map_err(|_| {
                PdError::InvalidArgument(
                    "a multi-member PD must be opened inside a tokio runtime".into(),
                )
            })?;
            Some(Box::new(PeerTransport::start(&rt, &shared, &raft_tx)))
        } else {
            None
        };
        let rcfg = RaftConfig {
            tick: config.tick_interval,
            election_ticks: config.election_ticks,
            log_gc_threshold: config.log_gc_threshold,
        };
        let node = RaftNode::new(store, applied, shared.clone(), rx, transport, rcfg)?;
        let thread = std::thread::Builder::new()
            .name("pd-raft".into())
            .spawn(move || node.run())
            .map_err(|e| PdError::Storage(format!("cannot start the PD raft thread: {e}")))?;
        if !multi {
            // A lone member elects itself at once; wait for that so that it
            // names itself leader from its first GetMembers on.
            let deadline = Instant::now() + Duration::from_secs(2);
            while Instant::now() < deadline {
                let s = shared.status.lock();
                if s.leader_id != 0 || s.stopped {
                    break;
                }
                drop(s);
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        let leader_wait = config.tick_interval * (config.election_ticks as u32) * 3;
        Ok(Arc::new(PdCore {
            shared,
            raft_tx,
            raft_thread: Mutex::new(Some(thread)),
            id_window: config.id_window,
            revision_window: config.revision_window,
            leader_wait,
            closed: AtomicBool::new(false),
            ids: tokio::sync::Mutex::new(Alloc {
                term: 0,
                last: 0,
                high_water: 0,
                closed: false,
            }),
            oracle: tokio::sync::Mutex::new(Alloc {
                term: 0,
                last: 0,
                high_water: 0,
                closed: false,
            }),
            splits: SplitRequests::new(config.schedule.split_timeout),
            merges: MergeRequests::new(config.schedule.merge_timeout),
            heartbeat_stats: HeartbeatCounters::new(),
            scheduler: Scheduler::new(config.schedule),
        }))
    }

    /// Stops handing out values and, when this member is the serving
    /// leader, commits the exact allocator positions (best effort) so that a
    /// clean restart continues without a gap; then stops the raft group.
    /// Idempotent. The RocksDB instance is released when this returns.
    pub async fn close(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let mut o = self.oracle.lock().await;
        let mut ids = self.ids.lock().await;
        o.closed = true;
        ids.closed = true;
        if let Ok(term) = self.leased_term() {
            // Lowering a mark to the last value handed out is safe: this
            // leader has stopped handing out, and no other leader handed out
            // anything in this term. An entry of this term that commits late
            // is applied by any later leader before it serves.
            if o.term == term {
                self.propose_quiet(Cmd::RevisionHighWater(pd_raftpb::HighWater {
                    value: o.last as u64,
                    exact: true,
                }))
                .await;
            }
            if ids.term == term {
                self.propose_quiet(Cmd::IdHighWater(pd_raftpb::HighWater {
                    value: ids.last,
                    exact: true,
                }))
                .await;
            }
        }
        info!(revision = o.last, id = ids.last, "PD closed");
        drop(ids);
        drop(o);
        self.stop_raft();
        Ok(())
    }

    /// Test hook: stops the member the way kill -9 would as far as PD's
    /// state is concerned (no exact positions recorded; the data dir is
    /// released).
    #[doc(hidden)]
    pub fn kill(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.stop_raft();
    }

    async fn propose_quiet(&self, cmd: Cmd) {
        if let Err(e) = self.propose(cmd).await {
            warn!(error = %e, "could not record the exact allocator position");
        }
    }

    fn stop_raft(&self) {
        let _ = self.raft_tx.send(RaftMsg::Stop);
        let handle = self.raft_thread.lock().take();
        if let Some(h) = handle {
            let _ = h.join();
        }
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    pub fn cluster_id(&self) -> u64 {
        self.shared.cluster_id
    }

    pub fn member_id(&self) -> u64 {
        self.shared.self_id
    }

    /// This member.
    pub fn member(&self) -> pdpb::Member {
        self.shared
            .members
            .read()
            .iter()
            .find(|m| m.member_id == self.shared.self_id)
            .cloned()
            .unwrap_or_default()
    }

    /// Every member; the client URLs of others are known once they have
    /// sent raft traffic to this one.
    pub fn members(&self) -> Vec<pdpb::Member> {
        self.shared.members.read().clone()
    }

    /// The leader as this member knows it. A leader whose lease ran out
    /// (partitioned, most likely) does not name itself, so that it does not
    /// keep drawing clients until raft deposes it; one still establishing
    /// its first lease does.
    pub fn leader(&self) -> Option<pdpb::Member> {
        let (id, lapsed) = {
            let s = self.shared.status.lock();
            let lapsed = s.lease_until.is_some_and(|l| Instant::now() >= l);
            (s.leader_id, lapsed)
        };
        if id == 0 || (id == self.shared.self_id && lapsed) {
            return None;
        }
        self.shared
            .members
            .read()
            .iter()
            .find(|m| m.member_id == id)
            .cloned()
    }

    /// Raft leader (not necessarily serving yet).
    pub fn is_leader(&self) -> bool {
        self.shared.status.lock().is_leader
    }

    /// A leader that has caught up and holds a valid lease: it answers
    /// requests.
    pub fn is_serving(&self) -> bool {
        self.serving().is_ok()
    }

    /// Test hook: drops all raft traffic to and from this member, as a
    /// network partition would.
    #[doc(hidden)]
    pub fn set_isolated(&self, isolated: bool) {
        self.shared.isolated.store(isolated, Ordering::SeqCst);
    }

    /// Test hook: drops raft traffic to and from the given members (a
    /// partial partition); an empty list heals it.
    #[doc(hidden)]
    pub fn set_blocked(&self, member_ids: &[u64]) {
        *self.shared.blocked.lock() = member_ids.iter().copied().collect();
    }

    /// Test hook: starts an election right away.
    #[doc(hidden)]
    pub fn campaign(&self) {
        let _ = self.raft_tx.send(RaftMsg::Campaign);
    }

    /// The gRPC service other members send raft messages to.
    pub fn peer_service(&self) -> PdRaftService {
        PdRaftService::new(self.shared.clone(), self.raft_tx.clone())
    }

    fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::SeqCst) {
            Err(PdError::Closed)
        } else {
            Ok(())
        }
    }

    /// `Ok(term)` if this member is the leader, has applied everything of
    /// earlier terms and holds its lease right now.
    fn serving(&self) -> Result<u64> {
        self.check_open()?;
        self.leased_term()
    }

    /// Like [`Self::serving`], also after close started.
    fn leased_term(&self) -> Result<u64> {
        let s = self.shared.status.lock();
        if s.stopped {
            return Err(PdError::Closed);
        }
        if s.is_leader && s.ready && s.lease_until.is_some_and(|l| Instant::now() < l) {
            return Ok(s.term);
        }
        Err(self.shared.not_leader(s.leader_id))
    }

    /// Waits (bounded) while this member may be about to serve: it is the
    /// leader catching up or renewing its lease, or no leader is known.
    /// Answers NotLeader at once when another member leads.
    async fn wait_serving(&self) -> Result<u64> {
        let deadline = Instant::now() + self.leader_wait;
        loop {
            match self.serving() {
                Ok(t) => return Ok(t),
                Err(PdError::NotLeader(m)) => {
                    let leader = self.shared.status.lock().leader_id;
                    let elsewhere = leader != 0 && leader != self.shared.self_id;
                    if elsewhere || Instant::now() >= deadline {
                        return Err(PdError::NotLeader(m));
                    }
                }
                Err(e) => return Err(e),
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Replicates `cmd` and waits until this member applied it.
    async fn propose(&self, cmd: Cmd) -> Result<bool> {
        self.heartbeat_stats
            .proposals
            .fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.raft_tx
            .send(RaftMsg::Propose { cmd, tx })
            .map_err(|_| PdError::Closed)?;
        match tokio::time::timeout(self.leader_wait, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(PdError::Closed),
            Err(_) => Err(PdError::Unavailable(
                "PD proposal not committed in time (no quorum?)".into(),
            )),
        }
    }

    /// Reads the applied state on the serving leader.
    async fn read<T>(&self, f: impl FnOnce(&ClusterState) -> Result<T>) -> Result<T> {
        self.wait_serving().await?;
        let c = self.shared.state.read();
        f(&c)
    }

    pub async fn is_bootstrapped(&self) -> Result<bool> {
        self.read(|c| Ok(c.bootstrapped)).await
    }

    pub async fn bootstrap(&self, node: metapb::Node, region: metapb::Region) -> Result<()> {
        self.check_open()?;
        if node.id == 0 {
            return Err(PdError::InvalidArgument("node id 0".into()));
        }
        validate_region(&region)?;
        if !region.start_key.is_empty() || !region.end_key.is_empty() {
            return Err(PdError::InvalidArgument(
                "the first region must cover the whole keyspace".into(),
            ));
        }
        if self.is_bootstrapped().await? {
            return Err(PdError::AlreadyBootstrapped);
        }
        // Held across the proposal: the apply reserves caller-picked ids,
        // and the allocator (and close's exact position) must see that.
        let mut ids = self.ids.lock().await;
        if ids.closed {
            return Err(PdError::Closed);
        }
        self.propose(Cmd::Bootstrap(pd_raftpb::Bootstrap {
            node: Some(node),
            region: Some(region),
        }))
        .await?;
        let hw = self.shared.state.read().id_high_water;
        if ids.term != 0 {
            ids.last = ids.last.max(hw);
            ids.high_water = ids.high_water.max(hw);
        }
        Ok(())
    }

    pub async fn alloc_id(&self) -> Result<u64> {
        let mut ids = self.ids.lock().await;
        loop {
            if ids.closed {
                return Err(PdError::Closed);
            }
            let term = self.wait_serving().await?;
            if ids.term != term {
                // Everything of earlier terms is applied: the committed mark
                // is above every id any earlier leader handed out.
                let hw = self.shared.state.read().id_high_water;
                *ids = Alloc {
                    term,
                    last: hw,
                    high_water: hw,
                    closed: false,
                };
            }
            let next = ids.last.checked_add(1).ok_or(PdError::Exhausted("id"))?;
            if next <= ids.high_water {
                ids.last = next;
                return Ok(next);
            }
            let hw = next.saturating_add(self.id_window - 1);
            self.propose(Cmd::IdHighWater(pd_raftpb::HighWater {
                value: hw,
                exact: false,
            }))
            .await?;
            // Applied here, so committed: a later leader starts above it.
            ids.high_water = ids.high_water.max(hw);
        }
    }

    /// Hands out `count` consecutive revisions and returns the first.
    pub async fn alloc_revisions(&self, count: u32) -> Result<i64> {
        if count == 0 {
            return Err(PdError::InvalidArgument("revision count 0".into()));
        }
        let mut o = self.oracle.lock().await;
        loop {
            if o.closed {
                return Err(PdError::Closed);
            }
            let term = self.wait_serving().await?;
            if o.term != term {
                let hw = self.shared.state.read().revision_high_water;
                *o = Alloc {
                    term,
                    last: hw,
                    high_water: hw,
                    closed: false,
                };
            }
            let last = o
                .last
                .checked_add(i64::from(count))
                .ok_or(PdError::Exhausted("revision"))?;
            if last <= o.high_water {
                // The lease must hold at the moment of handing out: only
                // then can no other leader have started.
                if self.serving()? != term {
                    continue;
                }
                let first = o.last + 1;
                o.last = last;
                return Ok(first);
            }
            // Under the lock: nobody may get a revision above the committed
            // mark, so concurrent callers have to wait anyway.
            let hw = last.saturating_add(self.revision_window);
            self.propose(Cmd::RevisionHighWater(pd_raftpb::HighWater {
                value: hw as u64,
                exact: false,
            }))
            .await?;
            o.high_water = o.high_water.max(hw);
        }
    }

    /// The highest revision handed out so far, as a linearizable read:
    /// answered only by the leader while its lease holds.
    pub async fn current_revision(&self) -> Result<i64> {
        let mut o = self.oracle.lock().await;
        if o.closed {
            return Err(PdError::Closed);
        }
        let term = self.wait_serving().await?;
        if o.term != term {
            let hw = self.shared.state.read().revision_high_water;
            *o = Alloc {
                term,
                last: hw,
                high_water: hw,
                closed: false,
            };
        }
        self.serving()?;
        Ok(o.last)
    }

    pub async fn put_node(&self, node: metapb::Node) -> Result<()> {
        self.check_open()?;
        if node.id == 0 {
            return Err(PdError::InvalidArgument("node id 0".into()));
        }
        let unchanged = self
            .read(|c| {
                check_bootstrapped(c)?;
                Ok(c.nodes.get(&node.id) == Some(&node))
            })
            .await?;
        if unchanged {
            return Ok(());
        }
        self.propose(Cmd::PutNode(node)).await.map(|_| ())
    }

    pub async fn get_node(&self, id: u64) -> Result<Option<metapb::Node>> {
        self.read(|c| {
            check_bootstrapped(c)?;
            Ok(c.nodes.get(&id).cloned())
        })
        .await
    }

    pub async fn get_all_nodes(&self) -> Result<Vec<metapb::Node>> {
        self.read(|c| {
            check_bootstrapped(c)?;
            Ok(c.nodes.values().cloned().collect())
        })
        .await
    }

    pub async fn get_region(&self, key: &[u8]) -> Result<Option<RegionWithLeader>> {
        self.read(|c| {
            check_bootstrapped(c)?;
            Ok(c.region_containing(key)
                .and_then(|id| c.entry_with_leader(id)))
        })
        .await
    }

    pub async fn get_region_by_id(&self, id: u64) -> Result<Option<RegionWithLeader>> {
        self.read(|c| {
            check_bootstrapped(c)?;
            Ok(c.entry_with_leader(id))
        })
        .await
    }

    pub async fn scan_regions(
        &self,
        start: &[u8],
        end: &[u8],
        limit: usize,
    ) -> Result<Vec<RegionWithLeader>> {
        self.read(|c| {
            check_bootstrapped(c)?;
            Ok(c.overlapping(start, end, limit)
                .into_iter()
                .filter_map(|id| c.entry_with_leader(id))
                .collect())
        })
        .await
    }

    /// Records the heartbeat and answers the region's next step (see
    /// [`crate::client::PdClient::region_heartbeat`]): the replica
    /// placement step if one is due, otherwise a split requested with
    /// [`Self::split_region`]. Both run on the serving leader only, since
    /// this answers NotLeader elsewhere. A batch of one
    /// ([`Self::handle_region_heartbeats`]).
    pub async fn handle_region_heartbeat(
        &self,
        hb: RegionHeartbeat,
    ) -> Result<Option<RegionOperator>> {
        self.handle_region_heartbeats(vec![hb])
            .await?
            .into_iter()
            .next()
            .unwrap_or(Ok(None))
    }

    /// Handles a batch of heartbeats in one pass (see
    /// [`crate::client::PdClient::region_heartbeats`]): validates each, looks
    /// at the state once for all of them, proposes the meta changes of the
    /// whole batch as one raft entry (`UpdateRegion` for a single change,
    /// `UpdateRegions` for more; none when nothing changed), records every
    /// leader and size under one lock, then schedules region by region in
    /// order. Work per heartbeat is as for a single one (map and tree
    /// look-ups, O(peers) counter updates, O(nodes) scheduling); nothing
    /// walks the regions.
    ///
    /// Outcomes, one per heartbeat in order: `Ok(None)` for a stale
    /// heartbeat (ignored) or one with nothing to do, `Err(InvalidArgument)`
    /// for a malformed one. Once scheduling fails for one region (this
    /// member lost leadership, PD's storage failed) that error is the
    /// outcome of it and of every later one; their meta is recorded
    /// nonetheless. `Err` of the whole call: `Closed`, `NotLeader`,
    /// `NotBootstrapped`, or the meta proposal failing (`Unavailable`,
    /// `Storage`); then no leader or size of the batch was recorded.
    pub async fn handle_region_heartbeats(
        &self,
        hbs: Vec<RegionHeartbeat>,
    ) -> Result<Vec<HeartbeatOutcome>> {
        let recorded = self.record_heartbeats(&hbs).await?;
        let mut out = Vec::with_capacity(hbs.len());
        let mut failed: Option<PdError> = None;
        for (hb, recorded) in hbs.iter().zip(recorded) {
            let outcome = match (recorded, &failed) {
                (Err(e), _) => Err(e),
                (Ok(false), _) => Ok(None),
                (Ok(true), Some(e)) => Err(e.clone()),
                (Ok(true), None) => {
                    let outcome = self.next_step(hb).await;
                    if let Err(e) = &outcome {
                        failed = Some(e.clone());
                    }
                    outcome
                }
            };
            out.push(outcome);
        }
        Ok(out)
    }

    /// The step for a region whose heartbeat was recorded: replica
    /// placement or balance first, else a requested split, else a
    /// requested merge (this region the source), else the merge checker's.
    async fn next_step(&self, hb: &RegionHeartbeat) -> Result<Option<RegionOperator>> {
        let placement = self.scheduler.schedule(self, hb).await?;
        // Asked even when placement goes first, so that a settled or
        // expired request is dropped.
        let split = self.splits.on_heartbeat(&hb.region);
        let merge = self.merges.on_heartbeat(&hb.region, || {
            right_neighbour(&self.shared.state.read(), &hb.region).map(|r| r.region)
        });
        if let Some(op) = placement.or(split).or(merge) {
            return Ok(Some(op));
        }
        let requested = |id: u64| self.splits.contains(id) || self.merges.involves(id);
        self.scheduler.check_merge(self, hb, &requested).await
    }

    /// Records a region's meta (through raft, only when it changed) and its
    /// leader (in memory on this leader); `Ok(false)` if the heartbeat was
    /// stale and ignored.
    pub async fn region_heartbeat(
        &self,
        region: metapb::Region,
        leader: metapb::Peer,
    ) -> Result<bool> {
        let hb = RegionHeartbeat {
            region,
            leader,
            ..Default::default()
        };
        self.record_heartbeats(std::slice::from_ref(&hb))
            .await?
            .into_iter()
            .next()
            .unwrap_or(Ok(false))
    }

    /// What the heartbeats have said so far (on this member, cumulative).
    pub fn heartbeat_stats(&self) -> HeartbeatStats {
        self.heartbeat_stats.snapshot()
    }

    /// Records the regions' meta (through raft, one proposal for all those
    /// that changed), and their leaders and approximate sizes and keys (in
    /// memory on this leader). Per heartbeat: `Ok(true)` recorded,
    /// `Ok(false)` stale and ignored, `Err(InvalidArgument)` malformed.
    /// When none is well-formed, PD's state is not looked at (so a single
    /// malformed heartbeat reports that, whatever the leadership).
    async fn record_heartbeats(&self, hbs: &[RegionHeartbeat]) -> Result<Vec<Result<bool>>> {
        self.check_open()?;
        let mut out: Vec<Result<bool>> = hbs
            .iter()
            .map(|hb| validate_heartbeat(hb).map(|()| true))
            .collect();
        if !out.iter().any(|r| r.is_ok()) {
            return Ok(out);
        }
        // One look at the state for the whole batch.
        let changed: Vec<usize> = self
            .read(|c| {
                check_bootstrapped(c)?;
                let mut changed = Vec::new();
                for (i, (hb, r)) in hbs.iter().zip(out.iter_mut()).enumerate() {
                    if r.is_err() {
                        continue;
                    }
                    match c.heartbeat_effect(&hb.region) {
                        HeartbeatEffect::Stale => *r = Ok(false),
                        HeartbeatEffect::Unchanged => {}
                        HeartbeatEffect::Changed(_) => changed.push(i),
                    }
                }
                Ok(changed)
            })
            .await?;
        self.heartbeat_stats.batch(hbs.len(), !changed.is_empty());
        if !changed.is_empty() {
            let cmd = match changed.as_slice() {
                [i] => Cmd::UpdateRegion(pd_raftpb::UpdateRegion {
                    region: Some(hbs[*i].region.clone()),
                }),
                _ => Cmd::UpdateRegions(pd_raftpb::UpdateRegions {
                    regions: changed.iter().map(|i| hbs[*i].region.clone()).collect(),
                }),
            };
            self.propose(cmd).await?;
            // Applied in order, each on what the ones before left: one may
            // have gone stale by then (a newer report of it, or of a region
            // overlapping it, won).
            let c = self.shared.state.read();
            for i in changed {
                if let HeartbeatEffect::Stale = c.heartbeat_effect(&hbs[i].region) {
                    out[i] = Ok(false);
                }
            }
        }
        let mut c = self.shared.state.write();
        for (hb, r) in hbs.iter().zip(&out) {
            if matches!(r, Ok(true)) {
                // Dropped if PD's meta of the region is another by now.
                c.report(
                    &hb.region,
                    Reported {
                        leader: Some(hb.leader),
                        approximate_size: hb.approximate_size,
                        approximate_keys: hb.approximate_keys,
                    },
                );
            }
        }
        Ok(out)
    }

    /// Records a request to split the region containing `key` at `key`,
    /// handed out by [`Self::handle_region_heartbeat`] (see
    /// [`crate::client::PdClient::split_region`]); returns that region.
    pub async fn split_region(&self, key: &[u8]) -> Result<RegionWithLeader> {
        self.check_open()?;
        if key.is_empty() {
            return Err(PdError::InvalidArgument(
                "split key must not be empty".into(),
            ));
        }
        let Some(found) = self.get_region(key).await? else {
            return Err(PdError::RegionNotFound(format!(
                "no region contains key \"{}\"",
                key.escape_ascii()
            )));
        };
        if !strictly_inside(&found.region, key) {
            return Err(PdError::InvalidArgument(format!(
                "key \"{}\" is the start key of region {}: nothing to split",
                key.escape_ascii(),
                found.region.id
            )));
        }
        self.splits.request(found.region.id, key.to_vec());
        Ok(found)
    }

    /// Records a request to merge two adjacent regions, the left one into
    /// the right one, handed out by [`Self::handle_region_heartbeat`] to
    /// the left one's leader (see
    /// [`crate::client::PdClient::merge_regions`]); returns both, source
    /// first.
    pub async fn merge_regions(
        &self,
        source_id: u64,
        target_id: u64,
    ) -> Result<(RegionWithLeader, RegionWithLeader)> {
        self.check_open()?;
        let (source, target) = self
            .read(|c| {
                check_bootstrapped(c)?;
                let found = |id: u64| {
                    c.entry_with_leader(id)
                        .ok_or_else(|| PdError::RegionNotFound(format!("region {id} not found")))
                };
                Ok((found(source_id)?, found(target_id)?))
            })
            .await?;
        if source_id == target_id {
            return Err(PdError::InvalidArgument(format!(
                "cannot merge region {source_id} into itself"
            )));
        }
        let (source, target) = order_for_merge(source, target)?;
        if source.region.id != source_id {
            info!(
                source_id = source.region.id,
                target_id = target.region.id,
                "merge asked the other way round: the left region merges into the right one"
            );
        }
        self.merges.request(&source.region, target.region.id);
        Ok((source, target))
    }

    /// The operators being handed out: requested splits and merges, then
    /// the scheduling steps being repeated; each by region id.
    pub async fn operators(&self) -> Result<Vec<PendingOperator>> {
        self.wait_serving().await?;
        let mut ops = self.splits.pending();
        ops.extend(self.merges.pending(&self.shared.state.read()));
        ops.extend(self.scheduler.issued());
        Ok(ops)
    }

    /// The schedulers the leader runs and their settings; answered by the
    /// serving leader like everything else, as the settings are per member.
    pub async fn scheduling_status(&self) -> Result<SchedulingStatus> {
        self.wait_serving().await?;
        Ok(SchedulingStatus {
            merges_in_flight: self.scheduler.merges_in_flight(),
            ..SchedulingStatus::of(self.scheduler.config())
        })
    }
}

impl Drop for PdCore {
    fn drop(&mut self) {
        // Without close(): like a crash, the allocators skip their windows.
        self.stop_raft();
    }
}

fn check_bootstrapped(c: &ClusterState) -> Result<()> {
    if c.bootstrapped {
        Ok(())
    } else {
        Err(PdError::NotBootstrapped)
    }
}

/// A heartbeat's region is well-formed and its leader one of its peers.
fn validate_heartbeat(hb: &RegionHeartbeat) -> Result<()> {
    validate_region(&hb.region)?;
    let leader = hb.leader;
    if !hb
        .region
        .peers
        .iter()
        .any(|p| p.id == leader.id && p.node_id == leader.node_id)
    {
        return Err(PdError::InvalidArgument(format!(
            "leader peer {} is not a peer of region {}",
            leader.id, hb.region.id
        )));
    }
    Ok(())
}

fn validate_region(region: &metapb::Region) -> Result<()> {
    if region.id == 0 {
        return Err(PdError::InvalidArgument("region id 0".into()));
    }
    if region.region_epoch.is_none() {
        return Err(PdError::InvalidArgument(format!(
            "region {} has no epoch",
            region.id
        )));
    }
    if !region.end_key.is_empty() && region.start_key >= region.end_key {
        return Err(PdError::InvalidArgument(format!(
            "region {} has an empty key range",
            region.id
        )));
    }
    Ok(())
}

#[async_trait::async_trait]
impl ClusterView for PdCore {
    async fn nodes(&self) -> Result<Vec<NodeInfo>> {
        self.read(|c| {
            check_bootstrapped(c)?;
            Ok(c.node_infos())
        })
        .await
    }

    async fn alloc_id(&self) -> Result<u64> {
        PdCore::alloc_id(self).await
    }

    async fn set_node_state(&self, node_id: u64, state: metapb::NodeState) -> Result<()> {
        let Some(mut node) = self.get_node(node_id).await? else {
            return Err(PdError::InvalidArgument(format!("no node {node_id}")));
        };
        node.state = state as i32;
        self.put_node(node).await
    }

    async fn right_neighbour(&self, region: &metapb::Region) -> Result<Option<RegionWithLeader>> {
        self.read(|c| {
            check_bootstrapped(c)?;
            Ok(right_neighbour(c, region))
        })
        .await
    }
}

mod alarm;
mod compaction;

#[cfg(test)]
mod alarm_tests;
#[cfg(test)]
mod balance_tests;
#[cfg(test)]
mod batch_tests;
#[cfg(test)]
mod compaction_tests;
#[cfg(test)]
mod merge_tests;
#[cfg(test)]
mod split_tests;
#[cfg(test)]
mod tests;
