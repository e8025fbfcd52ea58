//! Applying committed raft entries to the region's state machine.
//!
//! [`apply_entries`] stages the effects of one run of committed entries
//! into a single RocksDB `WriteBatch` (ending with the new apply state) and
//! returns what happened as an [`ApplyOutcome`], in the manner of TiKV's
//! apply returning `ExecResult`s: it writes nothing and changes nothing of
//! the replica except raft-rs's configuration (see the end of these docs).
//! The replica then, in this order: writes the batch (no fsync: after a
//! crash the data and the apply state roll back together and the entries
//! are applied again from raft-engine), adopts the apply state and region
//! meta, tells raft-rs's storage the new conf state and writes its
//! informational copy to raft-engine, publishes the applied index and
//! revisions, answers the callers entry by entry and starts the physical
//! compaction, if any. Commands carry the mutations computed by the leader,
//! so applying is deterministic and never reads the state machine.
//!
//! Contract, per entry (an `Err` in [`EntryResult::result`] is that
//! entry's answer; the entry is still applied, i.e. its index counts):
//! * an empty normal entry (a new leader's) does nothing;
//! * a data command whose epoch `version` differs from the region's fails
//!   with `EpochNotMatch` (`conf_ver` is not checked: a membership change
//!   does not change which keys the region owns);
//! * a data command whose header names a term other than its entry's own
//!   fails with `StaleCommand`: its mutations were computed by a leader of
//!   another term (the leader refuses such a proposal already; this check
//!   holds whatever a proposer did). Term 0 is not bound to a term;
//! * a write with a key outside the region, or whose revision is not above
//!   the applied revision, fails with `StaleCommand`; otherwise its mutations are staged and the applied
//!   revision becomes its revision;
//! * a write of a key some transaction has locked fails with
//!   `StaleCommand`; the transaction commands (lock, commit, rollback,
//!   forget) do what the `txn` module says; their effect on the locks is
//!   in the outcome (`locks`) for the replica to publish;
//! * a compaction or a split while the region holds transaction locks fails
//!   with `StaleCommand` (a commit below the compaction revision, or a lock
//!   left on the wrong side of a split, would break the history);
//! * a compaction at or below the compaction revision fails with
//!   `Compacted`; otherwise it becomes the compaction revision and the
//!   pending one, and the outcome asks for the physical clean-up (the last
//!   such revision of the run);
//! * a split (checked by the `split` module's `derive`) stages the region's
//!   new meta (later entries of the run see it) and the new region's state:
//!   its region state and an apply state at `INIT_INDEX`/`INIT_TERM` with
//!   the region's applied, compaction and pending compaction revisions —
//!   unless this node already has a state for the new region (a snapshot
//!   newer than the split, or a removed replica's tombstone, which stays);
//!   the outcome names the new region if its state was staged, for the
//!   replica to start;
//! * the merge commands do what the `merge` module says. While the region
//!   is frozen for a merge (`merging`), every command but a rollback of
//!   that merge, a reject, a commit (refused) and a transaction `forget`
//!   fails with `Merging`, and so does a membership change. A commit (or a
//!   reject) answers the merge's decision: `Ok` for committed,
//!   `MergeRefused` for refused — which still stages the refusal's record
//!   if it is new. A commit that takes a source over needs this node's
//!   replica of the source to have applied its log up to the prepare
//!   ([`ApplyContext::source_state`]): until it has, the run ends just
//!   before the commit's entry (`waiting_source`: the entries before it
//!   are in the batch, the replica applies the commit and the rest later,
//!   without blocking its thread, which may be the source's too); if the
//!   node is stopping the run ends there, `aborted`, and nothing of it may
//!   be written;
//! * a `ComputeHash` (consistency check) changes nothing but ends the run
//!   after itself: the outcome names its index (`compute_hash`), and the
//!   replica hashes its state once the batch is written, before applying
//!   the rest (see the `consistency` module);
//! * a lease command (`Cmd::Lease`) changes a lease record in the META
//!   column family, no revision, and is listed in the outcome
//!   (`lease_changes`) for the leader's clock (the `lease` module);
//! * an undecodable command or one without a body fails with `Corrupted`;
//! * a membership change is checked and turned into the new region meta by
//!   the `membership` module; the meta is staged as the region state
//!   (`Tombstone` if this replica was removed, else `Normal`) and later
//!   entries of the run see it. A rejected change changes nothing.
//!
//! Once a membership change removes this replica, the entries after it are
//! not applied (they are not this replica's any more): the run stops there
//! and the apply state's applied index is the removing entry's.
//!
//! raft-rs's configuration is the one thing that must move *during* the
//! run rather than after it: raft-rs checks each change against the
//! configuration left by the previous one, and every replica must reach the
//! same verdict in entry order. `RawNode::apply_conf_change` needs the
//! `RawNode`, which the replica owns, so [`apply_entries`] takes it as a
//! closure called once per membership change, in entry order, after the
//! change passed its own checks (a closure rather than the `RawNode`
//! itself: apply needs only that one call, and tests pass a fake).
//! Everything else about the change (region meta, storage conf state, the
//! raft-engine copy) is in the outcome: the storage's conf state is read
//! only when raft-rs builds a snapshot, never during a run, so setting it
//! once after the run is the same as setting it after every change.
//!
//! The merge commands are applied in the `merging` submodule.

use engine::{cf, KvEngine, WriteBatch};
use mvcc::MvccStore;
use prost::Message as _;
use proto::metapb;
use proto::raft_cmdpb::{raft_cmd_request::Cmd, Mutation, RaftCmdRequest, SplitRequest};
use proto::raft_serverpb::{
    MergeRecord, MergeState, PeerState, RaftApplyState, RegionLocalState, TxnLockRecord,
};
use raft::eraftpb::{ConfChangeV2, ConfState, Entry, EntryType};
use tracing::info;

use crate::feed::AppliedWrite;
use crate::keys;
use crate::membership;
use crate::merge;
use crate::split;
use crate::storage::{INIT_INDEX, INIT_TERM};
use crate::txn::{self, TxnApply};
use crate::{Error, Result};
use lease::key_changes;

mod lease;
mod merging;

pub(crate) use lease::LeaseChange;

/// The outcome of one committed entry, to answer its proposal with.
#[derive(Debug)]
pub(crate) struct EntryResult {
    pub index: u64,
    pub term: u64,
    /// A membership change entry (raft-rs turns a membership change it
    /// refuses at proposal into an empty normal entry, which the proposer
    /// must not take for success).
    pub is_conf: bool,
    pub result: Result<()>,
    /// The region's applied revision after this entry (a write's own
    /// revision when it applied).
    pub revision: i64,
}

/// What applying a run of committed entries did; see the module docs for
/// how the replica consumes it.
#[derive(Debug)]
pub(crate) struct ApplyOutcome {
    /// One per applied entry, in entry order.
    pub results: Vec<EntryResult>,
    /// The apply state after the run (also staged in the batch).
    pub apply_state: RaftApplyState,
    /// The region meta after the run, if a membership change applied.
    pub region: Option<metapb::Region>,
    /// Raft's configuration after the last membership change applied, for
    /// raft-rs's storage and the raft-engine copy.
    pub conf_state: Option<ConfState>,
    /// A compaction revision whose physical clean-up is to start.
    pub compaction: Option<i64>,
    /// A membership change removed this replica (its region state is
    /// staged as `Tombstone`); the replica is to stop.
    pub removed: bool,
    /// New regions split off by the run, in entry order, to be started on
    /// this node.
    pub splits: Vec<metapb::Region>,
    /// The region's transaction locks after the run, if it changed them.
    pub locks: Option<Vec<TxnLockRecord>>,
    /// The region's merge state after the run, if it changed (a prepare,
    /// a rollback).
    pub merge_state: Option<Option<MergeState>>,
    /// Source regions this region took over in the run: their replicas
    /// here are to stop (their state is staged `Tombstone`).
    pub merged_sources: Vec<u64>,
    /// The run gave up waiting for a merge's source (the node is
    /// stopping): the batch and the outcome must be thrown away.
    pub aborted: bool,
    /// The run ended before a merge's commit whose source's replica here
    /// has not applied the prepare yet: that entry and those after it are
    /// to be applied again later.
    pub waiting_source: bool,
    /// A `ComputeHash` applied at this index, the run's last entry.
    pub compute_hash: Option<u64>,
    /// The writes applied, in entry order, when the context asked for
    /// them (`observe`).
    pub writes: Vec<AppliedWrite>,
    /// The lease changes applied, in entry order (see `lease`).
    pub lease_changes: Vec<LeaseChange>,
}

/// A source region's revisions once its replica here has applied the
/// prepare of its merge.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct SourceState {
    pub applied_revision: i64,
    pub compact_revision: i64,
}

/// See [`ApplyContext::source_state`]: (source region, prepare index,
/// prepare term).
pub(crate) type SourceStateFn<'a> =
    dyn Fn(&metapb::Region, u64, u64) -> Result<Option<SourceState>> + 'a;

/// Region `region`'s replica `peer_id`, at `apply_state`, on `kv`.
pub(crate) struct ApplyContext<'a> {
    pub kv: &'a KvEngine,
    pub mvcc: &'a MvccStore,
    pub peer_id: u64,
    pub region: &'a metapb::Region,
    pub apply_state: &'a RaftApplyState,
    /// The region's transaction locks before the run.
    pub locks: &'a [TxnLockRecord],
    /// The region's merge state before the run (frozen as a source).
    pub merging: Option<&'a MergeState>,
    /// The revisions of this node's replica of source region `source.id`
    /// once it has applied its log up to the prepare at (`index`, `term`);
    /// `None` while it has not (it is nudged to catch up); `Err` only when
    /// the node is stopping. Never blocks.
    pub source_state: &'a SourceStateFn<'a>,
    /// Collect the writes applied into the outcome (someone follows the
    /// replica's change feed).
    pub observe: bool,
}

/// Stages the committed `entries` into one write batch (ending with the new
/// apply state) and returns it with the outcome; see the module docs.
/// `raft_apply_conf_change` is `RawNode::apply_conf_change`. Nothing is
/// written. `entries` must not be empty.
pub(crate) fn apply_entries(
    ctx: ApplyContext<'_>,
    entries: &[Entry],
    mut raft_apply_conf_change: impl FnMut(&ConfChangeV2) -> raft::Result<ConfState>,
) -> (WriteBatch, ApplyOutcome) {
    let mut run = Run {
        kv: ctx.kv,
        mvcc: ctx.mvcc,
        peer_id: ctx.peer_id,
        old_region: ctx.region,
        locks: ctx.locks.to_vec(),
        locks_changed: false,
        merging: ctx.merging.cloned(),
        merging_changed: false,
        merge_records: Vec::new(),
        leases: Vec::new(),
        lease_keys: Vec::new(),
        source_state: ctx.source_state,
        observe: ctx.observe,
        wb: WriteBatch::default(),
        outcome: ApplyOutcome {
            results: Vec::with_capacity(entries.len()),
            apply_state: *ctx.apply_state,
            region: None,
            conf_state: None,
            compaction: None,
            removed: false,
            splits: Vec::new(),
            locks: None,
            merge_state: None,
            merged_sources: Vec::new(),
            aborted: false,
            waiting_source: false,
            compute_hash: None,
            writes: Vec::new(),
            lease_changes: Vec::new(),
        },
    };
    for e in entries {
        let is_conf = e.get_entry_type() != EntryType::EntryNormal;
        let result = match e.get_entry_type() {
            EntryType::EntryNormal if e.data.is_empty() => Ok(()),
            EntryType::EntryNormal => run.apply_command(e),
            EntryType::EntryConfChange | EntryType::EntryConfChangeV2 if run.merging.is_some() => {
                Err(Error::Merging(ctx.region.id))
            }
            EntryType::EntryConfChange | EntryType::EntryConfChangeV2 => {
                let res = run.apply_conf_change(e, &mut raft_apply_conf_change);
                if let Err(err) = &res {
                    info!(
                        region_id = ctx.region.id,
                        index = e.index,
                        "membership change rejected: {err}"
                    );
                }
                res
            }
        };
        if run.outcome.aborted || run.outcome.waiting_source {
            break;
        }
        run.outcome.apply_state.applied_index = e.index;
        run.outcome.apply_state.applied_term = e.term;
        run.outcome.results.push(EntryResult {
            index: e.index,
            term: e.term,
            is_conf,
            result,
            revision: run.outcome.apply_state.applied_revision,
        });
        if run.outcome.removed {
            // The entries after this replica's removal are not its own.
            break;
        }
        if run.outcome.compute_hash.is_some() {
            // The state is hashed as of this entry: the rest is applied
            // in the next run, after the replica took its snapshot.
            break;
        }
    }
    let Run {
        kv,
        mut wb,
        mut outcome,
        locks,
        locks_changed,
        merging,
        merging_changed,
        ..
    } = run;
    if locks_changed {
        outcome.locks = Some(locks);
    }
    if merging_changed {
        outcome.merge_state = Some(merging);
    }
    kv.put_to(
        &mut wb,
        cf::META,
        &keys::apply_state_key(ctx.region.id),
        &outcome.apply_state.encode_to_vec(),
    );
    (wb, outcome)
}

/// The epoch check of a data command against `region`: only the epoch's
/// `version` (TiKV does the same), as a membership change (`conf_ver`) does
/// not change which keys the region owns, so a command built before one is
/// still valid. Used both when proposing and when applying.
pub(crate) fn check_epoch(region: &metapb::Region, cmd: &RaftCmdRequest) -> Result<()> {
    let current = region.region_epoch.unwrap_or_default();
    let given = cmd
        .header
        .as_ref()
        .and_then(|h| h.region_epoch)
        .unwrap_or_default();
    if given.version != current.version {
        return Err(Error::EpochNotMatch {
            region_id: region.id,
            current: region.clone(),
        });
    }
    Ok(())
}

/// The term check of a data command: a command built in term T (its
/// header's `term`, 0 = not bound) is valid only in term T. Used when
/// proposing (against the leader's term) and when applying (against the
/// entry's own term).
pub(crate) fn check_term(cmd: &RaftCmdRequest, term: u64) -> Result<()> {
    let built = cmd.header.as_ref().map_or(0, |h| h.term);
    if built != 0 && built != term {
        return Err(Error::StaleCommand(format!(
            "command built in term {built}, not {term}"
        )));
    }
    Ok(())
}

/// The commands a region frozen for a merge still applies: the rollback
/// of its merge, merge decisions it owns the key of (a commit into a
/// frozen region is refused and recorded so), and forgetting transaction
/// decisions.
pub(crate) fn allowed_while_merging(cmd: &RaftCmdRequest) -> bool {
    matches!(
        cmd.cmd,
        Some(Cmd::RollbackMerge(_) | Cmd::RejectMerge(_) | Cmd::CommitMerge(_) | Cmd::TxnForget(_))
    )
}

/// The state of one run of [`apply_entries`].
struct Run<'a> {
    kv: &'a KvEngine,
    mvcc: &'a MvccStore,
    peer_id: u64,
    /// The region meta before the run; `outcome.region` once changed.
    old_region: &'a metapb::Region,
    /// The region's transaction locks as of the entry being applied.
    locks: Vec<TxnLockRecord>,
    locks_changed: bool,
    /// The region's merge state as of the entry being applied.
    merging: Option<MergeState>,
    merging_changed: bool,
    /// Merge records staged by the run (key, record), newest last: later
    /// entries of the run must see them.
    merge_records: Vec<(Vec<u8>, MergeRecord)>,
    /// Lease records staged by the run (id, record; `None`: deleted),
    /// newest last.
    leases: Vec<(i64, Option<proto::raft_serverpb::LeaseRecord>)>,
    /// Whether a lease has keys attached, as the run's entries changed it
    /// (id, attached), newest last.
    lease_keys: Vec<(i64, bool)>,
    source_state: &'a SourceStateFn<'a>,
    observe: bool,
    wb: WriteBatch,
    outcome: ApplyOutcome,
}

impl Run<'_> {
    /// The region meta as of the entry being applied.
    fn region(&self) -> &metapb::Region {
        self.outcome.region.as_ref().unwrap_or(self.old_region)
    }

    fn apply_command(&mut self, e: &Entry) -> Result<()> {
        let cmd = RaftCmdRequest::decode(e.data.as_ref())?;
        check_epoch(self.region(), &cmd)?;
        check_term(&cmd, e.term)?;
        if self.merging.is_some() && !allowed_while_merging(&cmd) {
            return Err(Error::Merging(self.region().id));
        }
        let region = self.outcome.region.as_ref().unwrap_or(self.old_region);
        let state = &mut self.outcome.apply_state;
        match cmd.cmd {
            Some(Cmd::Write(w)) => {
                if let Some(m) = w
                    .mutations
                    .iter()
                    .find(|m| !split::contains(region, &m.key))
                {
                    return Err(Error::StaleCommand(format!(
                        "key {:?} is not in region {}",
                        String::from_utf8_lossy(&m.key),
                        region.id
                    )));
                }
                if let Some((txn_id, key)) =
                    txn::locked_key(&self.locks, w.mutations.iter().map(|m| m.key.as_slice()))
                {
                    return Err(Error::StaleCommand(format!(
                        "key {:?} is locked by transaction {txn_id}",
                        String::from_utf8_lossy(key)
                    )));
                }
                if w.revision <= state.applied_revision {
                    return Err(Error::StaleCommand(format!(
                        "revision {} is not above applied revision {}",
                        w.revision, state.applied_revision
                    )));
                }
                self.check_lease_changes(&w.mutations)?;
                self.mvcc
                    .stage_changes(&mut self.wb, w.revision, &w.mutations);
                self.outcome.apply_state.applied_revision = w.revision;
                self.stage_lease_changes(&w.mutations);
                if self.observe {
                    self.outcome.writes.push(AppliedWrite {
                        revision: w.revision,
                        mutations: key_changes(w.mutations),
                    });
                }
                Ok(())
            }
            Some(Cmd::Compact(_) | Cmd::Split(_)) if !self.locks.is_empty() => Err(
                Error::StaleCommand("the region has transactions in progress".into()),
            ),
            Some(Cmd::Compact(c)) => {
                if c.revision <= state.compact_revision {
                    return Err(Error::Mvcc(mvcc::Error::Compacted));
                }
                state.compact_revision = c.revision;
                state.pending_compact_revision = c.revision;
                self.outcome.compaction = Some(c.revision);
                Ok(())
            }
            Some(Cmd::Split(req)) => self.apply_split(&req),
            Some(Cmd::TxnLock(req)) => self.apply_txn(|t| t.lock(&req)),
            Some(Cmd::TxnCommit(req)) => {
                let region = self.region();
                let mine: Vec<Mutation> = req
                    .mutations
                    .iter()
                    .filter(|m| split::contains(region, &m.key))
                    .cloned()
                    .collect();
                // A commit without the lock (a repeat, one rolled back) is
                // refused as such by `commit`, whatever its leases.
                if self.locks.iter().any(|l| l.txn_id == req.txn_id) {
                    self.check_lease_changes(&mine)?;
                }
                self.apply_txn(|t| t.commit(&req))?;
                self.stage_lease_changes(&mine);
                if self.observe {
                    let mutations = key_changes(mine);
                    self.outcome.writes.push(AppliedWrite {
                        revision: req.revision,
                        mutations,
                    });
                }
                Ok(())
            }
            Some(Cmd::TxnRollback(req)) => self.apply_txn(|t| t.rollback(&req)),
            Some(Cmd::TxnForget(req)) => self.apply_txn(|t| t.forget(&req)),
            Some(Cmd::PrepareMerge(req)) => self.apply_prepare_merge(&req, e),
            Some(Cmd::CommitMerge(req)) => self.apply_commit_merge(&req),
            Some(Cmd::RejectMerge(req)) => self.apply_reject_merge(&req),
            Some(Cmd::RollbackMerge(req)) => {
                let region =
                    merge::rollback(self.region(), self.merging.as_ref(), req.prepare_index)?;
                self.merging = None;
                self.merging_changed = true;
                self.stage_region_state(&region, PeerState::Normal);
                info!(region_id = region.id, "merge rolled back");
                self.outcome.region = Some(region);
                Ok(())
            }
            Some(Cmd::Lease(req)) => self.apply_lease(req),
            Some(Cmd::ComputeHash(_)) => {
                self.outcome.compute_hash = Some(e.index);
                Ok(())
            }
            None => Err(Error::Corrupted("raft command without a body".into())),
        }
    }

    /// Applies a transaction command on a copy of the locks, kept only if
    /// it succeeded (a refused command stages nothing: `TxnApply` checks
    /// everything before staging).
    fn apply_txn(&mut self, f: impl FnOnce(TxnApply<'_>) -> Result<()>) -> Result<()> {
        let mut locks = self.locks.clone();
        let region = self.outcome.region.as_ref().unwrap_or(self.old_region);
        f(TxnApply {
            kv: self.kv,
            mvcc: self.mvcc,
            wb: &mut self.wb,
            region,
            applied_revision: self.outcome.apply_state.applied_revision,
            locks: &mut locks,
        })?;
        if locks != self.locks {
            self.locks = locks;
            self.locks_changed = true;
        }
        Ok(())
    }

    /// Stages a split (see the module docs and the `split` module).
    fn apply_split(&mut self, req: &SplitRequest) -> Result<()> {
        let (region, new_region) = split::derive(self.region(), req)?;
        self.stage_region_state(&region, PeerState::Normal);
        let existing = self
            .kv
            .get(cf::META, &keys::region_state_key(new_region.id))?
            .map(|raw| RegionLocalState::decode(raw.as_slice()))
            .transpose()?;
        if let Some(existing) = existing {
            info!(
                region_id = region.id,
                new_region_id = new_region.id,
                state = ?existing.state(),
                "split: this node already had a replica of the new region; kept"
            );
        } else {
            let parent = &self.outcome.apply_state;
            let apply_state = RaftApplyState {
                applied_index: INIT_INDEX,
                applied_term: INIT_TERM,
                truncated_index: INIT_INDEX,
                truncated_term: INIT_TERM,
                applied_revision: parent.applied_revision,
                compact_revision: parent.compact_revision,
                pending_compact_revision: parent.pending_compact_revision,
                installing_snapshot: false,
            };
            self.kv.put_to(
                &mut self.wb,
                cf::META,
                &keys::apply_state_key(new_region.id),
                &apply_state.encode_to_vec(),
            );
            self.stage_region_state(&new_region, PeerState::Normal);
            self.outcome.splits.push(new_region.clone());
        }
        info!(
            region_id = region.id,
            new_region_id = new_region.id,
            split_key = ?String::from_utf8_lossy(&req.split_key),
            version = region.region_epoch.unwrap_or_default().version,
            "applied split"
        );
        self.outcome.region = Some(region);
        Ok(())
    }

    fn stage_region_state(&mut self, region: &metapb::Region, state: PeerState) {
        let record = RegionLocalState {
            region: Some(region.clone()),
            state: state as i32,
            merge_state: if state == PeerState::Merging {
                self.merging.clone()
            } else {
                None
            },
        };
        self.kv.put_to(
            &mut self.wb,
            cf::META,
            &keys::region_state_key(region.id),
            &record.encode_to_vec(),
        );
    }

    /// Applies a committed membership change: raft's configuration (through
    /// `raft_apply`), then the region meta (peers, roles, `conf_ver`) staged
    /// as the region state. An error leaves everything unchanged.
    fn apply_conf_change(
        &mut self,
        e: &Entry,
        raft_apply: impl FnMut(&ConfChangeV2) -> raft::Result<ConfState>,
    ) -> Result<()> {
        let applied = membership::apply_conf_change(self.region(), self.peer_id, e, raft_apply)?;
        let region = applied.region;
        let state = if applied.removed {
            PeerState::Tombstone
        } else {
            PeerState::Normal
        };
        self.stage_region_state(&region, state);
        if applied.removed {
            // The replica deletes its data as it stops (see `peer`).
            self.kv
                .put_to(&mut self.wb, cf::META, &keys::cleanup_key(region.id), &[]);
        }
        info!(
            region_id = region.id,
            index = e.index,
            conf_ver = region.region_epoch.unwrap_or_default().conf_ver,
            peers = ?region.peers,
            "applied membership change"
        );
        self.outcome.region = Some(region);
        self.outcome.conf_state = Some(applied.conf_state);
        self.outcome.removed = applied.removed;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
