//! A replica's `Ready` handling (the order is in the `peer` module docs):
//! installing a region snapshot, applying committed entries through
//! `apply` and making the outcome the replica's (new regions of a split
//! started, merged sources stopped, compaction started), persisting the
//! log, and publishing the status.

use std::time::{Duration, Instant};

use engine::RaftLogBatch;
use proto::metapb;
use raft::eraftpb::{Entry, Snapshot};
use raft::{Ready, StateRole};
use tracing::{info, warn};

use super::{not_leader, Peer};
use crate::apply::{self, ApplyContext, ApplyOutcome};
use crate::compaction;
use crate::feed::{self, AppliedRun};
use crate::log_gc;
use crate::msg::PeerMsg;
use crate::snapshot;
use crate::{Error, Result};

/// How often a merge still waiting for its source's replica here is
/// reported.
const MERGE_WAIT_WARNING: Duration = Duration::from_secs(5);

impl Peer {
    /// Handles this replica's `Ready`, if it has one, up to the log write:
    /// its new entries and hard state are staged into `batch`, the round's
    /// write shared by every replica of the poller (`sync` is set if raft
    /// asks for an fsync). `None`: nothing to finish after the write.
    pub(crate) fn ready_begin(
        &mut self,
        batch: &mut RaftLogBatch,
        sync: &mut bool,
    ) -> Result<Option<Ready>> {
        if !self.raw.has_ready() {
            if !self.unapplied.is_empty() {
                // A merge waits for its source: try again.
                self.apply(Vec::new())?;
                if self.destroyed {
                    return Ok(None);
                }
                self.raw.advance_apply_to(self.apply_state.applied_index);
            }
            self.after_ready();
            return Ok(None);
        }
        let mut ready = self.raw.ready();
        self.send_messages(ready.take_messages());
        if !ready.snapshot().is_empty() {
            // raft-rs returns no committed entries with a snapshot, and the
            // entries in this ready follow it: install it first.
            let mut hs = ready
                .hs()
                .cloned()
                .unwrap_or_else(|| self.raw.store().hard_state().clone());
            hs.commit = ready.snapshot().get_metadata().index;
            self.install_snapshot(ready.snapshot(), hs)?;
        }
        for rs in ready.take_read_states() {
            self.reads.on_read_state(&rs.request_ctx, rs.index);
        }
        self.apply(ready.take_committed_entries())?;
        if self.destroyed {
            // Removed from the region: nothing more of this group matters.
            return Ok(None);
        }
        self.raw
            .mut_store()
            .stage_ready(batch, ready.entries(), ready.hs())?;
        *sync |= ready.must_sync();
        Ok(Some(ready))
    }

    /// Finishes `ready` once the round's log write is done: the messages
    /// that needed it go out, raft advances, the newly committed entries
    /// are applied, the log may be GCed and the status is published.
    pub(crate) fn ready_end(&mut self, mut ready: Ready) -> Result<()> {
        self.send_messages(ready.take_persisted_messages());
        // Not `advance`: it would count the ready's committed entries
        // applied, which a merge waiting for its source may have left in
        // `unapplied`.
        let mut light = self.raw.advance_append(ready);
        if let Some(commit) = light.commit_index() {
            let mut hs = self.raw.raft.hard_state();
            hs.commit = commit;
            self.raw.mut_store().record_commit(hs);
        }
        self.send_messages(light.take_messages());
        self.apply(light.take_committed_entries())?;
        if self.destroyed {
            return Ok(());
        }
        // Entries waiting for a merge's source stay unapplied for raft-rs
        // too.
        self.raw.advance_apply_to(self.apply_state.applied_index);
        log_gc::gc_raft_log(
            &mut self.raw,
            &self.kv,
            &self.log,
            self.region.id,
            &mut self.apply_state,
            self.log_gc_threshold,
        )?;
        self.after_ready();
        Ok(())
    }

    /// Replaces this replica's data, region meta and log by `snap`'s (a
    /// replica created on demand gets its range, epoch and peers here; see
    /// `snapshot::install`), then publishes the new state and redoes the
    /// snapshot's compaction.
    fn install_snapshot(&mut self, snap: &Snapshot, hs: raft::eraftpb::HardState) -> Result<()> {
        let host = self.host.upgrade().ok_or(Error::Stopped(self.region.id))?;
        let installed = snapshot::install(
            &self.kv,
            &self.log,
            self.raw.mut_store(),
            snap,
            hs,
            self.incoming_snapshot.take(),
            host.snap_dir(),
            host.options().install_batch_bytes,
        )?;
        self.apply_state = installed.apply_state;
        self.region = installed.region;
        // Committed entries still waiting to apply are below the snapshot.
        self.unapplied.clear();
        self.waiting_source = None;
        self.strangers.clear();
        self.consistency.reset();
        self.merging = installed.merging.clone();
        self.shared.status.lock().merging = installed.merging;
        self.shared.locks.replace(&installed.locks);
        self.locks = installed.locks;
        self.shared.feed.reset();
        // The snapshot replaced the log: whether it holds our proposals
        // cannot be told any more.
        self.proposals
            .fail_all(|| Error::OutcomeUnknown("the raft log was replaced by a snapshot".into()));
        {
            let mut status = self.shared.status.lock();
            status.region = self.region.clone();
            status.applied_index = self.apply_state.applied_index;
            status.truncated_index = self.apply_state.truncated_index;
            status.applied_revision = self.apply_state.applied_revision;
            status.compact_revision = self.apply_state.compact_revision;
        }
        if let Some(host) = self.host.upgrade() {
            host.layout_changed();
        }
        if self.apply_state.compact_revision > 0 {
            self.spawn_compaction(self.apply_state.compact_revision);
        }
        Ok(())
    }

    /// Applies committed `entries` (see the `apply` module for what that
    /// stages and returns), after those still waiting from earlier turns,
    /// then makes the outcome this replica's: the batch with the apply
    /// state goes to RocksDB, the new conf state to raft-rs's storage and
    /// (a copy) to raft-engine, the applied state is published, and only
    /// then are the callers answered and a compaction started. A merge's
    /// commit whose source's replica here has not caught up yet stops the
    /// applying before it: it and the entries after it wait in
    /// `unapplied` for a later turn (the replica goes on taking messages
    /// meanwhile, and its thread may be the source's own). A removed
    /// replica's loop ends after this turn.
    pub(super) fn apply(&mut self, entries: Vec<Entry>) -> Result<()> {
        let mut queue = std::mem::take(&mut self.unapplied);
        queue.extend(entries);
        let mut rest = &queue[..];
        while !rest.is_empty() {
            let applied = self.apply_run(rest)?;
            if self.destroyed || self.aborted {
                return Ok(());
            }
            rest = &rest[applied.min(rest.len())..];
            if applied == 0 || self.waiting_source.is_some() {
                break;
            }
        }
        self.unapplied = rest.to_vec();
        Ok(())
    }

    /// One apply run over a prefix of `entries` (a run ends early after a
    /// `ComputeHash`, whose hash is started here, and before a merge's
    /// commit that must wait for its source); returns how many entries it
    /// applied.
    fn apply_run(&mut self, entries: &[Entry]) -> Result<usize> {
        let raw = &mut self.raw;
        let host = self.host.clone();
        let region_id = self.region.id;
        let source_state = move |source: &metapb::Region, index: u64, term: u64| {
            let host = host.upgrade().ok_or(Error::Stopped(region_id))?;
            host.merge_source_state(source, index, term)
        };
        // Read once: a receiver subscribing after this gets a run whose
        // writes were not collected, and must be told to start over.
        let observed = self.shared.feed.observed();
        let ctx = ApplyContext {
            kv: &self.kv,
            mvcc: &self.mvcc,
            peer_id: self.peer_id,
            region: &self.region,
            apply_state: &self.apply_state,
            locks: &self.locks,
            merging: self.merging.as_ref(),
            source_state: &source_state,
            observe: observed,
        };
        let (wb, outcome) = apply::apply_entries(ctx, entries, |cc| raw.apply_conf_change(cc));
        if outcome.aborted {
            // Nothing of the run is written; it is applied again at the
            // next start.
            info!(region_id, "stopping while a merge waited for its source");
            self.aborted = true;
            return Ok(0);
        }
        if outcome.waiting_source {
            let since = *self.waiting_source.get_or_insert_with(Instant::now);
            if since.elapsed() >= self.waiting_warned + MERGE_WAIT_WARNING {
                self.waiting_warned = since.elapsed();
                warn!(
                    region_id,
                    waited = ?since.elapsed(),
                    "merge waits for this node's replica of its source"
                );
            }
            if outcome.results.is_empty() {
                return Ok(0);
            }
        } else {
            self.waiting_source = None;
            self.waiting_warned = Duration::ZERO;
        }
        self.kv.write(wb)?;
        let ApplyOutcome {
            results,
            apply_state,
            region,
            conf_state,
            compaction,
            removed,
            splits,
            locks,
            merge_state,
            merged_sources,
            aborted: _,
            waiting_source: _,
            compute_hash,
            writes,
            lease_changes,
        } = outcome;
        let applied = results.len();
        let first_index = self.apply_state.applied_index + 1;
        let old_version = self.region.region_epoch.map(|e| e.version);
        self.apply_state = apply_state;
        if let Some(region) = region {
            self.region = region;
            self.strangers.clear();
        }
        if let Some(merging) = merge_state {
            self.merging = merging;
        }
        if !splits.is_empty() {
            self.start_split_regions(splits)?;
        }
        if !merged_sources.is_empty() {
            self.finish_merges(&merged_sources)?;
        }
        if let Some(cs) = conf_state {
            self.raw.mut_store().set_conf_state(cs.clone());
            // Informational copy next to the log: start-up derives the conf
            // state from the region meta, which is written with the apply
            // state above and so always matches the applied index.
            let mut batch = RaftLogBatch::default();
            batch.put_conf_state(self.region.id, &cs)?;
            self.log.write(&mut batch, false)?;
        }
        if removed {
            self.destroyed = true;
        }
        {
            // Visible before anyone hears of the writes, so a caller's next
            // serializable read sees at least its own write.
            let mut status = self.shared.status.lock();
            status.region = self.region.clone();
            status.merging = self.merging.clone();
            status.applied_index = self.apply_state.applied_index;
            status.applied_revision = self.apply_state.applied_revision;
            status.compact_revision = self.apply_state.compact_revision;
        }
        if let Some(locks) = locks {
            // Before any caller hears of the entries: a transaction's
            // coordinator that was told "locked" relies on readers and
            // writers here seeing the lock.
            self.shared.locks.replace(&locks);
            self.locks = locks;
        }
        if removed || !observed || old_version != self.region.region_epoch.map(|e| e.version) {
            // Nobody listened when the run began (its writes were not
            // collected): anyone listening now starts over from MVCC,
            // which a snapshot taken before this write would miss.
            self.shared.feed.reset();
        } else {
            // Every run, written or not: a subscriber counts the indexes
            // it has seen.
            self.shared.feed.publish(AppliedRun {
                first_index,
                last_index: self.apply_state.applied_index,
                writes,
                resolved: self.resolved_revision(),
            });
        }
        for r in results {
            self.proposals.on_applied(r);
        }
        if let Some(rev) = compaction {
            self.spawn_compaction(rev);
        }
        if let Some(index) = compute_hash {
            self.start_hash(index);
        }
        self.on_lease_changes(lease_changes);
        Ok(applied)
    }

    /// Makes the regions split off by the entries just applied live on this
    /// node, before anyone hears of the split: the split is made durable
    /// (a new region's replica may vote and accept entries at once, which
    /// a roll-back of the split after a crash would orphan), this
    /// replica's shrunk range is published (so the new regions' snapshots
    /// are no longer refused as overlapping it), then the store starts
    /// them. The store stopping is not an error: the replicas start from
    /// their persisted state at the next start-up.
    fn start_split_regions(&mut self, splits: Vec<metapb::Region>) -> Result<()> {
        self.kv.sync_wal()?;
        self.shared.status.lock().region = self.region.clone();
        let Some(host) = self.host.upgrade() else {
            return Ok(());
        };
        host.layout_changed();
        let campaign = self.raw.raft.state == StateRole::Leader;
        for region in splits {
            match host.start_split_region(region, campaign) {
                // The node is stopping: the new regions' states are written
                // (synced above), so they start with the node next time.
                Err(Error::Stopped(_)) => {
                    self.aborted = true;
                    return Ok(());
                }
                r => r?,
            }
        }
        Ok(())
    }

    /// Stops this node's replicas of the regions this one just took over:
    /// the merge is made durable first (their `Tombstone` state is in the
    /// batch just written, and their raft logs go next), and this
    /// replica's grown range is published before they unregister (they
    /// are told to stop, not waited for).
    fn finish_merges(&mut self, sources: &[u64]) -> Result<()> {
        self.kv.sync_wal()?;
        self.shared.status.lock().region = self.region.clone();
        let Some(host) = self.host.upgrade() else {
            return Ok(());
        };
        for source in sources {
            host.stop_merged_source(*source);
        }
        host.layout_changed();
        Ok(())
    }

    /// Starts the physical clean-up of compaction `revision`; the replica
    /// hears of its end through its mailbox.
    pub(super) fn spawn_compaction(&self, revision: i64) {
        let mailbox = self.mailbox.clone();
        compaction::spawn(self.mvcc.clone(), &self.region, revision, move || {
            let _ = mailbox.send(PeerMsg::CompactionDone { revision });
        });
    }

    /// The resolved revision of the replica's state (see `feed`).
    fn resolved_revision(&self) -> i64 {
        feed::resolved_revision(
            self.apply_state.applied_revision,
            self.locks.iter().map(|l| l.base_revision),
        )
    }

    fn after_ready(&mut self) {
        let applied = self.apply_state.applied_index;
        self.reads.release(applied);
        let log = &self.raw.raft.raft_log;
        self.proposals
            .fail_replaced(self.raw.raft.term, |index| log.term(index).ok());
        let leader = self.raw.raft.state == StateRole::Leader;
        if self.was_leader && !leader {
            // raft-rs forgets read requests across a leader change.
            let (region, leader_id) = (&self.region, self.raw.raft.leader_id);
            self.reads
                .fail_unconfirmed(|| not_leader(region, leader_id));
        }
        if leader {
            self.last_heard
                .on_leader_turn(!self.was_leader, &self.raw.raft);
        }
        self.was_leader = leader;
        let mut status = self.shared.status.lock();
        status.region = self.region.clone();
        status.peer_id = self.peer_id;
        status.term = self.raw.raft.term;
        status.commit_index = self.raw.raft.raft_log.committed;
        status.applied_index = applied;
        status.truncated_index = self.raw.store().truncated_index();
        status.leader_peer_id = self.raw.raft.leader_id;
        status.ready_leader = self.is_ready_leader();
        status.applied_revision = self.apply_state.applied_revision;
        status.compact_revision = self.apply_state.compact_revision;
        (status.pending_peers, status.down_peers) =
            self.last_heard.lagging_peers(&self.raw.raft, self.peer_id);
        status.min_matched = if leader {
            self.raw
                .raft
                .prs()
                .iter()
                .map(|(_, pr)| pr.matched)
                .min()
                .unwrap_or(0)
        } else {
            0
        };
    }
}
