//! How replicas start and go on this node: at open, on a split, on a
//! message for a region not hosted here (an uninitialized replica), when a
//! snapshot needs the room of replicas of regions merged away, when a
//! merge's target waits for its source, and when a removed replica
//! unregisters (the rules are in the `store` module docs).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use engine::{cf, RaftLogBatch};
use parking_lot::Mutex;
use prost::Message as _;
use proto::metapb;
use proto::raft_serverpb::{MergeState, PeerState, RaftApplyState, RaftMessage, RegionLocalState};
use raft::eraftpb::{ConfState, HardState, MessageType};
use raft::RawNode;
use tokio::sync::watch;
use tracing::{debug, info};

use super::StoreCore;
use crate::keys;
use crate::membership::conf_state_from_region;
use crate::msg::PeerMsg;
use crate::peer::Peer;
use crate::poller::Mailbox;
use crate::region_handle::RegionHandle;
use crate::snapshot::Generator;
use crate::split;
use crate::status::{PeerShared, PeerStatus};
use crate::storage::{PeerStorage, INIT_INDEX, INIT_TERM};
use crate::txn;
use crate::{Error, Result};

impl StoreCore {
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

    /// The revisions of this node's replica of merge source `source` if it
    /// has applied its log up to the prepare at (`index`, `term`); `None`
    /// while it has not (the replica may not have started yet, at
    /// start-up, or may still be receiving the entries), after telling it
    /// the prepare is committed (see `PeerMsg::CatchUpMerge`);
    /// `Err(Stopped)` once the store stops. Never blocks: the caller, a
    /// merge target's replica, tries again later.
    pub(crate) fn merge_source_state(
        &self,
        source: &metapb::Region,
        index: u64,
        term: u64,
    ) -> Result<Option<crate::apply::SourceState>> {
        if self.stopping.load(Ordering::Acquire) {
            return Err(Error::Stopped(source.id));
        }
        let Some(h) = self.region(source.id) else {
            return Ok(None);
        };
        let status = h.status();
        if status.applied_index >= index {
            return Ok(Some(crate::apply::SourceState {
                applied_revision: status.applied_revision,
                compact_revision: status.compact_revision,
            }));
        }
        let _ = h.mailbox.send(PeerMsg::CatchUpMerge { index, term });
        Ok(None)
    }

    /// Tells this node's replica of `region_id`, a merge source whose
    /// merge was just applied here, to stop for good, without waiting for
    /// it (the caller is the target's replica, whose thread may be the
    /// source's too). Until it has stopped, its handle answers nothing
    /// useful: its region state is `Tombstone` and its region frozen.
    pub(crate) fn stop_merged_source(&self, region_id: u64) {
        if let Some(h) = self.region(region_id) {
            let _ = h.mailbox.send(PeerMsg::Destroy { tombstone: false });
        }
    }

    /// Makes room for installing a snapshot of `snap.region` here, later:
    /// every initialized replica here whose range overlaps it must be a
    /// region that no longer exists — merged away, as the snapshot shows by
    /// covering its whole range with a newer epoch version or by carrying
    /// the record of its committed merge. Those are told to tombstone
    /// themselves and stop (see `PeerMsg::Destroy`), not waited for: the
    /// caller is a replica, whose thread may be theirs too. `false`
    /// (nothing told) if any other overlaps, which must hand its keys over
    /// first (a split not applied here yet). Either way this snapshot is
    /// dropped; the leader sends another later, which fits once they are
    /// gone.
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
        for id in stale {
            if let Some(h) = self.region(id) {
                info!(
                    region_id = id,
                    "destroying the replica: its region is gone from this node"
                );
                let _ = h.mailbox.send(PeerMsg::Destroy { tombstone: true });
            }
        }
        true
    }

    /// Forgets replica `shared` of `region_id`, removed from its region.
    pub(crate) fn unregister(&self, region_id: u64, shared: &Arc<PeerShared>) {
        self.regions
            .remove_if(&region_id, |_, h| Arc::ptr_eq(&h.shared, shared));
        self.layout_changed();
    }

    pub(super) fn start_peer(
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
        let (mailbox, rx) = self.pollers.mailbox();
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
            feed: Default::default(),
            leases: Default::default(),
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
            mailbox.clone(),
            self.transport.clone(),
            self.options.log_gc_threshold,
            self.me.clone(),
            campaign,
            merging,
            self.options.consistency_check_interval,
        );
        // Handed to its poller under the lock `shutdown` sets `stopping`
        // under, so that a replica starting as the store stops is either
        // ended by the pollers' exit or not started at all.
        let starting = self.start_lock.lock();
        if self.stopping.load(Ordering::Acquire) {
            return Err(Error::Stopped(region_id));
        }
        self.pollers.run(&mailbox, peer, rx)?;
        self.regions.insert(
            region_id,
            RegionHandle {
                region_id,
                mailbox,
                shared,
            },
        );
        drop(starting);
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

    /// Creates the replica `msg` is for, if `msg` may create one: returns
    /// its mailbox, or `None` when the message is to be dropped.
    pub(super) fn maybe_create(&self, msg: &RaftMessage) -> Result<Option<Mailbox>> {
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
}
