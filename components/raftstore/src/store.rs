//! The replicas a node hosts; callers reach one through a
//! [`RegionHandle`] (its contract is in `region_handle`).
//!
//! A message for a region not hosted here, addressed to a peer on this
//! node and of a kind only a leader sends (append, heartbeat, snapshot),
//! creates an uninitialized replica (no range, no data, empty log) that
//! asks the leader for a snapshot; `regions` leaves such replicas out until
//! the snapshot gave them a range, `region` finds them. A region snapshot
//! whose range overlaps another initialized replica here is dropped (the
//! leader sends it again later): two replicas must never own one key —
//! unless every overlapping replica is of a region merged away, which the
//! snapshot shows (`make_room_for`); those are destroyed first. A
//! split applied by a replica here starts the new region's replica on
//! this node (see the `split` module and `start_split_region`); a merge
//! applied here stops the source's replica (`merge_source_state`,
//! `stop_merged_source`). How replicas start and go is in `replicas`; once
//! `shutdown` began, none starts.
//!
//! The consistency check (`consistency`): every inconsistency a replica
//! here judges (some replica's state at a `ComputeHash` index differs
//! from its region's majority; the replica may be on another node) is
//! kept, in order, in `inconsistencies()`, a watch the node raises etcd's
//! CORRUPT alarm from, for the node named; `consistency_checks_passed()`
//! counts the checks judged here where every replica agreed.
//!
//! Replicas reach their peers on other nodes through the [`Transport`] the
//! store was opened with; messages from other nodes come in through
//! [`Store::on_raft_message`].

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use dashmap::DashMap;
use engine::{cf, KvEngine, RaftLogBatch, RaftLogEngine, WriteBatch};
use mvcc::MvccStore;
use parking_lot::Mutex;
use prost::Message as _;
use proto::metapb;
use proto::raft_serverpb::{self, PeerState, RaftApplyState, RaftMessage, RegionLocalState};
use raft::eraftpb::{ConfState, HardState, MessageType};
use tokio::sync::watch;
use tracing::{debug, warn};

use crate::consistency::Inconsistency;
use crate::keys;
use crate::msg::PeerMsg;
use crate::peer::DEFAULT_LOG_GC_THRESHOLD;
use crate::poller::Pollers;
use crate::region_handle::RegionHandle;
use crate::snapshot::{Descriptor, SnapDir, SnapshotSink};
use crate::storage::{INIT_INDEX, INIT_TERM};
use crate::transport::{DropTransport, Transport};
use crate::{Error, Result};

mod replicas;

/// Cluster and node id this node's data belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeIdent {
    pub cluster_id: u64,
    pub node_id: u64,
}

/// Tunables of a [`Store`].
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// Applied raft log entries kept before a replica drops its log prefix.
    /// Replicas further behind than this catch up through a snapshot.
    pub log_gc_threshold: u64,
    /// How often region leaders start a consistency check of their
    /// replicas (`consistency`); zero: never.
    pub consistency_check_interval: Duration,
    /// Bytes a region snapshot install (or the clean-up of a removed
    /// replica) writes to RocksDB per batch: its memory stays about this,
    /// whatever the region's size.
    pub install_batch_bytes: usize,
    /// Threads driving the replicas (see `poller`; at least one).
    pub pollers: usize,
    /// How often a region leader checkpoints its leases' remaining TTLs
    /// (`lease`; etcd's `--lease-checkpoint-interval`); zero: never.
    pub lease_checkpoint_interval: Duration,
}

/// Pollers a store runs by default (TiKV's `store-pool-size` default).
pub const DEFAULT_POLLERS: usize = 2;

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            log_gc_threshold: DEFAULT_LOG_GC_THRESHOLD,
            consistency_check_interval: crate::consistency::DEFAULT_CONSISTENCY_CHECK_INTERVAL,
            install_batch_bytes: crate::snapshot::INSTALL_BATCH_BYTES,
            pollers: DEFAULT_POLLERS,
            lease_checkpoint_interval: crate::lease::DEFAULT_CHECKPOINT_INTERVAL,
        }
    }
}

/// The engines of a node and the region replicas on them. Its methods are
/// [`StoreCore`]'s, which the replicas also reach (to start the regions
/// they split off and to check snapshot ranges against their siblings).
pub struct Store {
    core: Arc<StoreCore>,
}

impl std::ops::Deref for Store {
    type Target = StoreCore;

    fn deref(&self) -> &StoreCore {
        &self.core
    }
}

pub struct StoreCore {
    /// This core, for the replicas it starts.
    me: Weak<StoreCore>,
    /// Bumped whenever a replica starts or goes, or a replica's key range
    /// changes (see [`StoreCore::layout_version`]).
    layout: AtomicU64,
    data_dir: std::path::PathBuf,
    kv: KvEngine,
    log: RaftLogEngine,
    /// Region snapshot files, generated here or received.
    snap_dir: SnapDir,
    /// Shared with the replicas, which unregister themselves when removed.
    regions: Arc<DashMap<u64, RegionHandle>>,
    /// Serializes creating replicas on demand, so concurrent messages for
    /// one new region create it once.
    create_lock: Mutex<()>,
    /// Held while a replica starts, and by `shutdown` while it sets
    /// `stopping` (see `spawn_peer`).
    start_lock: Mutex<()>,
    /// The threads driving the replicas (see `poller`).
    pollers: Pollers,
    transport: Arc<dyn Transport>,
    options: StoreOptions,
    /// Set by `shutdown`: no replica starts from then on, and a merge
    /// waiting for its source's replica gives up (`merge_source_state`).
    stopping: AtomicBool,
    /// Every inconsistency the consistency check found here, oldest first.
    inconsistencies: watch::Sender<Vec<Inconsistency>>,
    /// Consistency checks a replica here compared and found equal.
    checks_passed: AtomicU64,
}

impl Store {
    /// Opens the engines under `data_dir` (`kv/`, `raft/`) and starts every
    /// region replica found there, with no way to reach other nodes (enough
    /// for single-replica regions).
    pub fn open(data_dir: &Path) -> Result<Store> {
        Self::open_with_transport(data_dir, Arc::new(DropTransport))
    }

    /// Like [`Store::open`], with replicas sending their raft messages to
    /// other nodes through `transport`.
    pub fn open_with_transport(data_dir: &Path, transport: Arc<dyn Transport>) -> Result<Store> {
        Self::open_with_options(data_dir, transport, StoreOptions::default())
    }

    /// Like [`Store::open_with_transport`], with non-default `options`.
    pub fn open_with_options(
        data_dir: &Path,
        transport: Arc<dyn Transport>,
        options: StoreOptions,
    ) -> Result<Store> {
        let kv = KvEngine::open(&data_dir.join("kv"))?;
        // A store written before the MVCC key index existed gets it now.
        MvccStore::new(kv.clone()).build_key_index()?;
        let log = RaftLogEngine::open(&data_dir.join("raft"))?;
        // Installs a crash cut short are finished before anything else.
        let keep = crate::snapshot::pending_install_files(&kv)?;
        let snap_dir = SnapDir::open(&data_dir.join("snap"), &keep)?;
        crate::snapshot::finish_installs(&kv, &log, &snap_dir, options.install_batch_bytes)?;
        let pollers = Pollers::start(options.pollers, &log)?;
        let store = Arc::new_cyclic(|me| StoreCore {
            me: me.clone(),
            layout: AtomicU64::new(0),
            data_dir: data_dir.to_owned(),
            kv,
            log,
            snap_dir,
            regions: Arc::new(DashMap::new()),
            create_lock: Mutex::new(()),
            start_lock: Mutex::new(()),
            pollers,
            transport,
            options,
            stopping: AtomicBool::new(false),
            inconsistencies: watch::channel(Vec::new()).0,
            checks_passed: AtomicU64::new(0),
        });
        let (lower, upper) = keys::region_key_bounds();
        let mut states = Vec::new();
        let mut it = store.kv.iter(cf::META, &lower, &upper);
        it.seek(&lower);
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            if keys::decode_region_state_key(k).is_some() {
                states.push(RegionLocalState::decode(v)?);
            }
            it.next();
        }
        it.status().map_err(engine::Error::from)?;
        drop(it);
        // Removed replicas whose data was not deleted yet (a crash while
        // they stopped): before any replica starts, so none owns it.
        for state in &states {
            let region = state.region.clone().unwrap_or_default();
            if state.state() == PeerState::Tombstone
                && store
                    .kv
                    .get(cf::META, &keys::cleanup_key(region.id))?
                    .is_some()
            {
                crate::snapshot::clear_removed(
                    &store.kv,
                    &region,
                    store.options.install_batch_bytes,
                )?;
            }
        }
        for state in states {
            if matches!(state.state(), PeerState::Normal | PeerState::Merging) {
                let region = state.region.unwrap_or_default();
                store.start_peer(region, false, state.merge_state)?;
            }
        }
        Ok(Store { core: store })
    }
}

impl StoreCore {
    /// Every inconsistency the replicas here judged (each names the node
    /// of the replica whose state differs from its region's majority; the
    /// judge is the region's leader), oldest first; watch it for new ones.
    pub fn inconsistencies(&self) -> watch::Receiver<Vec<Inconsistency>> {
        self.inconsistencies.subscribe()
    }

    pub(crate) fn report_inconsistency(&self, found: Inconsistency) {
        self.inconsistencies.send_modify(|all| all.push(found));
    }

    /// How many consistency checks replicas here judged with every
    /// replica of the region agreeing.
    pub fn consistency_checks_passed(&self) -> u64 {
        self.checks_passed.load(Ordering::Relaxed)
    }

    pub(crate) fn note_check_passed(&self) {
        self.checks_passed.fetch_add(1, Ordering::Relaxed);
    }

    pub fn mvcc(&self) -> MvccStore {
        MvccStore::new(self.kv.clone())
    }

    pub fn kv_engine(&self) -> &KvEngine {
        &self.kv
    }

    pub fn node_ident(&self) -> Result<Option<NodeIdent>> {
        let Some(raw) = self.kv.get(cf::META, keys::NODE_IDENT_KEY)? else {
            return Ok(None);
        };
        let ids: [u8; 16] = raw
            .as_slice()
            .try_into()
            .map_err(|_| Error::Corrupted("node identity record".into()))?;
        let (c, n) = ids.split_at(8);
        Ok(Some(NodeIdent {
            cluster_id: u64::from_be_bytes(c.try_into().unwrap_or_default()),
            node_id: u64::from_be_bytes(n.try_into().unwrap_or_default()),
        }))
    }

    /// Records the identity of a node joining an existing cluster: it hosts
    /// no region until a leader's message creates a replica here. Fails if
    /// the node already belongs to another identity.
    pub fn set_node_ident(&self, ident: NodeIdent) -> Result<()> {
        match self.node_ident()? {
            Some(current) if current == ident => Ok(()),
            Some(current) => Err(Error::Corrupted(format!(
                "node already has identity {current:?}"
            ))),
            None => {
                let mut ident_bytes = ident.cluster_id.to_be_bytes().to_vec();
                ident_bytes.extend_from_slice(&ident.node_id.to_be_bytes());
                let mut wb = WriteBatch::default();
                self.kv
                    .put_to(&mut wb, cf::META, keys::NODE_IDENT_KEY, &ident_bytes);
                self.kv.write(wb)?;
                self.kv.sync_wal()?;
                Ok(())
            }
        }
    }

    /// Records that this node is about to bootstrap a new cluster as
    /// `ident` with `region`, before asking PD. Nothing starts yet: if
    /// another node wins the race in PD, [`Store::clear_prepared_bootstrap`]
    /// forgets it; if PD accepts, [`Store::bootstrap`] completes it. After a
    /// crash in between, [`Store::prepared_bootstrap`] tells the node which
    /// of the two to do. Durable when it returns.
    pub fn prepare_bootstrap(&self, ident: NodeIdent, region: &metapb::Region) -> Result<()> {
        let record = raft_serverpb::PreparedBootstrap {
            cluster_id: ident.cluster_id,
            node_id: ident.node_id,
            region: Some(region.clone()),
        };
        let mut wb = WriteBatch::default();
        self.kv.put_to(
            &mut wb,
            cf::META,
            keys::PREPARED_BOOTSTRAP_KEY,
            &record.encode_to_vec(),
        );
        self.kv.write(wb)?;
        self.kv.sync_wal()?;
        Ok(())
    }

    /// The bootstrap prepared but not completed or cleared, if any.
    pub fn prepared_bootstrap(&self) -> Result<Option<(NodeIdent, metapb::Region)>> {
        let Some(raw) = self.kv.get(cf::META, keys::PREPARED_BOOTSTRAP_KEY)? else {
            return Ok(None);
        };
        let record = raft_serverpb::PreparedBootstrap::decode(raw.as_slice())
            .map_err(|e| Error::Corrupted(format!("prepared bootstrap record: {e}")))?;
        let region = record
            .region
            .ok_or_else(|| Error::Corrupted("prepared bootstrap without region".into()))?;
        Ok(Some((
            NodeIdent {
                cluster_id: record.cluster_id,
                node_id: record.node_id,
            },
            region,
        )))
    }

    pub fn clear_prepared_bootstrap(&self) -> Result<()> {
        let mut wb = WriteBatch::default();
        self.kv
            .delete_from(&mut wb, cf::META, keys::PREPARED_BOOTSTRAP_KEY);
        self.kv.write(wb)?;
        self.kv.sync_wal()?;
        Ok(())
    }

    /// Makes this node a replica of one of the cluster's initial `region`s
    /// (one of whose peers is on `ident.node_id`) and starts it. Every node
    /// named in the region bootstraps it the same way, so all replicas start
    /// from the same log position with all peers as voters. Durable when it
    /// returns.
    pub fn bootstrap(&self, ident: NodeIdent, region: metapb::Region) -> Result<()> {
        if !region.peers.iter().any(|p| p.node_id == ident.node_id) {
            return Err(Error::Corrupted(
                "bootstrap region has no peer on this node".into(),
            ));
        }
        let mut batch = RaftLogBatch::default();
        batch.put_hard_state(
            region.id,
            &HardState {
                term: INIT_TERM,
                commit: INIT_INDEX,
                ..Default::default()
            },
        )?;
        batch.put_conf_state(
            region.id,
            &ConfState {
                voters: region.peers.iter().map(|p| p.id).collect(),
                ..Default::default()
            },
        )?;
        self.log.write(&mut batch, true)?;
        let apply_state = RaftApplyState {
            applied_index: INIT_INDEX,
            applied_term: INIT_TERM,
            truncated_index: INIT_INDEX,
            truncated_term: INIT_TERM,
            ..Default::default()
        };
        let state = RegionLocalState {
            region: Some(region.clone()),
            state: PeerState::Normal as i32,
            merge_state: None,
        };
        let mut ident_bytes = ident.cluster_id.to_be_bytes().to_vec();
        ident_bytes.extend_from_slice(&ident.node_id.to_be_bytes());
        let mut wb = WriteBatch::default();
        self.kv
            .put_to(&mut wb, cf::META, keys::NODE_IDENT_KEY, &ident_bytes);
        self.kv.put_to(
            &mut wb,
            cf::META,
            &keys::apply_state_key(region.id),
            &apply_state.encode_to_vec(),
        );
        self.kv.put_to(
            &mut wb,
            cf::META,
            &keys::region_state_key(region.id),
            &state.encode_to_vec(),
        );
        self.kv
            .delete_from(&mut wb, cf::META, keys::PREPARED_BOOTSTRAP_KEY);
        self.kv.write(wb)?;
        self.kv.sync_wal()?;
        self.start_peer(region, false, None)
    }

    /// A number that changes whenever the set of replicas here or the key
    /// range of one changes (after the change is visible in their status):
    /// callers keeping an index of the replicas' ranges rebuild it when it
    /// moved.
    pub fn layout_version(&self) -> u64 {
        self.layout.load(Ordering::Acquire)
    }

    /// A replica started, went, or changed its key range.
    pub(crate) fn layout_changed(&self) {
        self.layout.fetch_add(1, Ordering::AcqRel);
    }

    /// Starts receiving the region snapshot file of `msg`, a raft
    /// `MsgSnapshot` whose data is a file descriptor (see `Transport::
    /// send_snapshot`). Once the sink is finished, `msg` goes to
    /// [`StoreCore::on_raft_message`]. Fails if `msg` is not such a
    /// message or the file cannot be created.
    pub fn snapshot_sink(&self, msg: &RaftMessage) -> Result<SnapshotSink> {
        let m = <raft::eraftpb::Message as protobuf::Message>::parse_from_bytes(&msg.message)
            .map_err(|e| Error::Corrupted(format!("raft message: {e}")))?;
        if m.get_msg_type() != MessageType::MsgSnapshot {
            return Err(Error::Corrupted("not a snapshot message".into()));
        }
        let meta = m.get_snapshot().get_metadata();
        let desc = Descriptor::decode(m.get_snapshot().get_data())?;
        if (desc.region_id, desc.index, desc.term) != (msg.region_id, meta.index, meta.term) {
            return Err(Error::Corrupted(
                "snapshot descriptor does not match its message".into(),
            ));
        }
        self.snap_dir.sink(desc)
    }

    pub(crate) fn options(&self) -> &StoreOptions {
        &self.options
    }

    pub(crate) fn snap_dir(&self) -> &SnapDir {
        &self.snap_dir
    }

    /// Hands a raft message from another node to the replica it is for.
    /// A leader's message to a peer on this node for a region not hosted
    /// here creates the replica (see the module docs); any other message
    /// for an unknown region is dropped (the sender retries).
    pub fn on_raft_message(&self, msg: RaftMessage) {
        let region_id = msg.region_id;
        let mailbox = match self.regions.get(&region_id).map(|r| r.mailbox.clone()) {
            Some(mailbox) => mailbox,
            None => match self.maybe_create(&msg) {
                Ok(Some(mailbox)) => mailbox,
                Ok(None) => {
                    debug!(
                        region_id,
                        "raft message for a region not hosted here; dropped"
                    );
                    return;
                }
                Err(e) => {
                    warn!(region_id, "cannot create a replica on demand: {e}");
                    return;
                }
            },
        };
        if mailbox.send(PeerMsg::Raft(msg)).is_err() {
            debug!(region_id, "raft message for a stopped replica; dropped");
        }
    }

    pub fn region(&self, region_id: u64) -> Option<RegionHandle> {
        self.regions.get(&region_id).map(|r| r.clone())
    }

    /// The initialized replicas: a replica created on demand is left out
    /// until its snapshot gave it a key range.
    pub fn regions(&self) -> Vec<RegionHandle> {
        self.regions
            .iter()
            .filter(|r| r.shared.status.lock().applied_index > 0)
            .map(|r| r.clone())
            .collect()
    }

    /// Bytes of the node's engine files on disk (etcd's `dbSize`).
    pub fn db_size(&self) -> u64 {
        ["kv", "raft"]
            .iter()
            .filter_map(|d| std::fs::read_dir(self.data_dir.join(d)).ok())
            .flat_map(|entries| entries.flatten())
            .filter_map(|e| e.metadata().ok())
            .filter(|m| m.is_file())
            .map(|m| m.len())
            .sum()
    }

    /// Bytes of live data: RocksDB's live SST files plus the raft log in
    /// use (etcd's `dbSizeInUse`).
    pub fn db_size_in_use(&self) -> u64 {
        self.kv.live_data_size() + self.log.size() as u64
    }

    /// Stops every replica and waits for their pollers; pending callers
    /// get `Stopped`.
    pub fn shutdown(&self) {
        {
            // Under the lock replicas start under: none starts from now on
            // (a message creating one, a split), and every one started
            // before is handed to its poller before the pollers exit.
            let _starting = self.start_lock.lock();
            self.stopping.store(true, Ordering::Release);
        }
        for r in self.regions.iter() {
            let _ = r.mailbox.send(PeerMsg::Stop);
        }
        self.pollers.shutdown();
        let _ = self.kv.sync_wal();
    }
}
