//! The consistency check of a region's replicas, in the manner of TiKV's
//! ComputeHash / VerifyHash.
//!
//! 1. Every `StoreOptions::consistency_check_interval` (0: never) a ready
//!    leader proposes `ComputeHash` (with the region's epoch).
//! 2. Every replica applying it ends its apply run at that entry (apply
//!    stops after it, the batch is written, later entries go in the next
//!    run), so its RocksDB then holds exactly the region's state as of the
//!    entry's index `I`. [`spawn`] takes a RocksDB snapshot on a new thread
//!    while the replica's thread waits for it (the next apply batch comes
//!    after), and hashes it there: the region's MVCC history in its key
//!    range (every version; of those at or below the compaction revision
//!    only what a compaction leaves, so physical clean-up progress does not
//!    matter) with its applied and compaction revisions. The answer comes
//!    back to the replica as `PeerMsg::HashComputed`.
//! 3. A ready leader whose hash of `I` is done proposes `VerifyHash { I,
//!    hash }` with the epoch it hashed under. Every replica applying it
//!    compares its own hash of `I` (now, or once computed); a difference is
//!    an [`Inconsistency`], logged and published through the store
//!    (`Store::inconsistencies`) for the node to raise etcd's CORRUPT alarm.
//!
//! No false positives: hashes are compared only for the same index `I`,
//! and apply is deterministic, so healthy replicas that applied the same
//! log prefix have equal states there. A replica that did not apply
//! `ComputeHash` at `I` itself (it got a snapshot past `I`, or restarted
//! after applying it and before hashing) has no hash of `I` and skips the
//! comparison; a `VerifyHash` proposed under an epoch version the region
//! no longer has (a split or merge in between) is refused by apply
//! (`EpochNotMatch`) on every replica alike. A replica keeps the state of
//! the latest `ComputeHash` only: an older `VerifyHash` is skipped.

use std::time::{Duration, Instant};

use engine::cf;
use mvcc::{MvccSnapshot, MvccStore};
use prost::Message as _;
use proto::metapb;
use proto::raft_serverpb::RaftApplyState;
use tracing::{error, warn};

use crate::keys;
use crate::{Error, Result};

/// How often region leaders start a check by default.
pub const DEFAULT_CONSISTENCY_CHECK_INTERVAL: Duration = Duration::from_secs(600);

/// A replica whose state at a `ComputeHash` index differs from the
/// leader's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inconsistency {
    pub region_id: u64,
    /// The node of the replica that found the difference (its own state
    /// differs from the leader's).
    pub node_id: u64,
    pub peer_id: u64,
    /// The `ComputeHash` entry's index.
    pub index: u64,
    pub hash: u32,
    pub leader_hash: u32,
}

/// What a replica knows of the latest `ComputeHash` it applied.
#[derive(Debug)]
struct Computing {
    index: u64,
    /// The region's epoch version when it was applied.
    version: u64,
    hash: Option<u32>,
    /// A `VerifyHash` for `index` applied before `hash` was computed.
    expected: Option<u32>,
    /// Reported already (a second `VerifyHash` of the same index, from a
    /// new leader, says nothing new).
    reported: bool,
}

/// What a comparison found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Nothing to compare yet, or nothing to compare with.
    None,
    /// The leader's hash and ours agree.
    Consistent,
    /// `(ours, the leader's)`, reported once per index.
    Mismatch(u32, u32),
}

/// A replica's side of the check (see the module docs).
#[derive(Debug)]
pub(crate) struct ConsistencyState {
    interval: Duration,
    last_check: Instant,
    computing: Option<Computing>,
}

impl ConsistencyState {
    pub(crate) fn new(interval: Duration) -> ConsistencyState {
        ConsistencyState {
            interval,
            last_check: Instant::now(),
            computing: None,
        }
    }

    /// Whether a leader should propose a check now; restarts the interval
    /// if so. `leading` is false on a replica that is not the ready leader,
    /// which restarts the interval too (a new leader waits a full one).
    pub(crate) fn due(&mut self, leading: bool) -> bool {
        if !leading || self.interval.is_zero() {
            self.last_check = Instant::now();
            return false;
        }
        if self.last_check.elapsed() < self.interval {
            return false;
        }
        self.last_check = Instant::now();
        true
    }

    /// `ComputeHash` applied at `index` under epoch `version`: its hash is
    /// being computed.
    pub(crate) fn start(&mut self, index: u64, version: u64) {
        self.computing = Some(Computing {
            index,
            version,
            hash: None,
            expected: None,
            reported: false,
        });
    }

    /// Forgets the check in progress (a snapshot replaced the state).
    pub(crate) fn reset(&mut self) {
        self.computing = None;
    }

    /// Our hash of `index` is done. Returns the epoch version to propose
    /// `VerifyHash` under (if `index` is still the latest check), and the
    /// verdict against a `VerifyHash` that came first.
    pub(crate) fn computed(&mut self, index: u64, hash: u32) -> (Option<u64>, Verdict) {
        let Some(c) = self.computing.as_mut().filter(|c| c.index == index) else {
            return (None, Verdict::None);
        };
        c.hash = Some(hash);
        let verdict = match c.expected {
            Some(leader) => compare(c, hash, leader),
            None => Verdict::None,
        };
        (Some(c.version), verdict)
    }

    /// `VerifyHash { index, hash: leader }` applied.
    pub(crate) fn verify(&mut self, index: u64, leader: u32) -> Verdict {
        let Some(c) = self.computing.as_mut().filter(|c| c.index == index) else {
            return Verdict::None;
        };
        match c.hash {
            Some(ours) => compare(c, ours, leader),
            None => {
                c.expected = Some(leader);
                Verdict::None
            }
        }
    }
}

fn compare(c: &mut Computing, ours: u32, leader: u32) -> Verdict {
    if ours == leader {
        return Verdict::Consistent;
    }
    if c.reported {
        return Verdict::None;
    }
    c.reported = true;
    Verdict::Mismatch(ours, leader)
}

/// The hash of `region`'s state as of `view`: its MVCC history in its key
/// range, every version (as a compaction at its compaction revision leaves
/// it), then its applied and compaction revisions. Also returns the
/// applied index `view` holds the region at.
pub(crate) fn hash_state(view: &MvccSnapshot<'_>, region: &metapb::Region) -> Result<(u32, u64)> {
    let raw = view
        .kv()
        .get(cf::META, &keys::apply_state_key(region.id))?
        .ok_or_else(|| Error::Corrupted(format!("region {} without apply state", region.id)))?;
    let state = RaftApplyState::decode(raw.as_slice())?;
    let data = view.range_hash(
        i64::MAX,
        state.compact_revision,
        &region.start_key,
        &region.end_key,
    )?;
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&data.crc.to_be_bytes());
    hasher.update(&data.len.to_be_bytes());
    hasher.update(&state.applied_revision.to_be_bytes());
    hasher.update(&state.compact_revision.to_be_bytes());
    Ok((hasher.finalize(), state.applied_index))
}

/// Hashes `region`'s state at applied index `index` (see the module docs)
/// on a new thread; `done` gets the hash there. Returns once that thread
/// has taken its RocksDB snapshot, so the caller may write again. A thread
/// that cannot start, or a state not at `index`, is logged and skipped.
pub(crate) fn spawn(
    mvcc: MvccStore,
    region: metapb::Region,
    index: u64,
    done: impl FnOnce(u32) + Send + 'static,
) {
    let region_id = region.id;
    let (taken_tx, taken_rx) = std::sync::mpsc::sync_channel::<()>(1);
    let started = std::thread::Builder::new()
        .name(format!("hash-{region_id}"))
        .spawn(move || {
            let view = mvcc.snapshot();
            let _ = taken_tx.send(());
            drop(taken_tx);
            match hash_state(&view, &region) {
                Ok((hash, at)) if at == index => done(hash),
                Ok((_, at)) => warn!(
                    region_id,
                    index, at, "consistency check skipped: state not at the check's index"
                ),
                Err(e) => error!(region_id, index, "consistency check: hashing failed: {e}"),
            }
        });
    match started {
        // Err: the thread ended before taking its snapshot (it panicked).
        Ok(_) => {
            let _ = taken_rx.recv();
        }
        Err(e) => error!(region_id, "cannot start the consistency hash thread: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verify_before_or_after_the_hash_compares_the_same_index_only() {
        let mut s = ConsistencyState::new(Duration::ZERO);
        // Nothing started: nothing to compare.
        assert_eq!(s.verify(5, 1), Verdict::None);
        s.start(5, 2);
        assert_eq!(s.computed(5, 7), (Some(2), Verdict::None));
        assert_eq!(s.verify(5, 7), Verdict::Consistent);
        assert_eq!(s.verify(4, 8), Verdict::None, "another index");
        s.start(9, 2);
        assert_eq!(s.verify(9, 3), Verdict::None);
        assert_eq!(s.computed(9, 4), (Some(2), Verdict::Mismatch(4, 3)));
        // Reported once.
        assert_eq!(s.verify(9, 3), Verdict::None);
        // A stale hash of an older check.
        assert_eq!(s.computed(5, 1), (None, Verdict::None));
        s.reset();
        assert_eq!(s.verify(9, 3), Verdict::None);
    }

    #[test]
    fn only_a_leader_with_a_nonzero_interval_is_due() {
        let mut off = ConsistencyState::new(Duration::ZERO);
        assert!(!off.due(true));
        let mut on = ConsistencyState::new(Duration::from_millis(1));
        std::thread::sleep(Duration::from_millis(5));
        assert!(!on.due(false));
        std::thread::sleep(Duration::from_millis(5));
        assert!(on.due(true));
        assert!(!on.due(true), "the interval restarted");
    }
}
