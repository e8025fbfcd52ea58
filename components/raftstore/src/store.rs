//! The replicas a node hosts, and the handle callers use to reach one.
//!
//! Contract of [`RegionHandle`]:
//! * `propose` resolves once the command is applied on this replica (its
//!   effects are readable here), or fails with a region error when this
//!   replica is not a leader that has applied an entry of its term, when the
//!   epoch differs, or when a new leader overwrote the entry. A failed
//!   proposal may still have been committed only for `StaleCommand` after a
//!   leader change; callers treat that outcome as unknown.
//! * `read_index` resolves once a quorum confirmed this replica's leadership
//!   and everything committed before the call is applied here.
//! * `status` is a snapshot taken after the replica's last loop turn.
//!
//! Replicas reach their peers on other nodes through the [`Transport`] the
//! store was opened with; messages from other nodes come in through
//! [`Store::on_raft_message`].

use std::path::Path;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

use dashmap::DashMap;
use engine::{cf, KvEngine, RaftLogBatch, RaftLogEngine, WriteBatch};
use mvcc::MvccStore;
use parking_lot::Mutex;
use prost::Message as _;
use proto::metapb;
use proto::raft_cmdpb::RaftCmdRequest;
use proto::raft_serverpb::{PeerState, RaftApplyState, RaftMessage, RegionLocalState};
use raft::eraftpb::{ConfState, HardState};
use raft::RawNode;
use tokio::sync::{oneshot, watch};
use tracing::{debug, info};

use crate::keys;
use crate::logger::raft_logger;
use crate::peer::{Peer, PeerMsg, PeerShared, PeerStatus, DEFAULT_LOG_GC_THRESHOLD};
use crate::storage::{PeerStorage, INIT_INDEX, INIT_TERM};
use crate::transport::{DropTransport, Transport};
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

    pub async fn propose(&self, cmd: RaftCmdRequest) -> Result<()> {
        self.submit(cmd)?.await
    }

    /// Queues `cmd` for proposal now and returns the wait for its outcome.
    /// Commands submitted one after another reach the raft log in that
    /// order (when both are accepted), which callers use to keep revision
    /// order equal to log order.
    pub fn submit(
        &self,
        cmd: RaftCmdRequest,
    ) -> Result<impl std::future::Future<Output = Result<()>> + use<>> {
        let (cb, rx) = oneshot::channel();
        self.send(PeerMsg::Propose { cmd, cb })?;
        let region_id = self.region_id;
        Ok(async move { rx.await.map_err(|_| Error::Stopped(region_id))? })
    }

    pub async fn read_index(&self) -> Result<()> {
        let (cb, rx) = oneshot::channel();
        self.send(PeerMsg::ReadIndex { cb })?;
        rx.await.map_err(|_| Error::Stopped(self.region_id))?
    }

    pub fn status(&self) -> PeerStatus {
        self.shared.status.lock().clone()
    }

    /// Waits until the physical clean-up of compaction `revision` is done.
    pub async fn wait_physically_compacted(&self, revision: i64) -> Result<()> {
        let mut rx = self.shared.physically_compacted.subscribe();
        rx.wait_for(|done| *done >= revision)
            .await
            .map(|_| ())
            .map_err(|_| Error::Stopped(self.region_id))
    }

    fn send(&self, msg: PeerMsg) -> Result<()> {
        self.mailbox
            .send(msg)
            .map_err(|_| Error::Stopped(self.region_id))
    }
}

/// Tunables of a [`Store`].
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// Applied raft log entries kept before a replica drops its log prefix.
    /// Replicas further behind than this catch up through a snapshot.
    pub log_gc_threshold: u64,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            log_gc_threshold: DEFAULT_LOG_GC_THRESHOLD,
        }
    }
}

/// The engines of a node and the region replicas on them.
pub struct Store {
    data_dir: std::path::PathBuf,
    kv: KvEngine,
    log: RaftLogEngine,
    regions: DashMap<u64, RegionHandle>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    transport: Arc<dyn Transport>,
    options: StoreOptions,
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
        let log = RaftLogEngine::open(&data_dir.join("raft"))?;
        let store = Store {
            data_dir: data_dir.to_owned(),
            kv,
            log,
            regions: DashMap::new(),
            threads: Mutex::new(Vec::new()),
            transport,
            options,
        };
        let (lower, upper) = keys::region_state_bounds();
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
        for state in states {
            if state.state() == PeerState::Normal {
                let region = state.region.unwrap_or_default();
                store.start_peer(region)?;
            }
        }
        Ok(store)
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
        self.kv.write(wb)?;
        self.kv.sync_wal()?;
        self.start_peer(region)
    }

    fn start_peer(&self, region: metapb::Region) -> Result<()> {
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
        let conf_state = self.log.conf_state(region.id)?.unwrap_or_default();
        let storage = PeerStorage::new(
            region.clone(),
            self.log.clone(),
            self.kv.clone(),
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
        let raw = RawNode::new(&cfg, storage, &raft_logger(region.id))?;
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
        });
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
        );
        let thread = std::thread::Builder::new()
            .name(format!("region-{region_id}"))
            .spawn(move || peer.run(rx))
            .map_err(|e| Error::Engine(engine::Error::Io(e)))?;
        self.threads.lock().push(thread);
        self.regions.insert(
            region_id,
            RegionHandle {
                region_id,
                mailbox: tx,
                shared,
            },
        );
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

    /// Hands a raft message from another node to the replica it is for.
    /// Messages for regions not hosted here are dropped: the sender retries,
    /// and creating replicas on demand (from a snapshot) is not built yet.
    pub fn on_raft_message(&self, msg: RaftMessage) {
        let region_id = msg.region_id;
        let Some(mailbox) = self.regions.get(&region_id).map(|r| r.mailbox.clone()) else {
            debug!(
                region_id,
                "raft message for a region not hosted here; dropped"
            );
            return;
        };
        if mailbox.send(PeerMsg::Raft(msg)).is_err() {
            debug!(region_id, "raft message for a stopped replica; dropped");
        }
    }

    pub fn region(&self, region_id: u64) -> Option<RegionHandle> {
        self.regions.get(&region_id).map(|r| r.clone())
    }

    pub fn regions(&self) -> Vec<RegionHandle> {
        self.regions.iter().map(|r| r.clone()).collect()
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
        for r in self.regions.iter() {
            let _ = r.mailbox.send(PeerMsg::Stop);
        }
        for t in self.threads.lock().drain(..) {
            let _ = t.join();
        }
        let _ = self.kv.sync_wal();
    }
}
