//! The replicas a node hosts, and the handle callers use to reach one.
//!
//! Contract of [`RegionHandle`]:
//! * `propose` / `propose_with` answer once the command is applied on this
//!   replica (its effects are readable here) with its [`Applied`] index and
//!   revision, or with an error that says whether it did not apply
//!   (retryable: not the ready leader, epoch or term moved, replica stopped
//!   before taking it, its slot committed with another entry, apply refused
//!   it) or its outcome is unknown (`OutcomeUnknown`: the replica lost track
//!   of an entry already in its log) — see `crate::Error` and the `peer`
//!   module. `propose_with`'s callback runs exactly once, on the replica's
//!   thread (or the caller's, if the replica is gone); it must not block.
//! * `read_index` resolves once a quorum confirmed this replica's leadership
//!   and everything committed before the call is applied here, with the
//!   term of that leadership.
//! * `read_state(view)` is the region meta and the applied and compaction
//!   revisions of this replica as of `view`, a snapshot of this node's
//!   RocksDB: the same moment as the data a read through `view` sees; a
//!   read checks its keys against that region. It fails with `Installing`
//!   (retryable) if `view` caught a region snapshot install half-way, and
//!   with `RegionNotFound` if the replica was gone by then: a tombstone
//!   (removed, its data deleted in batches from then on; or merged away),
//!   or replaced by a newer replica of the region on this node (whose
//!   state, under the same region id, does not list this replica's peer).
//! * `wait_applied(index)` resolves once this replica (leader or not) has
//!   applied `index`, and fails with `Stopped` if the replica stops or is
//!   removed from the region first. It does not time out.
//! * `status` is a snapshot taken after the replica's last loop turn.
//! * `change_peers` proposes one raft membership change (`ConfChangeV2`) on
//!   the leader and resolves once it is applied here, like `propose`. The
//!   changes are checked against the region as the leader sees it: a
//!   `RemoveNode` of a peer not in the region, an `AddLearnerNode` or
//!   `AddNode` of a new peer on a node already holding one, or a peer named
//!   twice fail with `InvalidConfChange`; an empty list too. `AddNode` of a
//!   learner promotes it; `AddLearnerNode` of a voter demotes it. Several
//!   changes go through joint consensus, left automatically by raft-rs, and
//!   may not remove a voter (demote it first). While a change is not yet
//!   applied (or the region is joint) another fails with `StaleCommand`; so
//!   does one raft refuses. The change carries the epoch it was proposed
//!   against and apply rejects it (`EpochNotMatch`) if `conf_ver` moved.
//!   Once applied, `conf_ver` is one higher on every replica. Removing the
//!   leader's own peer is allowed: it answers, then stops like any removed
//!   replica (which marks its region state `Tombstone` and is unregistered
//!   here, so it is neither found by `region` nor restarted by `open`).
//!   Data commands check only the epoch's `version`, so membership changes
//!   do not fail writes in flight.
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
//! applied here stops the source's replica (`wait_merge_source`,
//! `destroy_replica`).
//!
//! The consistency check (`consistency`): every inconsistency a replica
//! here finds (its state at a `ComputeHash` index differs from its
//! leader's) is kept, in order, in `inconsistencies()`, a watch the node
//! raises etcd's CORRUPT alarm from; `consistency_checks_passed()` counts
//! the comparisons that agreed.
//!
//! Replicas reach their peers on other nodes through the [`Transport`] the
//! store was opened with; messages from other nodes come in through
//! [`Store::on_raft_message`].

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use engine::{cf, KvEngine, RaftLogBatch, RaftLogEngine, WriteBatch};
use mvcc::{MvccSnapshot, MvccStore};
use parking_lot::Mutex;
use prost::Message as _;
use proto::metapb;
use proto::raft_cmdpb::RaftCmdRequest;
use proto::raft_serverpb::{
    self, MergeState, PeerState, RaftApplyState, RaftMessage, RegionLocalState, TxnCommitRecord,
};
use raft::eraftpb::{ConfChangeType, ConfState, HardState, MessageType};
use raft::RawNode;
use tokio::sync::{oneshot, watch};
use tracing::{debug, info, warn};

use crate::consistency::Inconsistency;
use crate::keys;
use crate::membership::conf_state_from_region;
use crate::msg::{Applied, PeerMsg, ProposeCallback};
use crate::peer::{Peer, DEFAULT_LOG_GC_THRESHOLD};
use crate::snapshot::{Descriptor, Generator, SnapDir, SnapshotSink};
use crate::split;
use crate::status::{PeerShared, PeerStatus};
use crate::storage::{PeerStorage, INIT_INDEX, INIT_TERM};
use crate::transport::{DropTransport, Transport};
use crate::txn::{self, LockTable};
use crate::{Error, Result};

/// Cluster and node id this node's data belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeIdent {
    pub cluster_id: u64,
    pub node_id: u64,
}

#[derive(Clone)]
pub struct RegionHandle {
    region_id: u64,
    mailbox: mpsc::Sender<PeerMsg>,
    shared: Arc<PeerShared>,
}

impl RegionHandle {
    pub fn region_id(&self) -> u64 {
        self.region_id
    }

    /// Proposes `cmd` and waits for its outcome (see the contract).
    pub async fn propose(&self, cmd: RaftCmdRequest) -> Result<Applied> {
        let (tx, rx) = oneshot::channel();
        self.propose_with(
            cmd,
            Box::new(move |res| {
                let _ = tx.send(res);
            }),
        );
        rx.await.map_err(|_| Error::Stopped(self.region_id))?
    }

    /// Queues `cmd` for proposal now; `cb` gets its outcome (see the
    /// contract). Commands queued one after another reach the raft log in
    /// that order (when both are accepted), which callers use to keep
    /// revision order equal to log order.
    pub fn propose_with(&self, cmd: RaftCmdRequest, cb: ProposeCallback) {
        if let Err(mpsc::SendError(PeerMsg::Propose { cb, .. })) =
            self.mailbox.send(PeerMsg::Propose { cmd, cb })
        {
            cb(Err(Error::Stopped(self.region_id)));
        }
    }

    /// A linearizable read barrier; returns the term of the confirmed
    /// leadership (see the contract).
    pub async fn read_index(&self) -> Result<u64> {
        let (cb, rx) = oneshot::channel();
        self.send(PeerMsg::ReadIndex { cb })?;
        rx.await.map_err(|_| Error::Stopped(self.region_id))?
    }

    /// The region as this replica holds it, with its applied and
    /// compaction revisions, as of `view` (see the contract).
    pub fn read_state(&self, view: &MvccSnapshot<'_>) -> Result<ReadState> {
        let gone = || Error::RegionNotFound(self.region_id);
        let raw = view
            .kv()
            .get(cf::META, &keys::region_state_key(self.region_id))?
            .ok_or_else(gone)?;
        let local = RegionLocalState::decode(raw.as_slice())?;
        let peer_id = self.shared.status.lock().peer_id;
        let tombstone = local.state() == PeerState::Tombstone;
        let region = local.region.unwrap_or_default();
        if tombstone || !region.peers.iter().any(|p| p.id == peer_id) {
            return Err(gone());
        }
        let raw = view
            .kv()
            .get(cf::META, &keys::apply_state_key(self.region_id))?
            .ok_or_else(|| {
                Error::Corrupted(format!("region {} without apply state", self.region_id))
            })?;
        let state = RaftApplyState::decode(raw.as_slice())?;
        if state.installing_snapshot {
            return Err(Error::Installing(self.region_id));
        }
        Ok(ReadState {
            region,
            applied_revision: state.applied_revision,
            compact_revision: state.compact_revision,
        })
    }

    /// Waits until this replica has applied the log up to `index`: a
    /// follower serving a read at a revision the leader vouched for waits
    /// for the leader's applied index here (see the router).
    pub async fn wait_applied(&self, index: u64) -> Result<()> {
        if self.shared.status.lock().applied_index >= index {
            return Ok(());
        }
        let (cb, rx) = oneshot::channel();
        self.send(PeerMsg::WaitApplied { index, cb })?;
        rx.await.map_err(|_| Error::Stopped(self.region_id))?
    }

    /// Proposes a membership change of the region (see the contract above)
    /// and waits until it is applied on this replica.
    pub async fn change_peers(&self, changes: Vec<(ConfChangeType, metapb::Peer)>) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        let cb: ProposeCallback = Box::new(move |res| {
            let _ = tx.send(res.map(|_| ()));
        });
        self.send(PeerMsg::ChangePeers { changes, cb })?;
        rx.await.map_err(|_| Error::Stopped(self.region_id))?
    }

    /// Starts handing leadership to voter `peer_id` (no-op if it is this
    /// replica). `Err(NotLeader)` unless this replica leads; the transfer
    /// itself may still fail (raft-rs gives up after an election timeout),
    /// so callers watch the region's leader to know.
    pub async fn transfer_leader(&self, peer_id: u64) -> Result<()> {
        let (cb, rx) = oneshot::channel();
        self.send(PeerMsg::TransferLeader { peer_id, cb })?;
        rx.await.map_err(|_| Error::Stopped(self.region_id))?
    }

    pub fn status(&self) -> PeerStatus {
        self.shared.status.lock().clone()
    }

    /// The replica's current raft term (its status's, without the copy).
    pub fn term(&self) -> u64 {
        self.shared.status.lock().term
    }

    /// The transaction locks this replica has applied (see `txn`).
    pub fn locks(&self) -> &LockTable {
        &self.shared.locks
    }

    /// The decision of transaction `txn_id` with `primary_key`, if this
    /// replica's state as of `view` records one (see `txn`).
    pub fn txn_record(
        &self,
        view: &MvccSnapshot<'_>,
        primary_key: &[u8],
        txn_id: u64,
    ) -> Result<Option<TxnCommitRecord>> {
        txn::read_record(view.kv(), primary_key, txn_id)
    }

    /// Waits until the physical clean-up of compaction `revision` is done.
    pub async fn wait_physically_compacted(&self, revision: i64) -> Result<()> {
        let mut rx = self.shared.physically_compacted.subscribe();
        rx.wait_for(|done| *done >= revision)
            .await
            .map(|_| ())
            .map_err(|_| Error::Stopped(self.region_id))
    }

    pub(crate) fn send(&self, msg: PeerMsg) -> Result<()> {
        self.mailbox
            .send(msg)
            .map_err(|_| Error::Stopped(self.region_id))
    }
}

/// A replica's region and revisions as of one RocksDB snapshot (see
/// [`RegionHandle::read_state`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ReadState {
    /// The region meta this replica had applied.
    pub region: metapb::Region,
    pub applied_revision: i64,
    pub compact_revision: i64,
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
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            log_gc_threshold: DEFAULT_LOG_GC_THRESHOLD,
            consistency_check_interval: crate::consistency::DEFAULT_CONSISTENCY_CHECK_INTERVAL,
            install_batch_bytes: crate::snapshot::INSTALL_BATCH_BYTES,
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
    threads: Mutex<Vec<JoinHandle<()>>>,
    transport: Arc<dyn Transport>,
    options: StoreOptions,
    /// Set by `shutdown`: waits for a merge's source give up.
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
        let store = Arc::new_cyclic(|me| StoreCore {
            me: me.clone(),
            layout: AtomicU64::new(0),
            data_dir: data_dir.to_owned(),
            kv,
            log,
            snap_dir,
            regions: Arc::new(DashMap::new()),
            create_lock: Mutex::new(()),
            threads: Mutex::new(Vec::new()),
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
    /// Every inconsistency the consistency check of this node's replicas
    /// has found (each replica reports its own differences from its
    /// leader), oldest first; watch it for new ones.
    pub fn inconsistencies(&self) -> watch::Receiver<Vec<Inconsistency>> {
        self.inconsistencies.subscribe()
    }

    pub(crate) fn report_inconsistency(&self, found: Inconsistency) {
        self.inconsistencies.send_modify(|all| all.push(found));
    }

    /// How many consistency checks replicas here compared and passed.
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

    /// Starts this node's replica of `region`, which a replica here has
    /// just split off (its region state and apply state are in RocksDB,
    /// synced). Nothing happens if the region already has a replica here:
    /// a replica created on demand by the new region's leader before the
    /// split applied here keeps waiting for its snapshot, which the
    /// region's shrunk range no longer blocks. The raft state starts as a
    /// bootstrapped region's, keeping a term and vote already persisted
    /// for the region (such a replica may have voted before a restart: a
    /// forgotten vote could elect two leaders in one term). `campaign`: the
    /// splitting replica led its region; this one campaigns at once.
    pub(crate) fn start_split_region(&self, region: metapb::Region, campaign: bool) -> Result<()> {
        let _guard = self.create_lock.lock();
        if self.regions.contains_key(&region.id) {
            info!(
                region_id = region.id,
                "split: a replica of the new region is already running here"
            );
            return Ok(());
        }
        let mut hs = self.log.hard_state(region.id)?.unwrap_or_default();
        if hs.term < INIT_TERM {
            hs.term = INIT_TERM;
            hs.vote = 0;
        }
        hs.commit = hs.commit.max(INIT_INDEX);
        let mut batch = RaftLogBatch::default();
        batch.put_hard_state(region.id, &hs)?;
        batch.put_conf_state(region.id, &conf_state_from_region(&region))?;
        self.log.write(&mut batch, true)?;
        self.start_peer(region, campaign, None)
    }

    /// The id of another initialized replica here whose range overlaps
    /// `region`'s: a snapshot of `region` must not be installed while one
    /// exists (two replicas here would own the same keys).
    pub(crate) fn overlapping(&self, region: &metapb::Region) -> Option<u64> {
        self.regions.iter().find_map(|r| {
            if *r.key() == region.id {
                return None;
            }
            let status = r.shared.status.lock();
            (status.applied_index > 0 && split::overlaps(&status.region, region))
                .then_some(*r.key())
        })
    }

    /// Blocks until this node's replica of merge source `source` has
    /// applied its log up to the prepare at (`index`, `term`), telling it
    /// the prepare is committed (see `PeerMsg::CatchUpMerge`), and returns
    /// its revisions then. Waits as long as it takes (the replica may not
    /// have started yet, at start-up, or may still be receiving the
    /// entries); `Err(Stopped)` once the store stops.
    pub(crate) fn wait_merge_source(
        &self,
        source: &metapb::Region,
        index: u64,
        term: u64,
    ) -> Result<crate::apply::SourceState> {
        let started = Instant::now();
        let mut last_nudge: Option<Instant> = None;
        let mut last_warning = Instant::now();
        loop {
            if self.stopping.load(Ordering::Acquire) {
                return Err(Error::Stopped(source.id));
            }
            if let Some(h) = self.region(source.id) {
                let status = h.status();
                if status.applied_index >= index {
                    return Ok(crate::apply::SourceState {
                        applied_revision: status.applied_revision,
                        compact_revision: status.compact_revision,
                    });
                }
                if last_nudge.is_none_or(|t| t.elapsed() >= Duration::from_millis(100)) {
                    let _ = h.mailbox.send(PeerMsg::CatchUpMerge { index, term });
                    last_nudge = Some(Instant::now());
                }
            }
            if last_warning.elapsed() >= Duration::from_secs(5) {
                warn!(
                    source_id = source.id,
                    index,
                    waited = ?started.elapsed(),
                    "merge waits for this node's replica of its source"
                );
                last_warning = Instant::now();
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Stops this node's replica of `region_id` for good (see
    /// `PeerMsg::Destroy`) and waits until it has. `false` if it could not
    /// tombstone itself.
    pub(crate) fn destroy_replica(&self, region_id: u64, tombstone: bool) -> bool {
        let Some(h) = self.region(region_id) else {
            return true;
        };
        let (cb, rx) = oneshot::channel();
        if h.mailbox
            .send(PeerMsg::Destroy {
                tombstone,
                cb: Some(cb),
            })
            .is_err()
        {
            return !tombstone;
        }
        info!(
            region_id,
            "destroying the replica: its region is gone from this node"
        );
        matches!(rx.blocking_recv(), Ok(Ok(())))
    }

    /// Makes room for installing a snapshot of `snap.region` here: every
    /// initialized replica here whose range overlaps it must be a region
    /// that no longer exists — merged away, as the snapshot shows by
    /// covering its whole range with a newer epoch version or by carrying
    /// the record of its committed merge. Those are destroyed (tombstoned);
    /// `false` (nothing destroyed) if any other overlaps, which must hand
    /// its keys over first (a split not applied here yet).
    pub(crate) fn make_room_for(&self, snap: &crate::snapshot::RegionSnapshot) -> bool {
        let new = &snap.region;
        let version = new.region_epoch.unwrap_or_default().version;
        let mut stale = Vec::new();
        for r in self.regions.iter() {
            if *r.key() == new.id {
                continue;
            }
            let status = r.shared.status.lock();
            if status.applied_index == 0 || !split::overlaps(&status.region, new) {
                continue;
            }
            let old = &status.region;
            let covered = new.start_key <= old.start_key
                && (new.end_key.is_empty()
                    || (!old.end_key.is_empty() && old.end_key <= new.end_key));
            let older = old.region_epoch.unwrap_or_default().version < version;
            let merged = snap
                .merge_records
                .iter()
                .any(|(_, m)| m.source_id == old.id && m.committed);
            if !(merged || (covered && older)) {
                return false;
            }
            stale.push(old.id);
        }
        stale.into_iter().all(|id| self.destroy_replica(id, true))
    }

    /// Forgets replica `shared` of `region_id`, removed from its region.
    pub(crate) fn unregister(&self, region_id: u64, shared: &Arc<PeerShared>) {
        self.regions
            .remove_if(&region_id, |_, h| Arc::ptr_eq(&h.shared, shared));
        self.layout_changed();
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

    fn start_peer(
        &self,
        region: metapb::Region,
        campaign: bool,
        merging: Option<MergeState>,
    ) -> Result<()> {
        let ident = self
            .node_ident()?
            .ok_or_else(|| Error::Corrupted("region state without node identity".into()))?;
        let peer_id = region
            .peers
            .iter()
            .find(|p| p.node_id == ident.node_id)
            .map(|p| p.id)
            .ok_or_else(|| Error::Corrupted(format!("region {} has no peer here", region.id)))?;
        let apply_state = match self.kv.get(cf::META, &keys::apply_state_key(region.id))? {
            Some(raw) => RaftApplyState::decode(raw.as_slice())?,
            None => {
                return Err(Error::Corrupted(format!(
                    "region {} without apply state",
                    region.id
                )))
            }
        };
        let hard_state = self.reconcile_log(region.id, &apply_state)?;
        // From the region meta, not raft-engine's copy: the meta rolls back
        // with the apply state after a crash, so it matches the applied
        // index and the membership entries above it are applied again.
        let conf_state = conf_state_from_region(&region);
        self.spawn_peer(
            region,
            peer_id,
            apply_state,
            hard_state,
            conf_state,
            campaign,
            merging,
        )
    }

    /// Creates an uninitialized replica of region `region_id` for `to_peer`
    /// (on this node), which knows only the peer that contacted it. Its log
    /// is empty and truncated at 0 with no conf state, so raft-rs rejects
    /// the leader's appends and the leader sends a snapshot, which brings
    /// the region meta. Only its raft hard state (term and vote) is
    /// persisted before that snapshot: a restart forgets the replica, and
    /// the leader's next message creates it again with that hard state.
    fn create_peer(&self, region_id: u64, to_peer: metapb::Peer, from: metapb::Peer) -> Result<()> {
        // A former replica's log (tombstoned, or an uninitialized one from
        // before a restart) must not leak into the new one, but its term
        // and vote must: an uninitialized replica votes (a split's new
        // region has voters that start uninitialized), and a forgotten vote
        // could elect two leaders in one term.
        let stored = self.log.hard_state(region_id)?.unwrap_or_default();
        let hard_state = HardState {
            term: stored.term,
            vote: stored.vote,
            commit: 0,
            ..Default::default()
        };
        let mut batch = RaftLogBatch::default();
        batch.clean(region_id);
        batch.put_hard_state(region_id, &hard_state)?;
        self.log.write(&mut batch, true)?;
        let region = metapb::Region {
            id: region_id,
            peers: vec![to_peer, from],
            ..Default::default()
        };
        info!(
            region_id,
            peer_id = to_peer.id,
            from = from.id,
            "creating replica on demand"
        );
        self.spawn_peer(
            region,
            to_peer.id,
            RaftApplyState::default(),
            hard_state,
            ConfState::default(),
            false,
            None,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn spawn_peer(
        &self,
        region: metapb::Region,
        peer_id: u64,
        apply_state: RaftApplyState,
        hard_state: HardState,
        conf_state: ConfState,
        campaign: bool,
        merging: Option<MergeState>,
    ) -> Result<()> {
        let storage = PeerStorage::new(
            region.clone(),
            self.log.clone(),
            Generator::new(region.id, self.kv.clone(), self.snap_dir.clone()),
            hard_state,
            conf_state,
            apply_state.truncated_index,
            apply_state.truncated_term,
        );
        let cfg = raft::Config {
            id: peer_id,
            election_tick: 10,
            heartbeat_tick: 3,
            applied: apply_state.applied_index,
            max_size_per_msg: 1024 * 1024,
            max_inflight_msgs: 256,
            check_quorum: true,
            pre_vote: true,
            ..Default::default()
        };
        let raw = RawNode::new(&cfg, storage, &engine::raft_logger("region_id", region.id))?;
        let (tx, rx) = mpsc::channel();
        let shared = Arc::new(PeerShared {
            status: Mutex::new(PeerStatus {
                region: region.clone(),
                peer_id,
                applied_index: apply_state.applied_index,
                applied_revision: apply_state.applied_revision,
                compact_revision: apply_state.compact_revision,
                ..Default::default()
            }),
            physically_compacted: watch::channel(if apply_state.pending_compact_revision == 0 {
                apply_state.compact_revision
            } else {
                0
            })
            .0,
            locks: Default::default(),
        });
        shared.locks.replace(&txn::load_locks(&self.kv, region.id)?);
        let region_id = region.id;
        let peer = Peer::new(
            region,
            peer_id,
            raw,
            self.kv.clone(),
            self.log.clone(),
            apply_state,
            shared.clone(),
            tx.clone(),
            self.transport.clone(),
            self.options.log_gc_threshold,
            self.me.clone(),
            campaign,
            merging,
            self.options.consistency_check_interval,
        );
        // Registered under the lock `shutdown` sets `stopping` under, so
        // that a replica starting as the store stops is either stopped and
        // joined by it or not started at all (its thread would keep the
        // engines open after the store is gone).
        let mut threads = self.threads.lock();
        if self.stopping.load(Ordering::Acquire) {
            return Err(Error::Stopped(region_id));
        }
        let thread = std::thread::Builder::new()
            .name(format!("region-{region_id}"))
            .spawn(move || peer.run(rx))
            .map_err(|e| Error::Engine(engine::Error::Io(e)))?;
        threads.push(thread);
        self.regions.insert(
            region_id,
            RegionHandle {
                region_id,
                mailbox: tx,
                shared,
            },
        );
        drop(threads);
        self.layout_changed();
        info!(region_id, peer_id, "region replica started");
        Ok(())
    }

    /// The region's hard state, made consistent with its apply state. The
    /// apply state decides: a snapshot install writes it (synced) before
    /// replacing the raft log, so after a crash in between the log may
    /// still be the old one, with a commit index and entries below the new
    /// truncation point.
    fn reconcile_log(&self, region_id: u64, apply_state: &RaftApplyState) -> Result<HardState> {
        let mut hs = self.log.hard_state(region_id)?.unwrap_or_default();
        let stored = hs.clone();
        if hs.commit < apply_state.applied_index {
            hs.commit = apply_state.applied_index;
        }
        if hs.term < apply_state.truncated_term {
            hs.term = apply_state.truncated_term;
            hs.vote = 0;
        }
        if hs != stored {
            info!(region_id, ?stored, reconciled = ?hs, "raft hard state behind the apply state");
            let mut batch = RaftLogBatch::default();
            batch.put_hard_state(region_id, &hs)?;
            self.log.write(&mut batch, true)?;
        }
        if self
            .log
            .first_index(region_id)
            .is_some_and(|first| first <= apply_state.truncated_index)
        {
            self.log
                .compact_to(region_id, apply_state.truncated_index + 1)?;
        }
        Ok(hs)
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

    /// Creates the replica `msg` is for, if `msg` may create one: returns
    /// its mailbox, or `None` when the message is to be dropped.
    fn maybe_create(&self, msg: &RaftMessage) -> Result<Option<mpsc::Sender<PeerMsg>>> {
        let region_id = msg.region_id;
        let (Some(to_peer), Some(from_peer)) = (msg.to_peer, msg.from_peer) else {
            return Ok(None);
        };
        if region_id == 0 || to_peer.id == 0 || from_peer.id == 0 || from_peer.id == to_peer.id {
            return Ok(None);
        }
        let Some(ident) = self.node_ident()? else {
            return Ok(None);
        };
        if to_peer.node_id != ident.node_id {
            return Ok(None);
        }
        // Only what a leader sends: a vote or a response may come from a
        // stale or removed peer and must not bring a replica back.
        let Ok(m) = <raft::eraftpb::Message as protobuf::Message>::parse_from_bytes(&msg.message)
        else {
            return Ok(None);
        };
        if !matches!(
            m.get_msg_type(),
            MessageType::MsgAppend | MessageType::MsgHeartbeat | MessageType::MsgSnapshot
        ) {
            return Ok(None);
        }
        let _guard = self.create_lock.lock();
        if let Some(r) = self.regions.get(&region_id) {
            return Ok(Some(r.mailbox.clone()));
        }
        if let Some(raw) = self.kv.get(cf::META, &keys::region_state_key(region_id))? {
            let state = RegionLocalState::decode(raw.as_slice())?;
            let local = state
                .region
                .as_ref()
                .and_then(|r| r.region_epoch)
                .unwrap_or_default();
            let sent = msg.region_epoch.unwrap_or_default();
            // A replica removed from the region stays removed, unless the
            // region has changed membership since (added here again).
            if state.state() != PeerState::Tombstone || sent.conf_ver <= local.conf_ver {
                debug!(
                    region_id,
                    state = ?state.state(),
                    "message for a region this node left; not recreated"
                );
                return Ok(None);
            }
        }
        self.create_peer(region_id, to_peer, from_peer)?;
        Ok(self.regions.get(&region_id).map(|r| r.mailbox.clone()))
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

    /// Stops every replica and waits for their threads; pending callers get
    /// `Stopped`.
    pub fn shutdown(&self) {
        {
            // Under the lock replicas start under: none starts from now on
            // (a message creating one, a split), and every one started
            // before is registered.
            let _threads = self.threads.lock();
            self.stopping.store(true, Ordering::Release);
        }
        for r in self.regions.iter() {
            let _ = r.mailbox.send(PeerMsg::Stop);
        }
        // Not joined under the lock: a replica stopping may be starting a
        // split's new region, and is refused instead of waiting for it.
        let threads = std::mem::take(&mut *self.threads.lock());
        for t in threads {
            let _ = t.join();
        }
        let _ = self.kv.sync_wal();
    }
}
