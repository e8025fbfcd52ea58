//! Raft log GC: dropping the applied prefix of a replica's raft-engine log.
//!
//! Contract:
//! * Nothing happens until at least `threshold` entries past the current
//!   truncation point are applied ([`compact_index`]). Then the log is cut
//!   at the applied index, except on a leader, which keeps what the
//!   followers close behind still need: a peer (voter or learner) whose
//!   matched index is within `threshold` of the applied index holds the
//!   cut back to its matched index; one further behind (stopped,
//!   partitioned) does not pin the log and gets a region snapshot instead.
//!   A cut that would not move the truncation point does nothing.
//! * Order of writes ([`gc_raft_log`]): the new truncation point (index and
//!   its term) goes into the apply state in RocksDB and RocksDB's WAL is
//!   synced, and only then is the prefix dropped from raft-engine and
//!   raft-rs's storage told. A crash in between leaves the old prefix,
//!   which start-up trims to the persisted truncation point. The apply
//!   state must be durable first because a restart replays from the
//!   applied index, which must never be below the first log entry.
//! * A failure to read the term or to write is returned; the caller (the
//!   replica loop) treats it as a storage failure.

use engine::{cf, KvEngine, RaftLogEngine, WriteBatch};
use prost::Message as _;
use proto::raft_serverpb::RaftApplyState;
use raft::{RawNode, StateRole};

use crate::keys;
use crate::storage::PeerStorage;
use crate::Result;

/// The index to truncate the log at, if any: `applied` and `truncated` are
/// the replica's applied index and current truncation point;
/// `leader_matched` is, on a leader only, the matched index of every peer
/// in the progress set (itself included).
pub(crate) fn compact_index(
    applied: u64,
    truncated: u64,
    threshold: u64,
    leader_matched: Option<impl IntoIterator<Item = u64>>,
) -> Option<u64> {
    if applied < truncated + threshold {
        return None;
    }
    let mut compact_to = applied;
    if let Some(matched) = leader_matched {
        // Keep what followers close behind still need; one further
        // behind (stopped, partitioned) gets a snapshot instead of
        // pinning the log. The progress set includes learners, so a
        // learner catching up is treated like any follower.
        for m in matched {
            if m + threshold >= applied {
                compact_to = compact_to.min(m);
            }
        }
    }
    (compact_to > truncated).then_some(compact_to)
}

/// Drops applied raft log entries of region `region_id` once enough have
/// piled up (see the module docs), updating `apply_state`'s truncation
/// point and raft-rs's storage.
pub(crate) fn gc_raft_log(
    raw: &mut RawNode<PeerStorage>,
    kv: &KvEngine,
    log: &RaftLogEngine,
    region_id: u64,
    apply_state: &mut RaftApplyState,
    threshold: u64,
) -> Result<()> {
    let leader_matched = (raw.raft.state == StateRole::Leader)
        .then(|| raw.raft.prs().iter().map(|(_, pr)| pr.matched));
    let Some(compact_to) = compact_index(
        apply_state.applied_index,
        raw.store().truncated_index(),
        threshold,
        leader_matched,
    ) else {
        return Ok(());
    };
    let term = raft::Storage::term(raw.store(), compact_to)?;
    apply_state.truncated_index = compact_to;
    apply_state.truncated_term = term;
    let mut wb = WriteBatch::default();
    kv.put_to(
        &mut wb,
        cf::META,
        &keys::apply_state_key(region_id),
        &apply_state.encode_to_vec(),
    );
    kv.write(wb)?;
    kv.sync_wal()?;
    log.compact_to(region_id, compact_to + 1)?;
    raw.mut_store().set_truncated(compact_to, term);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const NONE: Option<[u64; 0]> = None;

    #[test]
    fn waits_for_threshold_entries() {
        assert_eq!(compact_index(104, 5, 100, NONE), None);
        assert_eq!(compact_index(105, 5, 100, NONE), Some(105));
        assert_eq!(compact_index(500, 5, 100, NONE), Some(500));
    }

    #[test]
    fn leader_keeps_entries_for_close_followers() {
        // Leader itself at 500, one follower 50 behind: cut at the follower.
        assert_eq!(compact_index(500, 5, 100, Some([500, 450])), Some(450));
        // A follower further behind than the threshold does not pin the log.
        assert_eq!(compact_index(500, 5, 100, Some([500, 399])), Some(500));
        // Exactly at the threshold still counts as close.
        assert_eq!(compact_index(500, 5, 100, Some([500, 400, 10])), Some(400));
    }

    #[test]
    fn never_moves_the_truncation_point_back() {
        // The closest follower is at the truncation point: nothing to drop.
        assert_eq!(compact_index(300, 200, 100, Some([300, 200])), None);
        assert_eq!(compact_index(300, 200, 100, Some([300, 201])), Some(201));
    }
}
