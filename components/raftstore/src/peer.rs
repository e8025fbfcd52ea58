//! One region replica: a raft-rs `RawNode`, driven by one of the store's
//! pollers (`poller`) together with other replicas.
//!
//! This module owns the replica's turn and nothing it can hand off:
//! the mailbox (requests in the `msg` module's protocol), proposing,
//! read barriers, leadership transfer, and the callbacks of proposals; its
//! submodules take the raft messages in and out (`messages`), handle each
//! `Ready` and publish the status (`ready`), and drive the consistency
//! check (`consistency_check`). What the loop delegates, each with its own
//! contract: checking and addressing
//! raft messages (`message`), applying committed entries (`apply`, which
//! returns an outcome this loop makes the replica's), membership changes
//! (`membership`), snapshot install (`snapshot`), log GC (`log_gc`),
//! physical compaction (`compaction`), readers waiting for an index
//! (`read_queue`), pending/down peers (`status`), what a split makes of
//! the region (`split`; the store starts the new region) and the replicas'
//! consistency check (`consistency`: a ready leader proposes `ComputeHash`
//! every check interval, each replica hashes its state at that entry off
//! this thread, followers send their hashes to the leader, which judges).
//!
//! Each turn (a poller round with mail for the replica, or a tick) drains
//! the mailbox (so concurrent proposals share one raft-engine fsync),
//! ticks every [`TICK_INTERVAL`], and handles one `Ready`, in this order:
//! messages that need nothing persisted go out; a snapshot is installed
//! (raft-rs returns no committed entries with one); committed entries are
//! applied; new entries and the hard state are staged into the round's
//! raft-engine write, shared by the poller's replicas (`ready_begin`);
//! once it is written (synced when raft asks), the messages that depend on
//! them go out (`ready_end`); once raft advances, the new commit index is kept
//! (written with the next entries: the quorum has it, and a restart raises
//! it to the applied index) and the newly committed entries are applied;
//! then the log may be GCed and the status is published.
//!
//! Nothing in a turn waits for another replica: replicas share threads.
//!
//! Edge cases:
//! * A storage write failure aborts the process: going on could
//!   acknowledge writes that are not durable.
//! * A proposal is refused (`StaleCommand`) unless this replica is the
//!   ready leader of the term its header names (0: any), with the region's
//!   epoch version.
//! * Every proposal is answered exactly once; what an answer claims (did
//!   not apply, or outcome unknown) is the `proposals` module's contract.
//! * A replica removed by a membership change stops applying at that entry
//!   (its region state is already `Tombstone`), answers everything still
//!   waiting with `Stopped`, drops its raft log, deletes its data (see
//!   `snapshot::clear_removed`) and unregisters itself.
//! * A region snapshot overlapping another initialized replica on this
//!   node is dropped when it arrives, unless every such replica is of a
//!   region merged away (the store checks, and destroys those first).
//! * While the region is frozen for a merge (`merging`), proposals other
//!   than the merge's own steps, membership changes and read barriers are
//!   refused with `Merging`. Applying a merge's commit here waits for this
//!   node's replica of the source (see `apply` and the store's
//!   `merge_source_state`) without blocking: the commit and the entries
//!   after it stay unapplied, and are tried again every turn; the source's
//!   replica then stops for good.
//! * A sole voter campaigns at once when it starts, instead of waiting an
//!   election timeout, and so does a region split off a leader here; a compaction left pending by a previous run is
//!   started again.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use engine::{cf, KvEngine, RaftLogBatch, RaftLogEngine, WriteBatch};
use mvcc::MvccStore;
use prost::Message as _;
use proto::metapb;
use proto::raft_cmdpb::RaftCmdRequest;
use proto::raft_serverpb::{
    MergeState, PeerState, RaftApplyState, RegionLocalState, TxnLockRecord,
};
use raft::eraftpb::ConfChangeType;
use raft::{RawNode, SnapshotStatus, StateRole};
use tracing::{debug, error, info, warn};

use crate::apply;
use crate::compaction;
use crate::consistency::ConsistencyState;
use crate::keys;
use crate::membership;
use crate::message;
pub use crate::msg::{Applied, Callback, PeerMsg, ProposeCallback, ReadCallback};
use crate::poller::Mailbox;
use crate::proposals::Proposals;
use crate::read_queue::ReadQueue;
use crate::snapshot::{self, RegionSnapshot};
use crate::status::LastHeard;
pub use crate::status::{PeerShared, PeerStatus, PEER_DOWN_AFTER, PENDING_LAG};
use crate::storage::PeerStorage;
use crate::store::StoreCore;
use crate::transport::Transport;
use crate::{Error, Result};

mod consistency_check;
mod leases;
mod messages;
mod ready;

pub const TICK_INTERVAL: Duration = Duration::from_millis(100);
/// Default number of applied raft log entries kept before GC. Replicas that
/// fall further behind catch up through a region snapshot.
pub const DEFAULT_LOG_GC_THRESHOLD: u64 = 4096;

pub struct Peer {
    region: metapb::Region,
    peer_id: u64,
    raw: RawNode<PeerStorage>,
    kv: KvEngine,
    log: RaftLogEngine,
    mvcc: MvccStore,
    apply_state: RaftApplyState,
    proposals: Proposals,
    /// Read barriers and `WaitApplied` callers.
    reads: ReadQueue,
    was_leader: bool,
    log_gc_threshold: u64,
    /// A snapshot validated when it arrived, kept until raft hands it back
    /// for installing, so it is decoded once.
    incoming_snapshot: Option<(u64, u64, RegionSnapshot)>,
    shared: Arc<PeerShared>,
    mailbox: Mailbox,
    transport: Arc<dyn Transport>,
    /// Set once a membership change removed this replica: the loop ends.
    destroyed: bool,
    /// The store hosting this replica: it starts the regions this replica
    /// splits off, checks incoming snapshots against the other replicas
    /// and unregisters a removed replica.
    host: Weak<StoreCore>,
    /// Campaign at start (a region just split off a leader here).
    campaign: bool,
    /// Ticks since the replica started (up to a few).
    ticks: u8,
    /// When each peer last sent this replica a message (for down peers).
    last_heard: LastHeard,
    /// Peers of newer memberships heard from (see `message`).
    strangers: message::Strangers,
    /// The region's transaction locks (published in `shared.locks`).
    locks: Vec<TxnLockRecord>,
    /// Set while the region is frozen as a merge's source.
    merging: Option<MergeState>,
    /// The loop is to end without writing more (the node is stopping
    /// while an apply run waited for a merge's source, or as a split's new
    /// region was to start).
    aborted: bool,
    /// The consistency check's state (see `consistency`).
    consistency: ConsistencyState,
    /// Committed entries not applied yet: a merge's commit waiting for its
    /// source's replica here, and those after it (see `ready`).
    unapplied: Vec<raft::eraftpb::Entry>,
    /// Since when a merge's commit waits for its source, and how long it
    /// had waited when last reported.
    waiting_source: Option<Instant>,
    waiting_warned: Duration,
}

impl Peer {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        region: metapb::Region,
        peer_id: u64,
        raw: RawNode<PeerStorage>,
        kv: KvEngine,
        log: RaftLogEngine,
        apply_state: RaftApplyState,
        shared: Arc<PeerShared>,
        mailbox: Mailbox,
        transport: Arc<dyn Transport>,
        log_gc_threshold: u64,
        host: Weak<StoreCore>,
        campaign: bool,
        merging: Option<MergeState>,
        consistency_check_interval: Duration,
    ) -> Peer {
        let locks = shared.locks.all().into_iter().map(|l| l.record).collect();
        shared.status.lock().merging = merging.clone();
        Peer {
            mvcc: MvccStore::new(kv.clone()),
            region,
            peer_id,
            raw,
            kv,
            log,
            apply_state,
            proposals: Proposals::default(),
            reads: ReadQueue::default(),
            was_leader: false,
            log_gc_threshold,
            incoming_snapshot: None,
            shared,
            mailbox,
            transport,
            destroyed: false,
            host,
            campaign,
            ticks: 0,
            last_heard: LastHeard::default(),
            strangers: message::Strangers::default(),
            locks,
            merging,
            aborted: false,
            consistency: ConsistencyState::new(consistency_check_interval),
            unapplied: Vec::new(),
            waiting_source: None,
            waiting_warned: Duration::ZERO,
        }
    }

    /// Whether the replica has its region's data: false for a replica
    /// created on demand until its first snapshot is installed.
    fn is_initialized(&self) -> bool {
        self.apply_state.applied_index > 0
    }

    pub(crate) fn region_id(&self) -> u64 {
        self.region.id
    }

    /// Called by its poller once, before anything else: restarts a
    /// compaction left pending, and campaigns at once where waiting an
    /// election timeout would be pointless.
    pub(crate) fn start(&mut self) {
        if self.apply_state.pending_compact_revision != 0 {
            self.spawn_compaction(self.apply_state.pending_compact_revision);
        }
        // A sole voter need not wait an election timeout after a restart,
        // nor a region split off a leader here.
        if self.campaign || self.raw.raft.prs().conf().voters().ids().len() == 1 {
            if let Err(e) = self.raw.campaign() {
                warn!(region_id = self.region.id, "campaign failed: {e}");
            }
        }
    }

    /// One raft tick (every `TICK_INTERVAL`), and the consistency check's
    /// turn. A region split off a leader here campaigns again on its
    /// second and fourth ticks while it knows no leader: its first vote
    /// requests can reach the other nodes before they have applied the
    /// split and started their replicas, which drop them, and waiting a
    /// whole election timeout would hand the region to whichever replica
    /// times out first.
    pub(crate) fn tick(&mut self) {
        self.raw.tick();
        self.ticks = self.ticks.saturating_add(1);
        if self.campaign
            && matches!(self.ticks, 2 | 4)
            && self.raw.raft.leader_id == raft::INVALID_ID
            && self.raw.raft.state != StateRole::Candidate
        {
            if let Err(e) = self.raw.campaign() {
                warn!(region_id = self.region.id, "campaign failed: {e}");
            }
        }
        self.maybe_check_consistency();
        self.tend_leases();
    }

    /// Whether the replica is to end after this round: removed from its
    /// region, or stopping without writing more.
    pub(crate) fn ended(&self) -> bool {
        self.destroyed || self.aborted
    }

    /// Ends the replica (its poller drops it): everyone waiting is
    /// answered `Stopped`, and a replica that left its region cleans up.
    pub(crate) fn finish(mut self) {
        let region_id = self.region.id;
        self.fail_all(|| Error::Stopped(region_id));
        // Handles outlive the replica: their feed's receivers would wait
        // forever.
        self.shared.feed.reset();
        if self.destroyed {
            self.destroy();
        }
        info!(region_id, "region replica stopped");
    }

    /// Cleans up after this replica left its region. The tombstone region
    /// state is already written (with the apply state), so the replica is
    /// not restarted. Its raft log goes. If a membership change removed it
    /// (its clean-up mark is set), its data goes too, before it is
    /// unregistered, so no other replica here can own the range yet; a
    /// replica stopped because its region merged keeps the data, which the
    /// merge target owns now.
    fn destroy(&mut self) {
        let region_id = self.region.id;
        match self.kv.get(cf::META, &keys::cleanup_key(region_id)) {
            Ok(Some(_)) => {
                let limit = self
                    .host
                    .upgrade()
                    .map_or(snapshot::INSTALL_BATCH_BYTES, |h| {
                        h.options().install_batch_bytes
                    });
                if let Err(e) = snapshot::clear_removed(&self.kv, &self.region, limit) {
                    // The mark stays: start-up tries again.
                    error!(region_id, "cannot delete a removed replica's data: {e}");
                }
            }
            Ok(None) => {}
            Err(e) => error!(region_id, "cannot read the clean-up mark: {e}"),
        }
        let mut batch = RaftLogBatch::default();
        batch.clean(region_id);
        if let Err(e) = self.log.write(&mut batch, false) {
            warn!(
                region_id,
                "cannot drop the raft log of a removed replica: {e}"
            );
        }
        self.shared.status.lock().region = self.region.clone();
        if let Some(host) = self.host.upgrade() {
            host.unregister(region_id, &self.shared);
        }
        info!(
            region_id,
            peer_id = self.peer_id,
            "replica removed from its region; tombstoned"
        );
    }

    /// Handles one message from the mailbox; `false`: the replica is to
    /// end.
    pub(crate) fn handle(&mut self, msg: PeerMsg) -> bool {
        match msg {
            PeerMsg::Propose { cmd, cb } => self.propose(cmd, cb),
            PeerMsg::ReadIndex { cb } => self.read_index(cb),
            PeerMsg::WaitApplied { index, cb } => {
                self.reads
                    .wait_applied(index, cb, self.apply_state.applied_index)
            }
            PeerMsg::ChangePeers { changes, cb } => self.change_peers(changes, cb),
            PeerMsg::TransferLeader { peer_id, cb } => self.transfer_leader(peer_id, cb),
            PeerMsg::CompactionDone { revision } => compaction::finish(
                &self.kv,
                self.region.id,
                &mut self.apply_state,
                &self.shared.physically_compacted,
                revision,
            ),
            PeerMsg::HashComputed { index, hash } => self.on_hash_computed(index, hash),
            PeerMsg::CatchUpMerge { index, term } => self.catch_up_merge(index, term),
            PeerMsg::Destroy { tombstone } => {
                if tombstone {
                    if let Err(e) = self.write_tombstone(false) {
                        error!(
                            region_id = self.region.id,
                            "cannot tombstone the replica: {e}"
                        );
                        return true;
                    }
                }
                self.destroyed = true;
                return false;
            }
            PeerMsg::Raft(msg) => self.on_raft_message(msg),
            PeerMsg::SnapshotSent { to, ok } => {
                info!(region_id = self.region.id, to, ok, "region snapshot sent");
                let status = if ok {
                    SnapshotStatus::Finish
                } else {
                    SnapshotStatus::Failure
                };
                self.raw.report_snapshot(to, status);
            }
            PeerMsg::Stop => return false,
        }
        true
    }

    /// Commits the log up to a merge's prepare on the target's word (see
    /// `PeerMsg::CatchUpMerge`), if this replica holds that entry.
    fn catch_up_merge(&mut self, index: u64, term: u64) {
        let log = &mut self.raw.raft.raft_log;
        if self.apply_state.applied_index >= index || log.committed >= index {
            return;
        }
        if log.last_index() < index || log.term(index).ok() != Some(term) {
            debug!(
                region_id = self.region.id,
                index, term, "merge catch-up: the prepare is not in this replica's log yet"
            );
            return;
        }
        info!(
            region_id = self.region.id,
            index, "merge catch-up: committing up to the prepare"
        );
        log.commit_to(index);
    }

    /// Marks this replica's region state `Tombstone` (synced), keeping its
    /// meta.
    /// Told by a replica at a newer membership that this one was removed,
    /// or sent a message for a newer peer of its region here (see
    /// `message`): tombstoned with its clean-up mark, as applying its
    /// removal would have done, so it stops and deletes its data.
    fn remove_stale(&mut self) {
        let region_id = self.region.id;
        match self.write_tombstone(true) {
            Ok(()) => {
                info!(
                    region_id,
                    peer_id = self.peer_id,
                    "removed from the region while cut off; stopping"
                );
                self.destroyed = true;
            }
            Err(e) => error!(region_id, "cannot tombstone a removed replica: {e}"),
        }
    }

    /// Marks this replica a tombstone, durably; `removed`: with the
    /// clean-up mark of a replica removed from its region (its data goes
    /// as it stops), in the same write.
    fn write_tombstone(&self, removed: bool) -> Result<()> {
        let state = RegionLocalState {
            region: Some(self.region.clone()),
            state: PeerState::Tombstone as i32,
            merge_state: None,
        };
        let mut wb = WriteBatch::default();
        if removed {
            self.kv
                .put_to(&mut wb, cf::META, &keys::cleanup_key(self.region.id), &[]);
        }
        self.kv.put_to(
            &mut wb,
            cf::META,
            &keys::region_state_key(self.region.id),
            &state.encode_to_vec(),
        );
        self.kv.write(wb)?;
        self.kv.sync_wal()?;
        Ok(())
    }

    fn is_ready_leader(&self) -> bool {
        self.raw.raft.state == StateRole::Leader
            && self.apply_state.applied_term == self.raw.raft.term
    }

    fn not_leader(&self) -> Error {
        not_leader(&self.region, self.raw.raft.leader_id)
    }

    fn propose(&mut self, cmd: RaftCmdRequest, cb: ProposeCallback) {
        if !self.is_ready_leader() {
            cb(Err(self.not_leader()));
            return;
        }
        if let Err(e) = apply::check_epoch(&self.region, &cmd)
            .and_then(|()| apply::check_term(&cmd, self.raw.raft.term))
        {
            cb(Err(e));
            return;
        }
        if self.merging.is_some() && !apply::allowed_while_merging(&cmd) {
            cb(Err(Error::Merging(self.region.id)));
            return;
        }
        self.propose_entry(cb, false, |raw| {
            raw.propose(Vec::new(), cmd.encode_to_vec())
        });
    }

    fn change_peers(&mut self, changes: Vec<(ConfChangeType, metapb::Peer)>, cb: ProposeCallback) {
        if !self.is_ready_leader() {
            cb(Err(self.not_leader()));
            return;
        }
        if self.merging.is_some() {
            cb(Err(Error::Merging(self.region.id)));
            return;
        }
        let pending = self.raw.raft.has_pending_conf();
        if let Err(e) = membership::check_conf_change(&self.region, pending, &changes) {
            cb(Err(e));
            return;
        }
        let cc = membership::conf_change_proposal(&self.region, &changes);
        let proposed = self.propose_entry(cb, true, |raw| raw.propose_conf_change(Vec::new(), cc));
        if let Some(index) = proposed {
            info!(
                region_id = self.region.id,
                index,
                ?changes,
                "proposed membership change"
            );
        }
    }

    /// Appends an entry through `propose` and queues `cb` for its outcome:
    /// returns its index, or `None` once `cb` was told raft dropped it.
    fn propose_entry(
        &mut self,
        cb: ProposeCallback,
        conf_change: bool,
        propose: impl FnOnce(&mut RawNode<PeerStorage>) -> raft::Result<()>,
    ) -> Option<u64> {
        let what = if conf_change {
            "membership change"
        } else {
            "proposal"
        };
        let index = self.raw.raft.raft_log.last_index() + 1;
        let term = self.raw.raft.term;
        if let Err(e) = propose(&mut self.raw) {
            cb(Err(Error::StaleCommand(format!("{what} dropped: {e}"))));
            return None;
        }
        if self.raw.raft.raft_log.last_index() < index {
            cb(Err(Error::StaleCommand(format!("{what} dropped"))));
            return None;
        }
        self.proposals.push(index, term, cb, conf_change);
        Some(index)
    }

    fn transfer_leader(&mut self, peer_id: u64, cb: Callback) {
        if self.raw.raft.state != StateRole::Leader {
            let _ = cb.send(Err(self.not_leader()));
            return;
        }
        let is_voter = self
            .region
            .peers
            .iter()
            .any(|p| p.id == peer_id && p.role() == metapb::PeerRole::Voter);
        if !is_voter {
            let _ = cb.send(Err(Error::InvalidConfChange(format!(
                "peer {peer_id} is not a voter of region {}",
                self.region.id
            ))));
            return;
        }
        if peer_id != self.peer_id {
            info!(
                region_id = self.region.id,
                to = peer_id,
                "transferring leadership"
            );
            self.raw.transfer_leader(peer_id);
        }
        let _ = cb.send(Ok(()));
    }

    fn read_index(&mut self, cb: ReadCallback) {
        if !self.is_ready_leader() {
            let _ = cb.send(Err(self.not_leader()));
            return;
        }
        if self.merging.is_some() {
            // The target may own the range and write to it any moment.
            let _ = cb.send(Err(Error::Merging(self.region.id)));
            return;
        }
        let ctx = self.reads.push_read(cb, self.raw.raft.term);
        self.raw.read_index(ctx);
    }

    /// Answers everyone waiting as the replica stops: readers `err`,
    /// proposals already in the log `OutcomeUnknown`.
    fn fail_all(&mut self, err: impl Fn() -> Error) {
        self.proposals
            .fail_all(|| Error::OutcomeUnknown("the replica stopped".into()));
        self.reads.fail_all(err);
    }
}

/// `NotLeader` for `region`, naming peer `leader_id` if it is a member.
fn not_leader(region: &metapb::Region, leader_id: u64) -> Error {
    Error::NotLeader {
        region_id: region.id,
        leader: region.peers.iter().find(|p| p.id == leader_id).cloned(),
    }
}
