use std::cell::Cell;

use proto::raft_cmdpb::{mutation::Op, CompactRequest, Mutation, RaftRequestHeader, WriteRequest};
use raft::eraftpb::ConfChangeType;

use super::*;

struct Env {
    _dir: tempfile::TempDir,
    kv: KvEngine,
    mvcc: MvccStore,
}

fn env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let kv = KvEngine::open(dir.path()).unwrap();
    Env {
        mvcc: MvccStore::new(kv.clone()),
        kv,
        _dir: dir,
    }
}

fn peer(id: u64, role: metapb::PeerRole) -> metapb::Peer {
    let mut p = metapb::Peer {
        id,
        node_id: id,
        role: 0,
    };
    p.set_role(role);
    p
}

fn region() -> metapb::Region {
    metapb::Region {
        id: 9,
        region_epoch: Some(metapb::RegionEpoch {
            conf_ver: 1,
            version: 1,
        }),
        peers: vec![
            peer(1, metapb::PeerRole::Voter),
            peer(2, metapb::PeerRole::Voter),
        ],
        ..Default::default()
    }
}

fn entry(index: u64, data: Vec<u8>) -> Entry {
    Entry {
        index,
        term: 2,
        data: data.into(),
        ..Default::default()
    }
}

fn cmd(index: u64, conf_ver: u64, version: u64, cmd: Option<Cmd>) -> Entry {
    cmd_in_term(index, conf_ver, version, 0, cmd)
}

/// A command built in `term` (0 = not bound), in an entry of term 2.
fn cmd_in_term(index: u64, conf_ver: u64, version: u64, term: u64, cmd: Option<Cmd>) -> Entry {
    let req = RaftCmdRequest {
        header: Some(RaftRequestHeader {
            region_id: 9,
            region_epoch: Some(metapb::RegionEpoch { conf_ver, version }),
            term,
        }),
        cmd,
    };
    entry(index, req.encode_to_vec())
}

fn put(revision: i64) -> Option<Cmd> {
    Some(Cmd::Write(WriteRequest {
        revision,
        mutations: vec![Mutation {
            op: Op::Put as i32,
            key: b"k".to_vec(),
            value: format!("v{revision}").into_bytes(),
            ..Default::default()
        }],
    }))
}

fn compact(revision: i64) -> Option<Cmd> {
    Some(Cmd::Compact(CompactRequest { revision }))
}

fn conf_entry(
    index: u64,
    region: &metapb::Region,
    changes: &[(ConfChangeType, metapb::Peer)],
) -> Entry {
    let cc = membership::conf_change_proposal(region, changes);
    let mut e = entry(index, protobuf::Message::write_to_bytes(&cc).unwrap());
    e.set_entry_type(EntryType::EntryConfChangeV2);
    e
}

fn apply_state() -> RaftApplyState {
    RaftApplyState {
        applied_index: 5,
        applied_term: 1,
        truncated_index: 5,
        truncated_term: 1,
        applied_revision: 2,
        compact_revision: 1,
        pending_compact_revision: 0,
        installing_snapshot: false,
    }
}

fn run(
    env: &Env,
    region: &metapb::Region,
    entries: &[Entry],
    raft: impl FnMut(&ConfChangeV2) -> raft::Result<ConfState>,
) -> ApplyOutcome {
    let state = apply_state();
    let ctx = ApplyContext {
        kv: &env.kv,
        mvcc: &env.mvcc,
        peer_id: 1,
        region,
        apply_state: &state,
        locks: &[],
        merging: None,
        source_state: &|_, _, _| panic!("no merge in this test"),
        observe: true,
    };
    let (wb, outcome) = apply_entries(ctx, entries, raft);
    env.kv.write(wb).unwrap();
    outcome
}

fn no_conf_change(_: &ConfChangeV2) -> raft::Result<ConfState> {
    panic!("raft's configuration must not change")
}

fn region_state(env: &Env) -> RegionLocalState {
    let raw = env
        .kv
        .get(cf::META, &keys::region_state_key(9))
        .unwrap()
        .unwrap();
    RegionLocalState::decode(raw.as_slice()).unwrap()
}

fn txn_lock(txn_id: u64, key: &[u8]) -> Option<Cmd> {
    Some(Cmd::TxnLock(proto::raft_cmdpb::TxnLockRequest {
        txn_id,
        primary_key: key.to_vec(),
        spans: vec![proto::raft_cmdpb::KeySpan {
            start: key.to_vec(),
            end: Vec::new(),
            single: true,
        }],
    }))
}

fn txn_commit(txn_id: u64, revision: i64, key: &[u8], primary: bool) -> Option<Cmd> {
    Some(Cmd::TxnCommit(proto::raft_cmdpb::TxnCommitRequest {
        txn_id,
        revision,
        mutations: vec![Mutation {
            op: Op::Put as i32,
            key: key.to_vec(),
            value: b"txn".to_vec(),
            ..Default::default()
        }],
        primary,
        primary_key: key.to_vec(),
        lock_spans: Vec::new(),
    }))
}

/// A lock keeps other writes of its keys out (and compaction and
/// split out of the region); its commit writes at its revision — below
/// the applied revision — without moving the applied revision, records
/// the decision on the primary, and a second commit or a rollback
/// after it is refused.
#[test]
fn transaction_commands() {
    let env = env();
    let split = Some(Cmd::Split(SplitRequest {
        split_key: b"m".to_vec(),
        new_region_id: 20,
        new_peer_ids: vec![21, 22],
    }));
    let rollback = |txn_id| {
        Some(Cmd::TxnRollback(proto::raft_cmdpb::TxnRollbackRequest {
            txn_id,
        }))
    };
    let entries = [
        cmd(6, 1, 1, txn_lock(7, b"k")),
        cmd(7, 1, 1, txn_lock(8, b"k")),
        cmd(8, 1, 1, put(3)),
        cmd(9, 1, 1, compact(2)),
        cmd(10, 1, 1, split),
        cmd(11, 1, 1, txn_commit(7, 2, b"k", true)),
        cmd(12, 1, 1, txn_commit(7, 5, b"k", true)),
        cmd(13, 1, 1, rollback(7)),
        cmd(14, 1, 1, txn_commit(7, 5, b"k", true)),
        cmd(15, 1, 1, put(6)),
    ];
    let out = run(&env, &region(), &entries, no_conf_change);
    let results: Vec<_> = out.results.iter().map(|r| &r.result).collect();
    assert!(results[0].is_ok());
    // Another transaction, a write, a compaction, a split: refused.
    for r in &results[1..5] {
        assert!(matches!(r, Err(Error::StaleCommand(_))), "{r:?}");
    }
    // A revision not above the lock's base (the applied revision 2).
    assert!(matches!(results[5], Err(Error::StaleCommand(_))));
    assert!(results[6].is_ok());
    // The lock is gone: no rollback, no second commit.
    assert!(matches!(results[7], Err(Error::StaleCommand(_))));
    assert!(matches!(results[8], Err(Error::StaleCommand(_))));
    assert!(results[9].is_ok());
    assert_eq!(out.locks, Some(Vec::new()));
    // The commit did not move the applied revision; the write after it
    // did.
    assert_eq!(out.results[6].revision, 2);
    assert_eq!(out.apply_state.applied_revision, 6);
    let view = env.mvcc.snapshot();
    assert_eq!(view.get(b"k", 5).unwrap().unwrap().value, b"txn");
    assert_eq!(view.get(b"k", 6).unwrap().unwrap().value, b"v6");
    let record = crate::txn::read_record(view.kv(), b"k", 7)
        .unwrap()
        .unwrap();
    assert_eq!(record.revision, 5);
    // The change feed gets the writes that applied, in entry order: the
    // commit at its revision, the put after it.
    let writes: Vec<(i64, Vec<u8>)> = out
        .writes
        .iter()
        .flat_map(|w| w.mutations.iter().map(|m| (w.revision, m.value.clone())))
        .collect();
    assert_eq!(writes, vec![(5, b"txn".to_vec()), (6, b"v6".to_vec())]);
}

#[test]
fn data_commands() {
    let env = env();
    let entries = [
        entry(6, Vec::new()),
        cmd(7, 1, 1, put(3)),
        cmd(8, 1, 1, put(3)),
        cmd(9, 1, 2, put(4)),
        cmd(10, 7, 1, put(4)),
        cmd(11, 1, 1, compact(2)),
        cmd(12, 1, 1, compact(2)),
        cmd(13, 1, 1, None),
        entry(14, vec![0xFF, 0xFF]),
    ];
    let out = run(&env, &region(), &entries, no_conf_change);
    let results: Vec<_> = out.results.iter().map(|r| (r.index, &r.result)).collect();
    assert!(matches!(results[0], (6, Ok(()))));
    assert!(matches!(results[1], (7, Ok(()))));
    assert!(matches!(results[2], (8, Err(Error::StaleCommand(_)))));
    assert!(matches!(results[3], (9, Err(Error::EpochNotMatch { .. }))));
    // Only the epoch's version counts for data commands.
    assert!(matches!(results[4], (10, Ok(()))));
    assert!(matches!(results[5], (11, Ok(()))));
    assert!(matches!(
        results[6],
        (12, Err(Error::Mvcc(mvcc::Error::Compacted)))
    ));
    assert!(matches!(results[7], (13, Err(Error::Corrupted(_)))));
    assert!(matches!(results[8], (14, Err(Error::Corrupted(_)))));
    assert!(out.results.iter().all(|r| !r.is_conf && r.term == 2));

    let expected = RaftApplyState {
        applied_index: 14,
        applied_term: 2,
        applied_revision: 4,
        compact_revision: 2,
        pending_compact_revision: 2,
        ..apply_state()
    };
    assert_eq!(out.apply_state, expected);
    assert_eq!(out.compaction, Some(2));
    assert!(out.region.is_none() && out.conf_state.is_none() && !out.removed);
    // The batch carried the data and the apply state.
    let raw = env
        .kv
        .get(cf::META, &keys::apply_state_key(9))
        .unwrap()
        .unwrap();
    assert_eq!(RaftApplyState::decode(raw.as_slice()).unwrap(), expected);
    let kv = env.mvcc.snapshot().get(b"k", i64::MAX).unwrap().unwrap();
    assert_eq!((kv.mod_revision, kv.value), (4, b"v4".to_vec()));
    assert_eq!(out.results[3].revision, 3, "revision after a refused entry");
    assert_eq!(out.results[4].revision, 4, "a write's own revision");
}

/// A `ComputeHash` ends the run after itself (the replica hashes the
/// state as of it).
#[test]
fn compute_hash_ends_the_run() {
    let env = env();
    let compute = Some(Cmd::ComputeHash(Default::default()));
    let entries = [
        cmd(6, 1, 1, put(3)),
        cmd(7, 1, 1, compute.clone()),
        cmd(8, 1, 1, put(4)),
    ];
    let out = run(&env, &region(), &entries, no_conf_change);
    assert_eq!(out.compute_hash, Some(7));
    assert_eq!(out.results.len(), 2);
    assert_eq!(out.apply_state.applied_index, 7);
    assert_eq!(out.apply_state.applied_revision, 3);
}

/// Mutations computed by a leader of another term never apply: a
/// command built in term 1 sitting in an entry of term 2 is refused,
/// on every replica alike.
#[test]
fn commands_apply_only_in_the_term_they_were_built_in() {
    let env = env();
    let entries = [
        cmd_in_term(6, 1, 1, 1, put(3)),
        cmd_in_term(7, 1, 1, 2, put(4)),
        cmd_in_term(8, 1, 1, 3, put(5)),
    ];
    let out = run(&env, &region(), &entries, no_conf_change);
    assert!(matches!(out.results[0].result, Err(Error::StaleCommand(_))));
    assert!(out.results[1].result.is_ok());
    assert!(matches!(out.results[2].result, Err(Error::StaleCommand(_))));
    assert_eq!(out.apply_state.applied_revision, 4);
}

#[test]
fn membership_change_applies_in_entry_order() {
    let env = env();
    let old = region();
    let learner = peer(3, metapb::PeerRole::Learner);
    let calls = Cell::new(0);
    let entries = [
        conf_entry(6, &old, &[(ConfChangeType::AddLearnerNode, learner)]),
        cmd(7, 1, 1, put(3)),
        // Proposed against the epoch before the first change.
        conf_entry(8, &old, &[(ConfChangeType::AddNode, learner)]),
    ];
    let out = run(&env, &old, &entries, |_| {
        calls.set(calls.get() + 1);
        Ok(ConfState {
            voters: vec![1, 2],
            learners: vec![3],
            ..Default::default()
        })
    });
    assert_eq!(calls.get(), 1);
    assert!(out.results[0].is_conf && out.results[0].result.is_ok());
    assert!(out.results[1].result.is_ok());
    assert!(matches!(
        out.results[2].result,
        Err(Error::EpochNotMatch { .. })
    ));
    let new = out.region.unwrap();
    assert_eq!(new.region_epoch.unwrap().conf_ver, 2);
    assert_eq!(new.peers.last(), Some(&learner));
    assert_eq!(out.conf_state.unwrap().learners, vec![3]);
    assert!(!out.removed);
    assert_eq!(out.apply_state.applied_index, 8);
    let state = region_state(&env);
    assert_eq!(state.state(), PeerState::Normal);
    assert_eq!(state.region, Some(new));
}

#[test]
fn rejected_membership_change_changes_nothing() {
    let env = env();
    let old = region();
    let mut e = conf_entry(
        6,
        &old,
        &[(
            ConfChangeType::AddLearnerNode,
            peer(3, metapb::PeerRole::Learner),
        )],
    );
    // A context naming another peer than the change.
    let mut cc: ConfChangeV2 = protobuf::Message::parse_from_bytes(&e.data).unwrap();
    cc.mut_changes()[0].node_id = 4;
    e.data = protobuf::Message::write_to_bytes(&cc).unwrap().into();
    let refused = conf_entry(
        7,
        &old,
        &[(ConfChangeType::RemoveNode, peer(2, metapb::PeerRole::Voter))],
    );
    let out = run(&env, &old, &[e, refused], |_| {
        Err(raft::Error::ConfChangeError("refused".into()))
    });
    assert!(matches!(out.results[0].result, Err(Error::Corrupted(_))));
    assert!(matches!(out.results[1].result, Err(Error::Raft(_))));
    assert!(out.region.is_none() && out.conf_state.is_none() && !out.removed);
    assert_eq!(out.apply_state.applied_index, 7);
    assert!(env
        .kv
        .get(cf::META, &keys::region_state_key(9))
        .unwrap()
        .is_none());
}

#[test]
fn removal_stops_the_run_and_tombstones() {
    let env = env();
    let old = region();
    let entries = [
        conf_entry(
            6,
            &old,
            &[(ConfChangeType::RemoveNode, peer(1, metapb::PeerRole::Voter))],
        ),
        cmd(7, 1, 1, put(3)),
    ];
    let out = run(&env, &old, &entries, |_| {
        Ok(ConfState {
            voters: vec![2],
            ..Default::default()
        })
    });
    assert!(out.removed);
    assert_eq!(out.results.len(), 1);
    assert_eq!(out.apply_state.applied_index, 6);
    assert_eq!(out.apply_state.applied_revision, 2);
    let state = region_state(&env);
    assert_eq!(state.state(), PeerState::Tombstone);
    assert_eq!(
        state.region.unwrap().peers,
        vec![peer(2, metapb::PeerRole::Voter)]
    );
}

fn lease_cmd(op: proto::raft_cmdpb::lease_request::Op) -> Option<Cmd> {
    Some(Cmd::Lease(proto::raft_cmdpb::LeaseRequest { op: Some(op) }))
}

/// Lease commands change records, not revisions; later entries of the run
/// see earlier ones; a grant of a held id, a revoke of an unknown one and
/// an id owned by another region are refused; a checkpoint skips unknown
/// ids.
#[test]
fn lease_records_change_through_raft_without_a_revision() {
    use proto::raft_cmdpb::lease_request::Op as L;
    use proto::raft_cmdpb::{LeaseCheckpoint, LeaseGrant, LeaseRemaining, LeaseRevoke};
    let env = env();
    let grant = |id, ttl| lease_cmd(L::Grant(LeaseGrant { id, ttl }));
    let entries = [
        cmd(6, 1, 1, put(3)),
        cmd(7, 1, 1, grant(5, 60)),
        cmd(8, 1, 1, grant(5, 30)),
        cmd(9, 1, 1, grant(6, 10)),
        cmd(10, 1, 1, lease_cmd(L::Revoke(LeaseRevoke { id: 6 }))),
        cmd(11, 1, 1, lease_cmd(L::Revoke(LeaseRevoke { id: 6 }))),
        cmd(
            12,
            1,
            1,
            lease_cmd(L::Checkpoint(LeaseCheckpoint {
                leases: vec![
                    LeaseRemaining {
                        id: 5,
                        remaining_ttl: 12,
                    },
                    LeaseRemaining {
                        id: 7,
                        remaining_ttl: 1,
                    },
                ],
            })),
        ),
    ];
    let out = run(&env, &region(), &entries, no_conf_change);
    let errors: Vec<_> = out
        .results
        .iter()
        .map(|r| r.result.as_ref().err().map(|e| e.to_string()))
        .collect();
    let exists = Some(Error::Mvcc(mvcc::Error::LeaseExists).to_string());
    let not_found = Some(Error::Mvcc(mvcc::Error::LeaseNotFound).to_string());
    assert_eq!(
        errors,
        vec![None, None, exists, None, None, not_found, None],
        "put, grant, grant again, grant, revoke, revoke again, checkpoint"
    );
    assert!(
        out.results.iter().all(|r| r.revision == 3),
        "no revision taken"
    );
    assert_eq!(out.apply_state.applied_revision, 3);
    assert_eq!(
        out.lease_changes,
        vec![
            LeaseChange::Granted { id: 5, ttl: 60 },
            LeaseChange::Granted { id: 6, ttl: 10 },
            LeaseChange::Revoked(6),
            LeaseChange::Checkpointed(vec![LeaseRemaining {
                id: 5,
                remaining_ttl: 12
            }]),
        ]
    );
    let records = crate::lease::records(&env.kv.snapshot(), &region()).unwrap();
    assert_eq!(
        records,
        vec![proto::raft_serverpb::LeaseRecord {
            id: 5,
            ttl: 60,
            remaining_ttl: 12
        }]
    );

    // A region not holding the owner keys refuses.
    let left = metapb::Region {
        end_key: b"a".to_vec(),
        ..region()
    };
    let out = run(&env, &left, &[cmd(13, 1, 1, grant(8, 5))], no_conf_change);
    assert!(matches!(out.results[0].result, Err(Error::StaleCommand(_))));
}
