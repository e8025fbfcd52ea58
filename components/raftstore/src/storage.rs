//! raft-rs `Storage` over the node's shared raft-engine log.
//!
//! Log layout of a region: entries `(truncated_index, last_index]` live in
//! raft-engine; the term of `truncated_index` is kept in the apply state so
//! raft can still match the entry just before the first one. A region
//! created by bootstrap starts "truncated" at [`INIT_INDEX`] with everything
//! up to it applied, which lets every replica start from the same point.
//! Installing a region snapshot moves the truncation point to the
//! snapshot's index, with the log after it empty. A replica created on
//! demand (see `Store::on_raft_message`) starts with everything empty:
//! truncated at 0 with no conf state, so the leader must send a snapshot.
//!
//! The replica's poller persists what raft hands it through `stage_ready`
//! (one raft-engine write per poller round) and `record_commit`, which
//! keep the in-memory hard state raft-rs reads in step with raft-engine
//! (the commit index may be written late).

use engine::{RaftLogBatch, RaftLogEngine};
use proto::metapb;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, StorageError};

use crate::snapshot::Generator;

/// Index and term a bootstrapped region's log starts at.
pub const INIT_INDEX: u64 = 5;
pub const INIT_TERM: u64 = 5;

pub struct PeerStorage {
    region_id: u64,
    log: RaftLogEngine,
    /// Builds region snapshots from the state machine, off this thread.
    snapshots: Generator,
    hard_state: HardState,
    /// `hard_state` holds a commit index not written yet (see
    /// [`PeerStorage::record_commit`]).
    commit_unwritten: bool,
    conf_state: ConfState,
    truncated_index: u64,
    truncated_term: u64,
}

impl PeerStorage {
    /// `snapshots` generates this region's snapshots.
    pub(crate) fn new(
        region: metapb::Region,
        log: RaftLogEngine,
        snapshots: Generator,
        hard_state: HardState,
        conf_state: ConfState,
        truncated_index: u64,
        truncated_term: u64,
    ) -> PeerStorage {
        PeerStorage {
            region_id: region.id,
            log,
            snapshots,
            hard_state,
            commit_unwritten: false,
            conf_state,
            truncated_index,
            truncated_term,
        }
    }

    pub fn set_hard_state(&mut self, hs: HardState) {
        self.hard_state = hs;
    }

    pub fn set_conf_state(&mut self, cs: ConfState) {
        self.conf_state = cs;
    }

    pub fn set_truncated(&mut self, index: u64, term: u64) {
        self.truncated_index = index;
        self.truncated_term = term;
    }

    /// Stages a `Ready`'s new entries and hard state (if any) into
    /// `batch`, the raft-engine write of the replica's poller round (synced
    /// when raft asks: they must be durable before messages that depend on
    /// them go out). A commit index recorded by
    /// [`PeerStorage::record_commit`] since the last write goes with the
    /// entries.
    pub(crate) fn stage_ready(
        &mut self,
        batch: &mut RaftLogBatch,
        entries: &[Entry],
        hs: Option<&HardState>,
    ) -> engine::Result<()> {
        batch.append(self.region_id, entries)?;
        if let Some(hs) = hs {
            self.hard_state = hs.clone();
        }
        if hs.is_some() || (self.commit_unwritten && !entries.is_empty()) {
            batch.put_hard_state(self.region_id, &self.hard_state)?;
            self.commit_unwritten = false;
        }
        Ok(())
    }

    /// Takes a hard state whose only news is the commit index: it is
    /// written with the next entries, not on its own (a write of its own
    /// per commit was a raft-engine write, queued behind other regions'
    /// fsyncs, in every `Ready` of every region). A commit index lost in a
    /// crash is recoverable from the quorum, and a restart raises it to
    /// the applied index (`Store::reconcile_log`), so raft never finds
    /// applied entries above its commit index.
    pub(crate) fn record_commit(&mut self, hs: HardState) {
        self.hard_state = hs;
        self.commit_unwritten = true;
    }

    pub fn hard_state(&self) -> &HardState {
        &self.hard_state
    }

    pub fn region_id(&self) -> u64 {
        self.region_id
    }

    pub fn truncated_index(&self) -> u64 {
        self.truncated_index
    }

    fn last(&self) -> u64 {
        self.log
            .last_index(self.region_id)
            .map_or(self.truncated_index, |i| i.max(self.truncated_index))
    }

    fn storage_error(e: engine::Error) -> raft::Error {
        raft::Error::Store(StorageError::Other(Box::new(e)))
    }
}

impl raft::Storage for PeerStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(
            self.hard_state.clone(),
            self.conf_state.clone(),
        ))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low <= self.truncated_index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last() + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let max = max_size.into().map(|m| m as usize);
        let entries = self
            .log
            .entries(self.region_id, low, high, max)
            .map_err(Self::storage_error)?;
        if entries.is_empty() && low < high {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        Ok(entries)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        if idx == self.truncated_index {
            return Ok(self.truncated_term);
        }
        if idx < self.truncated_index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        match self
            .log
            .entry(self.region_id, idx)
            .map_err(Self::storage_error)?
        {
            Some(e) => Ok(e.term),
            None => Err(raft::Error::Store(StorageError::Unavailable)),
        }
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.truncated_index + 1)
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last())
    }

    /// A snapshot generated off this thread (see `snapshot::Generator`):
    /// `SnapshotTemporarilyUnavailable` until one at `request_index` or
    /// above is ready, at the log's truncation point or above (so the
    /// follower can go on from the log after installing it), whose
    /// configuration includes `to`.
    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        self.snapshots
            .snapshot(request_index.max(self.truncated_index), to)
    }
}
