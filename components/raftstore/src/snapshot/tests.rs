use super::*;
use engine::WriteBatch;
use proto::raft_serverpb::SnapshotInstall;

fn region() -> metapb::Region {
    metapb::Region {
        id: 7,
        start_key: b"b".to_vec(),
        end_key: b"d".to_vec(),
        region_epoch: Some(metapb::RegionEpoch {
            conf_ver: 2,
            version: 1,
        }),
        peers: vec![metapb::Peer {
            id: 1,
            node_id: 1,
            role: 0,
        }],
    }
}

fn encoded_with(region: &metapb::Region, records: &[(u8, Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    encoded_as(VERSION, region, records)
}

fn encoded_as(version: u8, region: &metapb::Region, records: &[(u8, Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    out.push(version);
    out.extend_from_slice(&7u64.to_be_bytes());
    out.extend_from_slice(&3i64.to_be_bytes());
    out.extend_from_slice(&1i64.to_be_bytes());
    put_bytes(&mut out, &region.encode_to_vec()).unwrap();
    for (tag, k, v) in records {
        put_record(&mut out, *tag, k, v).unwrap();
    }
    out.push(TAG_END);
    out
}

fn encoded(records: &[(u8, Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    encoded_with(&region(), records)
}

#[test]
fn decodes_valid_and_rejects_malformed() {
    let put = codec::Version::Tombstone.encode(0);
    let revision_record = (
        TAG_REVISION,
        codec::revision_key(3, 0).to_vec(),
        b"c".to_vec(),
    );
    let good = encoded(&[(TAG_MVCC, codec::mvcc_key(b"c", 3), put.clone())]);
    let snap = decode(7, &good).unwrap();
    assert_eq!(snap.region, region());
    assert_eq!(snap.applied_revision, 3);
    assert_eq!(snap.compact_revision, 1);
    assert_eq!(snap.mvcc.len(), 1);
    assert!(snap.revision.is_empty());
    // Version 3 (records of the old format, revision CF records) is
    // still read; version 4 has no revision CF records.
    let v3 = encoded_as(
        VERSION_WITH_REVISION_RECORDS,
        &region(),
        &[
            (
                TAG_MVCC,
                codec::mvcc_key(b"c", 3),
                codec::Version::Tombstone.encode_legacy(),
            ),
            revision_record.clone(),
        ],
    );
    let snap = decode(7, &v3).unwrap();
    assert_eq!((snap.mvcc.len(), snap.revision.len()), (1, 1));
    assert!(decode(7, &encoded(&[revision_record])).is_err());

    for n in 0..good.len() {
        assert!(decode(7, &good[..n]).is_err(), "prefix {n}");
    }
    let mut trailing = good.clone();
    trailing.push(0);
    assert!(decode(7, &trailing).is_err());
    assert!(decode(8, &good).is_err());
    let mut other = region();
    other.id = 8;
    assert!(decode(7, &encoded_with(&other, &[])).is_err());
    let mut no_peers = region();
    no_peers.peers.clear();
    assert!(decode(7, &encoded_with(&no_peers, &[])).is_err());
    let outside = encoded(&[(TAG_MVCC, codec::mvcc_key(b"e", 3), put.clone())]);
    assert!(decode(7, &outside).is_err());
    let outside = encoded_as(
        VERSION_WITH_REVISION_RECORDS,
        &region(),
        &[(
            TAG_REVISION,
            codec::revision_key(3, 0).to_vec(),
            b"a".to_vec(),
        )],
    );
    assert!(decode(7, &outside).is_err());
    // Transaction locks and decisions travel with the region's data,
    // and only those of the region's keys.
    let lock = |key: &[u8]| TxnLockRecord {
        txn_id: 5,
        primary_key: key.to_vec(),
        spans: vec![txn::range_span(&mvcc::KeyRange {
            start: key.to_vec(),
            end: None,
        })],
        base_revision: 2,
    };
    let record = TxnCommitRecord {
        txn_id: 5,
        revision: 3,
        mutations: Vec::new(),
        lock_spans: vec![lock(b"c").spans[0].clone()],
    };
    let with_txn = encoded(&[
        (
            TAG_LOCK,
            5u64.to_be_bytes().to_vec(),
            lock(b"c").encode_to_vec(),
        ),
        (TAG_TXN_RECORD, b"c".to_vec(), record.encode_to_vec()),
    ]);
    let snap = decode(7, &with_txn).unwrap();
    assert_eq!(snap.locks, vec![lock(b"c")]);
    assert_eq!(snap.txn_records, vec![(b"c".to_vec(), record.clone())]);
    let outside = encoded(&[(
        TAG_LOCK,
        5u64.to_be_bytes().to_vec(),
        lock(b"e").encode_to_vec(),
    )]);
    assert!(decode(7, &outside).is_err());
    let outside = encoded(&[(TAG_TXN_RECORD, b"a".to_vec(), record.encode_to_vec())]);
    assert!(decode(7, &outside).is_err());
    let bad_key = encoded(&[(TAG_MVCC, b"xx".to_vec(), put)]);
    assert!(decode(7, &bad_key).is_err());
    let mut huge_len = MAGIC.to_vec();
    huge_len.push(VERSION);
    huge_len.extend_from_slice(&7u64.to_be_bytes());
    huge_len.extend_from_slice(&[0; 16]);
    put_bytes(&mut huge_len, &region().encode_to_vec()).unwrap();
    huge_len.extend_from_slice(&[TAG_MVCC, 0xFF, 0xFF, 0xFF, 0xFF]);
    assert!(decode(7, &huge_len).is_err());
    let mut huge_meta = MAGIC.to_vec();
    huge_meta.push(VERSION);
    huge_meta.extend_from_slice(&7u64.to_be_bytes());
    huge_meta.extend_from_slice(&[0; 16]);
    huge_meta.extend_from_slice(&[0xFF, 0xFF, 0xFF, 0xFF]);
    assert!(decode(7, &huge_meta).is_err());
}

/// Every (revision, sub, key) of the revision CF.
fn revision_index(kv: &KvEngine) -> Vec<(i64, u32, Vec<u8>)> {
    let mut it = kv.iter(cf::REVISION, &[], &[]);
    it.seek_to_first();
    let mut out = Vec::new();
    while let (Some(k), Some(v)) = (it.key(), it.value()) {
        let (rev, sub) = codec::decode_revision_key(k).unwrap();
        out.push((rev, sub, v.to_vec()));
        it.next();
    }
    out
}

/// Writes `key`'s version at `rev`, sub-revision `sub`, in the old
/// record format or the new one, with its revision CF entry.
fn write_version(kv: &KvEngine, key: &[u8], rev: i64, sub: u32, legacy: bool) {
    let version = codec::Version::Put {
        create_revision: rev,
        version: 1,
        lease: 0,
        value: b"v".to_vec(),
    };
    let record = if legacy {
        version.encode_legacy()
    } else {
        version.encode(sub)
    };
    let mut wb = WriteBatch::default();
    kv.put_to(&mut wb, cf::MVCC, &codec::mvcc_key(key, rev), &record);
    kv.put_to(&mut wb, cf::REVISION, &codec::revision_key(rev, sub), key);
    kv.write(wb).unwrap();
}

/// A snapshot carries the region's versions only, in the new format
/// (old records re-encoded), and installing it replaces exactly the
/// region's revision CF entries, found from the records: other
/// regions' entries stay.
#[test]
fn snapshots_are_bounded_by_the_region_and_keep_the_revision_index() {
    let dir = tempfile::tempdir().unwrap();
    let leader = KvEngine::open(&dir.path().join("leader")).unwrap();
    // Region b..d: c@3 (old format, sub 1), c@5 (new, sub 0); outside
    // it a@3 (sub 0), d@4 (sub 0).
    write_version(&leader, b"a", 3, 0, true);
    write_version(&leader, b"c", 3, 1, true);
    write_version(&leader, b"c", 5, 0, false);
    write_version(&leader, b"d", 4, 0, false);
    let mut wb = WriteBatch::default();
    let region_state = RegionLocalState {
        region: Some(region()),
        ..Default::default()
    };
    let apply_state = RaftApplyState {
        applied_revision: 5,
        ..Default::default()
    };
    leader.put_to(
        &mut wb,
        cf::META,
        &keys::region_state_key(7),
        &region_state.encode_to_vec(),
    );
    leader.put_to(
        &mut wb,
        cf::META,
        &keys::apply_state_key(7),
        &apply_state.encode_to_vec(),
    );
    leader.write(wb).unwrap();
    let (_, data) = generate(&leader, 7).unwrap();
    let snap = decode(7, &data).unwrap();
    assert!(snap.revision.is_empty());
    let carried: Vec<_> = snap
        .mvcc
        .iter()
        .map(|(k, v)| {
            let (key, rev) = codec::decode_mvcc_key(k).unwrap();
            (key, rev, codec::record_sub(v).unwrap())
        })
        .collect();
    assert_eq!(
        carried,
        vec![(b"c".to_vec(), 5, Some(0)), (b"c".to_vec(), 3, Some(1))]
    );

    // The follower holds other versions of the region (one of the old
    // format) and other regions' data.
    let follower = KvEngine::open(&dir.path().join("follower")).unwrap();
    write_version(&follower, b"a", 3, 0, true);
    write_version(&follower, b"b", 2, 0, true);
    write_version(&follower, b"c", 3, 1, false);
    write_version(&follower, b"c", 4, 1, false);
    write_version(&follower, b"d", 4, 0, false);
    let wb = write_data(&follower, &snap, INSTALL_BATCH_BYTES, &mut |_| Ok(())).unwrap();
    follower.write(wb).unwrap();
    assert_eq!(
        revision_index(&follower),
        vec![
            (3, 0, b"a".to_vec()),
            (3, 1, b"c".to_vec()),
            (4, 0, b"d".to_vec()),
            (5, 0, b"c".to_vec()),
        ]
    );
    assert_eq!(revision_index(&leader), revision_index(&follower));
}

/// A store with `keys` put at revisions 2, 3, ... and then `deleted`
/// deleted.
fn store_with(dir: &std::path::Path, keys: &[&str], deleted: &[&str]) -> MvccStore {
    use proto::raft_cmdpb::{mutation::Op, Mutation};
    let store = MvccStore::new(KvEngine::open(dir).unwrap());
    let changes = keys
        .iter()
        .map(|k| (k, Op::Put))
        .chain(deleted.iter().map(|k| (k, Op::Delete)));
    for (rev, (key, op)) in (2..).zip(changes) {
        let mut wb = WriteBatch::default();
        let m = Mutation {
            op: op as i32,
            key: key.as_bytes().to_vec(),
            version: 1,
            value: b"v".to_vec(),
            ..Default::default()
        };
        store.stage_changes(&mut wb, rev, &[m]);
        store.engine().write(wb).unwrap();
    }
    store
}

/// Installing replaces the key index of the region's range with one
/// rebuilt from the snapshot's versions, so counts stay right.
#[test]
fn installing_rebuilds_the_key_index_of_the_range() {
    let dir = tempfile::tempdir().unwrap();
    let leader = store_with(&dir.path().join("a"), &["b1", "b2", "c1", "c2"], &["c1"]);
    let mut wb = WriteBatch::default();
    let region_state = RegionLocalState {
        region: Some(region()),
        ..Default::default()
    };
    leader.engine().put_to(
        &mut wb,
        cf::META,
        &keys::region_state_key(7),
        &region_state.encode_to_vec(),
    );
    let apply_state = RaftApplyState {
        applied_revision: 6,
        ..Default::default()
    };
    leader.engine().put_to(
        &mut wb,
        cf::META,
        &keys::apply_state_key(7),
        &apply_state.encode_to_vec(),
    );
    leader.engine().write(wb).unwrap();
    let (_, data) = generate(leader.engine(), 7).unwrap();
    let snap = decode(7, &data).unwrap();
    let follower = store_with(
        &dir.path().join("b"),
        &["a1", "b1", "b9", "c5", "d1"],
        &["b1"],
    );
    let wb = write_data(follower.engine(), &snap, INSTALL_BATCH_BYTES, &mut |_| {
        Ok(())
    })
    .unwrap();
    follower.engine().write(wb).unwrap();
    let view = follower.snapshot();
    view.check_key_index().unwrap();
    let count = |start: &[u8], end: &[u8]| {
        let range = mvcc::KeyRange::from_etcd(start, end);
        view.range(&range, i64::MAX, 0, false).unwrap().count
    };
    // b1, b2, c2 from the leader; a1 and d1 outside the region kept.
    assert_eq!(count(b"b", b"d"), 3);
    assert_eq!(count(b"a", b"\0"), 5);
}

/// Writes region 7's meta and apply state (at `applied_revision`) into
/// `kv`, as a replica of it holds them.
fn write_region_state(kv: &KvEngine, applied_revision: i64) {
    let mut wb = WriteBatch::default();
    let region_state = RegionLocalState {
        region: Some(region()),
        ..Default::default()
    };
    kv.put_to(
        &mut wb,
        cf::META,
        &keys::region_state_key(7),
        &region_state.encode_to_vec(),
    );
    let apply_state = RaftApplyState {
        applied_revision,
        ..Default::default()
    };
    kv.put_to(
        &mut wb,
        cf::META,
        &keys::apply_state_key(7),
        &apply_state.encode_to_vec(),
    );
    kv.write(wb).unwrap();
}

fn apply_state_of(kv: &KvEngine) -> RaftApplyState {
    RaftApplyState::decode(
        kv.get(cf::META, &keys::apply_state_key(7))
            .unwrap()
            .unwrap()
            .as_slice(),
    )
    .unwrap()
}

/// An install is written in batches of bounded size, so a crash can cut
/// it short anywhere: until then the apply state says a snapshot is being
/// installed (reads refuse), and start-up finishes it from its record and
/// its file, with the range as the leader has it (versions, key index,
/// revision index) and other regions' data untouched.
#[test]
fn an_install_cut_short_is_finished_at_start_up() {
    use protobuf::Message as _;
    let dir = tempfile::tempdir().unwrap();
    let many: Vec<String> = (0..300).map(|i| format!("b{i:04}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    let leader = store_with(&dir.path().join("leader"), &many, &["b0007", "b0100"]);
    write_region_state(leader.engine(), 303);
    let (_, data) = generate(leader.engine(), 7).unwrap();

    // The follower holds keys outside the range (to be kept) and versions
    // in it at revisions the leader's history does not have (an older
    // replica's, one of the old record format), whose revision index
    // entries must go with them.
    let follower = store_with(&dir.path().join("follower"), &["a1", "d1"], &[]);
    let kv = follower.engine();
    write_version(kv, b"b0001", 1000, 0, false);
    write_version(kv, b"b9", 1001, 1, true);
    write_version(kv, b"c5", 1002, 0, false);
    write_region_state(kv, 1002);
    let log = engine::RaftLogEngine::open(&dir.path().join("raft")).unwrap();
    let snap_dir = SnapDir::open(&dir.path().join("snap"), &[]).unwrap();
    let desc = Descriptor {
        region_id: 7,
        index: 40,
        term: 6,
        size: data.len() as u64,
        crc32: crc32fast::hash(&data),
    };
    std::fs::write(snap_dir.received(&desc), &data).unwrap();
    let hs = raft::eraftpb::HardState {
        term: 6,
        commit: 40,
        ..Default::default()
    };
    let record = SnapshotInstall {
        index: 40,
        term: 6,
        data: desc.encode(),
        conf_state: raft::eraftpb::ConfState::default()
            .write_to_bytes()
            .unwrap(),
        hard_state: hs.write_to_bytes().unwrap(),
    };
    let snap = decode_file(7, &snap_dir.received(&desc)).unwrap();

    // Cut short after its third batch of about 4 KiB.
    let mut batches = 0;
    let cut = install_data(kv, &log, 7, &record, &snap, 4096, &mut |n| {
        batches = n;
        if n == 3 {
            Err(Error::Corrupted("crash".into()))
        } else {
            Ok(())
        }
    });
    assert!(cut.is_err());
    assert_eq!(batches, 3);
    assert!(apply_state_of(kv).installing_snapshot);
    assert_eq!(
        pending_install_files(kv).unwrap(),
        vec![SnapDir::received_name(&desc)]
    );

    // Start-up: the directory keeps the file, the install is finished.
    drop(snap_dir);
    let keep = pending_install_files(kv).unwrap();
    let snap_dir = SnapDir::open(&dir.path().join("snap"), &keep).unwrap();
    finish_installs(kv, &log, &snap_dir, INSTALL_BATCH_BYTES).unwrap();
    let state = apply_state_of(kv);
    assert!(!state.installing_snapshot);
    assert_eq!((state.applied_index, state.applied_revision), (40, 303));
    assert!(pending_install_files(kv).unwrap().is_empty());
    assert!(
        !snap_dir.received(&desc).exists(),
        "the file is deleted once installed"
    );
    assert_eq!(log.hard_state(7).unwrap().unwrap().commit, 40);

    let view = follower.snapshot();
    view.check_key_index().unwrap();
    let count = |start: &[u8], end: &[u8]| {
        let range = mvcc::KeyRange::from_etcd(start, end);
        view.range(&range, i64::MAX, 0, false).unwrap().count
    };
    assert_eq!(count(b"b", b"d"), 298, "the leader's keys of the range");
    assert_eq!(count(b"a", b"b"), 1, "a1 kept");
    assert_eq!(count(b"d", b"e"), 1, "d1 kept");
    // The revision index of the range is the leader's, entry for entry.
    let in_range = |kv: &KvEngine| {
        revision_index(kv)
            .into_iter()
            .filter(|(_, _, k)| k.as_slice() >= b"b".as_slice() && k.as_slice() < b"d".as_slice())
            .collect::<Vec<_>>()
    };
    assert_eq!(in_range(kv), in_range(leader.engine()));
}

/// A whole install in batches ends where a single batch would.
#[test]
fn an_install_in_many_batches_writes_what_one_batch_would() {
    let dir = tempfile::tempdir().unwrap();
    let many: Vec<String> = (0..200).map(|i| format!("c{i:04}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    let leader = store_with(&dir.path().join("leader"), &many, &["c0003"]);
    write_region_state(leader.engine(), 202);
    let (_, data) = generate(leader.engine(), 7).unwrap();
    let snap = decode(7, &data).unwrap();
    let one = store_with(&dir.path().join("one"), &["b1", "c0001", "e"], &[]);
    let many_batches = store_with(&dir.path().join("many"), &["b1", "c0001", "e"], &[]);
    let wb = write_data(one.engine(), &snap, usize::MAX, &mut |_| Ok(())).unwrap();
    one.engine().write(wb).unwrap();
    let mut written = 0;
    let wb = write_data(many_batches.engine(), &snap, 2048, &mut |n| {
        written = n;
        Ok(())
    })
    .unwrap();
    many_batches.engine().write(wb).unwrap();
    assert!(written > 5, "{written} batches");
    assert_eq!(
        revision_index(one.engine()),
        revision_index(many_batches.engine())
    );
    let dump = |s: &MvccStore| {
        let mut it = s.engine().iter(cf::MVCC, &[], &[]);
        it.seek_to_first();
        let mut out = Vec::new();
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            out.push((k.to_vec(), v.to_vec()));
            it.next();
        }
        out
    };
    assert_eq!(dump(&one), dump(&many_batches));
    many_batches.snapshot().check_key_index().unwrap();
}
