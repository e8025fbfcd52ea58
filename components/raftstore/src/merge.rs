//! Region merge: what the merge commands turn regions into.
//!
//! A source region S is merged into its right neighbour T (S's end key is
//! T's start key) when the replicas of both are on the same nodes. Like a
//! split, a merge is metadata only: every region of a node keeps its data
//! in the node's one RocksDB keyed by user key, so S's keys stay where they
//! are and change owner. The protocol (driven by S's leader, see the
//! router's `merge` module):
//!
//! 1. **Prepare** (S's log, [`prepare`]): S is frozen — from this entry on
//!    it applies no write, split, compaction, transaction lock or
//!    membership change; its epoch version and conf_ver go up by one, and
//!    its region state becomes `Merging` with the entry's index
//!    (`prepare_index`) and the target.
//! 2. Once every replica of S has the prepare entry in its log, S's leader
//!    asks the region owning S's end key (T, unless T has been merged away
//!    meanwhile) to **commit** the merge (T's log, [`commit`]). The commit
//!    is decided once, in the log of the region owning S's end key, and
//!    recorded there under that key ([`MergeRecord`]), so every later
//!    question gets the same answer from whichever region owns the key by
//!    then (a split hands the record to the side owning the key; a merge
//!    keeps it where it is). A commit applies only if S still ends where T
//!    starts, their replicas are on the same nodes (all voters), T is not
//!    frozen itself and nothing was decided for this merge before;
//!    otherwise it is recorded as refused.
//! 3. Applying the commit on a node first waits until this node's replica
//!    of S has applied the log up to `prepare_index` (it has the entries;
//!    it is told they are committed), so S's data here is complete. Then,
//!    in one batch: T takes S's range, its epoch version becomes one above
//!    both regions', its applied and compaction revisions the higher of
//!    both (S applies nothing after the prepare, so every write of S's
//!    range at or below S's applied revision is in), the decision is
//!    recorded, and S's region state becomes `Tombstone`. S's replica here
//!    then stops and drops its raft log; its data is T's now.
//! 4. A refused merge, or one whose outcome S's leader cannot learn in
//!    time, is settled by a **reject** in the log of the region owning S's
//!    end key ([`reject`]): it records a refusal unless a decision exists,
//!    and answers the recorded decision. Only on a refusal does S's leader
//!    **roll back** ([`rollback`]): S is unfrozen, its epoch version one
//!    higher. A committed merge is never rolled back, as the decision is
//!    one record, written once.
//!
//! Contract of the functions (an `Err` is the entry's answer and changes
//! nothing; all are deterministic, so every replica reaches the same
//! verdict):
//! * [`prepare`]: `StaleCommand` if the region is merging already, holds
//!   transaction locks, is in a joint configuration, or names itself or a
//!   region that does not start at its end as the target;
//! * [`commit`]: `Ok(Decided::Refused)` / `Ok(Decided::Committed(..))` as
//!   above; an existing record answers for itself (a committed one again
//!   as committed, with nothing to stage);
//! * [`reject`]: the decision to record (if none yet) and to answer;
//! * [`rollback`]: `StaleCommand` unless the region is merging with the
//!   same `prepare_index`.

use std::collections::BTreeSet;

use proto::metapb::{self, PeerRole};
use proto::raft_cmdpb::{CommitMergeRequest, PrepareMergeRequest};
use proto::raft_serverpb::{MergeRecord, MergeState};

use crate::{Error, Result};

/// Freezes `region` for a merge into `req.target`, prepared by the entry
/// at `index` of `term`: the region's new meta and its merge state (see
/// the module docs).
pub(crate) fn prepare(
    region: &metapb::Region,
    merging: Option<&MergeState>,
    has_locks: bool,
    (index, term): (u64, u64),
    req: &PrepareMergeRequest,
) -> Result<(metapb::Region, MergeState)> {
    let refuse = |why: String| Err(Error::StaleCommand(format!("merge refused: {why}")));
    let target = req.target.clone().unwrap_or_default();
    if merging.is_some() {
        return refuse(format!("region {} is merging already", region.id));
    }
    if has_locks {
        return refuse("the region has transactions in progress".into());
    }
    if is_joint(region) {
        return refuse(format!("region {} is changing membership", region.id));
    }
    if target.id == 0 || target.id == region.id {
        return refuse(format!("unusable target region {}", target.id));
    }
    if region.end_key.is_empty() || target.start_key != region.end_key {
        return refuse(format!(
            "region {} does not start where region {} ends",
            target.id, region.id
        ));
    }
    let mut frozen = region.clone();
    let mut epoch = frozen.region_epoch.unwrap_or_default();
    epoch.version += 1;
    epoch.conf_ver += 1;
    frozen.region_epoch = Some(epoch);
    Ok((
        frozen,
        MergeState {
            target: Some(target),
            prepare_index: index,
            prepare_term: term,
        },
    ))
}

/// What a commit (or reject) entry decided.
#[derive(Debug, PartialEq)]
pub(crate) enum Decided {
    /// The merge is refused, for good.
    Refused,
    /// Recorded before as committed: nothing to do.
    AlreadyCommitted,
    /// Commit now: the target's new meta.
    Committed(metapb::Region),
}

/// Decides a commit of `req` in `target` (see the module docs). `record`
/// is the decision recorded for the source, if any.
pub(crate) fn commit(
    target: &metapb::Region,
    target_merging: bool,
    record: Option<&MergeRecord>,
    req: &CommitMergeRequest,
) -> Decided {
    let source = req.source.clone().unwrap_or_default();
    if let Some(r) = record {
        return if r.committed && r.prepare_index == req.prepare_index {
            Decided::AlreadyCommitted
        } else {
            Decided::Refused
        };
    }
    if target_merging
        || source.id == target.id
        || source.end_key.is_empty()
        || source.end_key != target.start_key
        || !co_located(&source, target)
    {
        return Decided::Refused;
    }
    let (s, t) = (
        source.region_epoch.unwrap_or_default(),
        target.region_epoch.unwrap_or_default(),
    );
    let mut merged = target.clone();
    merged.start_key = source.start_key;
    merged.region_epoch = Some(metapb::RegionEpoch {
        conf_ver: t.conf_ver,
        version: s.version.max(t.version) + 1,
    });
    Decided::Committed(merged)
}

/// Whether a merge may be decided committed by a reject: only if it was
/// recorded so (see the module docs).
pub(crate) fn reject(record: Option<&MergeRecord>, prepare_index: u64) -> bool {
    record.is_some_and(|r| r.committed && r.prepare_index == prepare_index)
}

/// Unfreezes `region` after its merge prepared at `prepare_index` was
/// refused: its new meta.
pub(crate) fn rollback(
    region: &metapb::Region,
    merging: Option<&MergeState>,
    prepare_index: u64,
) -> Result<metapb::Region> {
    match merging {
        Some(m) if m.prepare_index == prepare_index => {
            let mut region = region.clone();
            let mut epoch = region.region_epoch.unwrap_or_default();
            epoch.version += 1;
            region.region_epoch = Some(epoch);
            Ok(region)
        }
        _ => Err(Error::StaleCommand(format!(
            "region {} is not merging at index {prepare_index}",
            region.id
        ))),
    }
}

/// Whether both regions have their replicas on the same nodes, all voters.
pub(crate) fn co_located(a: &metapb::Region, b: &metapb::Region) -> bool {
    let nodes = |r: &metapb::Region| -> Option<BTreeSet<u64>> {
        r.peers
            .iter()
            .map(|p| (p.role() == PeerRole::Voter).then_some(p.node_id))
            .collect()
    };
    match (nodes(a), nodes(b)) {
        (Some(x), Some(y)) => !x.is_empty() && x == y,
        _ => false,
    }
}

fn is_joint(region: &metapb::Region) -> bool {
    region
        .peers
        .iter()
        .any(|p| matches!(p.role(), PeerRole::IncomingVoter | PeerRole::DemotingVoter))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(id: u64, start: &[u8], end: &[u8], nodes: &[u64]) -> metapb::Region {
        metapb::Region {
            id,
            start_key: start.to_vec(),
            end_key: end.to_vec(),
            region_epoch: Some(metapb::RegionEpoch {
                conf_ver: 2,
                version: id,
            }),
            peers: nodes
                .iter()
                .map(|n| metapb::Peer {
                    id: id * 10 + n,
                    node_id: *n,
                    role: 0,
                })
                .collect(),
        }
    }

    fn prep(target: &metapb::Region) -> PrepareMergeRequest {
        PrepareMergeRequest {
            target: Some(target.clone()),
        }
    }

    #[test]
    fn prepare_freezes_and_checks() {
        let s = region(3, b"a", b"m", &[1, 2, 3]);
        let t = region(5, b"m", b"", &[1, 2, 3]);
        let (frozen, state) = prepare(&s, None, false, (42, 7), &prep(&t)).unwrap();
        let e = frozen.region_epoch.unwrap();
        assert_eq!((e.conf_ver, e.version), (3, 4));
        assert_eq!(
            (frozen.start_key.clone(), frozen.end_key.clone()),
            (b"a".to_vec(), b"m".to_vec())
        );
        assert_eq!(state.prepare_index, 42);
        assert_eq!(state.target.as_ref().map(|t| t.id), Some(5));

        assert!(prepare(&s, Some(&state), false, (43, 7), &prep(&t)).is_err());
        assert!(prepare(&s, None, true, (43, 7), &prep(&t)).is_err());
        assert!(prepare(&s, None, false, (43, 7), &prep(&s)).is_err());
        let not_adjacent = region(5, b"n", b"", &[1, 2, 3]);
        assert!(prepare(&s, None, false, (43, 7), &prep(&not_adjacent)).is_err());
        let last = region(3, b"a", b"", &[1, 2, 3]);
        assert!(prepare(&last, None, false, (43, 7), &prep(&t)).is_err());
        let mut joint = s.clone();
        joint.peers[0].set_role(PeerRole::DemotingVoter);
        assert!(prepare(&joint, None, false, (43, 7), &prep(&t)).is_err());
    }

    #[test]
    fn commit_takes_the_range_once() {
        let (s, _) = prepare(
            &region(3, b"a", b"m", &[1, 2, 3]),
            None,
            false,
            (42, 7),
            &prep(&region(5, b"m", b"", &[1, 2, 3])),
        )
        .unwrap();
        let t = region(5, b"m", b"", &[3, 2, 1]);
        let req = CommitMergeRequest {
            source: Some(s.clone()),
            prepare_index: 42,
            prepare_term: 7,
        };
        let Decided::Committed(merged) = commit(&t, false, None, &req) else {
            panic!("not committed");
        };
        assert_eq!(merged.id, 5);
        assert_eq!(merged.start_key, b"a".to_vec());
        assert!(merged.end_key.is_empty());
        let e = merged.region_epoch.unwrap();
        assert_eq!((e.conf_ver, e.version), (2, 6));
        assert_eq!(merged.peers, t.peers);

        let committed = MergeRecord {
            source_id: 3,
            prepare_index: 42,
            committed: true,
            target_id: 5,
        };
        assert_eq!(
            commit(&merged, false, Some(&committed), &req),
            Decided::AlreadyCommitted
        );
        let refused = MergeRecord {
            committed: false,
            ..committed
        };
        assert_eq!(commit(&t, false, Some(&refused), &req), Decided::Refused);
        // Frozen target, not adjacent, not co-located.
        assert_eq!(commit(&t, true, None, &req), Decided::Refused);
        let far = region(5, b"n", b"", &[1, 2, 3]);
        assert_eq!(commit(&far, false, None, &req), Decided::Refused);
        let elsewhere = region(5, b"m", b"", &[1, 2, 4]);
        assert_eq!(commit(&elsewhere, false, None, &req), Decided::Refused);
        let mut learner = t.clone();
        learner.peers[0].set_role(PeerRole::Learner);
        assert_eq!(commit(&learner, false, None, &req), Decided::Refused);
    }

    #[test]
    fn reject_and_rollback() {
        let committed = MergeRecord {
            source_id: 3,
            prepare_index: 42,
            committed: true,
            target_id: 5,
        };
        assert!(reject(Some(&committed), 42));
        assert!(!reject(Some(&committed), 41));
        assert!(!reject(None, 42));

        let s = region(3, b"a", b"m", &[1, 2, 3]);
        let state = MergeState {
            target: None,
            prepare_index: 42,
            prepare_term: 7,
        };
        let back = rollback(&s, Some(&state), 42).unwrap();
        assert_eq!(back.region_epoch.unwrap().version, 4);
        assert!(rollback(&s, Some(&state), 41).is_err());
        assert!(rollback(&s, None, 42).is_err());
    }
}
