//! MVCC layer tests on a real RocksDB: history, ranges, compaction, hashing
//! and etcd's request semantics.

use engine::{KvEngine, WriteBatch};
use mvcc::exec::{self, LeaseRevoke, ReadBounds, WriteRequest, WriteResponse};
use mvcc::lease::{owner_key, FetchedLeases, HeldLease};
use mvcc::{Error, KeyRange, MvccStore};
use proto::etcdserverpb::{
    compare::{CompareResult, CompareTarget, TargetUnion},
    range_request::{SortOrder, SortTarget},
    request_op::Request,
    response_op::Response as OpResponse,
    Compare, DeleteRangeRequest, PutRequest, RangeRequest, RequestOp, TxnRequest,
};
use proto::mvccpb::event::EventType;
use proto::raft_cmdpb::mutation::Op;

struct Db {
    _dir: tempfile::TempDir,
    store: MvccStore,
    rev: i64,
    /// The leases evaluation sees.
    leases: FetchedLeases,
}

const NO_BOUNDS: ReadBounds = ReadBounds {
    current: i64::MAX,
    compacted: 0,
};

impl Db {
    fn new() -> Db {
        let dir = tempfile::tempdir().unwrap();
        let engine = KvEngine::open(&dir.path().join("kv")).unwrap();
        Db {
            _dir: dir,
            store: MvccStore::new(engine),
            rev: 1,
            leases: FetchedLeases::default(),
        }
    }

    /// Evaluates and applies a write as the region leader would, returning
    /// the response with revisions filled in.
    fn write(&mut self, req: WriteRequest) -> Result<WriteResponse, Error> {
        let eval = exec::evaluate(&self.store.snapshot(), &req, NO_BOUNDS, &self.leases)?;
        let mut resp = eval.response;
        if eval.mutations.is_empty() {
            exec::fill_revisions(&mut resp, self.rev, self.rev);
            return Ok(resp);
        }
        self.rev += 1;
        let mut wb = WriteBatch::default();
        self.store.stage_changes(&mut wb, self.rev, &eval.mutations);
        self.store.engine().write(wb).unwrap();
        exec::fill_revisions(&mut resp, self.rev, self.rev - 1);
        Ok(resp)
    }

    fn put(&mut self, k: &str, v: &str) -> i64 {
        self.write(WriteRequest::Put(PutRequest {
            key: k.into(),
            value: v.into(),
            ..Default::default()
        }))
        .unwrap();
        self.rev
    }

    fn delete(&mut self, k: &str, end: &str) -> i64 {
        match self
            .write(WriteRequest::DeleteRange(DeleteRangeRequest {
                key: k.into(),
                range_end: end.into(),
                ..Default::default()
            }))
            .unwrap()
        {
            WriteResponse::DeleteRange(d) => d.deleted,
            _ => unreachable!(),
        }
    }

    fn get(&self, k: &str, rev: i64) -> Option<String> {
        self.store
            .snapshot()
            .get(k.as_bytes(), rev)
            .unwrap()
            .map(|kv| String::from_utf8(kv.value).unwrap())
    }

    fn keys(&self, start: &str, end: &str, rev: i64) -> Vec<String> {
        self.store
            .snapshot()
            .range(
                &KeyRange::from_etcd(start.as_bytes(), end.as_bytes()),
                rev,
                0,
                true,
            )
            .unwrap()
            .kvs
            .into_iter()
            .map(|kv| String::from_utf8(kv.key).unwrap())
            .collect()
    }
}

#[test]
fn history_reads_at_every_revision() {
    let mut db = Db::new();
    let r2 = db.put("a", "1");
    let r3 = db.put("a", "2");
    assert_eq!(db.delete("a", ""), 1);
    let r4 = db.rev;
    let r5 = db.put("a", "3");
    assert_eq!(db.get("a", 1), None);
    assert_eq!(db.get("a", r2).as_deref(), Some("1"));
    assert_eq!(db.get("a", r3).as_deref(), Some("2"));
    assert_eq!(db.get("a", r4), None);
    assert_eq!(db.get("a", r5).as_deref(), Some("3"));
    let kv = db.store.snapshot().get(b"a", r5).unwrap().unwrap();
    // Recreated after a delete: version and create revision start over.
    assert_eq!(
        (kv.create_revision, kv.mod_revision, kv.version),
        (r5, r5, 1)
    );
    let kv = db.store.snapshot().get(b"a", r3).unwrap().unwrap();
    assert_eq!(
        (kv.create_revision, kv.mod_revision, kv.version),
        (r2, r3, 2)
    );
}

#[test]
fn range_edge_cases() {
    let mut db = Db::new();
    for k in ["a", "ab", "b", "b\0", "c", "\u{7f}"] {
        db.put(k, "v");
    }
    let now = db.rev;
    assert_eq!(db.keys("a", "", now), vec!["a"]);
    assert_eq!(db.keys("a", "b", now), vec!["a", "ab"]);
    assert_eq!(db.keys("b", "\0", now), vec!["b", "b\0", "c", "\u{7f}"]);
    assert_eq!(db.keys("\0", "\0", now).len(), 6);
    // range_end <= key is empty, not an error.
    assert!(db.keys("c", "a", now).is_empty());
    assert!(db.keys("c", "c", now).is_empty());
    assert!(db.keys("zz", "", now).is_empty());
    // limit and count
    let r = db
        .store
        .snapshot()
        .range(&KeyRange::from_etcd(b"a", b"\0"), now, 2, true)
        .unwrap();
    assert_eq!(r.kvs.len(), 2);
    assert_eq!(r.count, 6);
    let r = db
        .store
        .snapshot()
        .range(&KeyRange::from_etcd(b"a", b"\0"), now, 0, false)
        .unwrap();
    assert!(r.kvs.is_empty());
    assert_eq!(r.count, 6);
    // Keys created later are invisible at an older revision.
    assert_eq!(db.keys("a", "\0", 3), vec!["a", "ab"]);
}

#[test]
fn range_request_options_match_etcd() {
    let mut db = Db::new();
    db.put("k1", "c");
    db.put("k2", "a");
    db.put("k3", "b");
    db.put("k1", "d");
    let now = db.rev;
    let req = |f: &dyn Fn(&mut RangeRequest)| {
        let mut r = RangeRequest {
            key: b"k".to_vec(),
            range_end: b"l".to_vec(),
            ..Default::default()
        };
        f(&mut r);
        exec::range(&db.store.snapshot(), &r, now).unwrap()
    };
    let keys = |r: &proto::etcdserverpb::RangeResponse| -> Vec<String> {
        r.kvs
            .iter()
            .map(|kv| String::from_utf8(kv.key.clone()).unwrap())
            .collect()
    };
    let r = req(&|r| r.limit = 2);
    assert_eq!(
        (keys(&r), r.more, r.count),
        (vec!["k1".into(), "k2".into()], true, 3)
    );
    let r = req(&|r| {
        r.sort_target = SortTarget::Value as i32;
    });
    // A non-key target without an order sorts ascending.
    assert_eq!(keys(&r), vec!["k2", "k3", "k1"]);
    let r = req(&|r| {
        r.sort_target = SortTarget::Key as i32;
        r.sort_order = SortOrder::Descend as i32;
        r.limit = 1;
    });
    assert_eq!((keys(&r), r.more), (vec!["k3".into()], true));
    let r = req(&|r| r.min_mod_revision = now);
    assert_eq!((keys(&r), r.count), (vec!["k1".into()], 3));
    let r = req(&|r| r.max_create_revision = 3);
    assert_eq!(keys(&r), vec!["k1", "k2"]);
    let r = req(&|r| {
        r.keys_only = true;
    });
    assert!(r.kvs.iter().all(|kv| kv.value.is_empty()));
    let r = req(&|r| r.count_only = true);
    assert!(r.kvs.is_empty());
    assert_eq!((r.count, r.more), (3, false));
}

#[test]
fn compaction_drops_superseded_versions_and_keeps_reads_at_its_revision() {
    let mut db = Db::new();
    db.put("a", "1");
    db.put("a", "2");
    db.put("b", "1");
    db.delete("b", "");
    db.put("c", "1");
    let compact_at = db.rev;
    db.put("a", "3");
    let before_hash = db
        .store
        .snapshot()
        .hash(db.rev, compact_at, b"", b"")
        .unwrap();
    let stats = db.store.compact(compact_at, b"", b"").unwrap();
    // a@2 is superseded by a@3; b's put and its tombstone both go.
    assert_eq!(stats.versions_removed, 3);
    assert_eq!(db.get("a", compact_at).as_deref(), Some("2"));
    assert_eq!(db.get("a", db.rev).as_deref(), Some("3"));
    assert_eq!(db.get("b", compact_at), None);
    assert_eq!(db.get("c", compact_at).as_deref(), Some("1"));
    // The hash describes the state after compaction whether or not the
    // physical clean-up already ran.
    assert_eq!(
        db.store
            .snapshot()
            .hash(db.rev, compact_at, b"", b"")
            .unwrap(),
        before_hash
    );
    // Events below the compaction are gone, later ones remain.
    let events = db
        .store
        .snapshot()
        .events(&KeyRange::from_etcd(b"\0", b"\0"), 1, db.rev, 0, true)
        .unwrap();
    let revs: Vec<i64> = events
        .iter()
        .map(|e| e.kv.as_ref().unwrap().mod_revision)
        .collect();
    assert_eq!(revs, vec![3, 6, 7]);
    // A second compaction at the same point removes nothing more.
    assert_eq!(
        db.store
            .compact(compact_at, b"", b"")
            .unwrap()
            .versions_removed,
        0
    );
}

#[test]
fn compaction_reclaims_space() {
    use rand::{distributions::Alphanumeric, Rng};
    let mut db = Db::new();
    let mut rng = rand::thread_rng();
    for _ in 0..2000 {
        // Incompressible values, so the space is really there to reclaim.
        let value: String = (&mut rng)
            .sample_iter(Alphanumeric)
            .take(1000)
            .map(char::from)
            .collect();
        db.put("hot", &value);
    }
    db.store
        .engine()
        .compact_range(engine::cf::MVCC, None, None);
    let before = db.store.engine().live_data_size();
    db.store.compact(db.rev, b"", b"").unwrap();
    let after = db.store.engine().live_data_size();
    assert!(before > 1_000_000, "2000 versions of 1000 bytes: {before}");
    assert!(after * 20 < before, "size {before} -> {after}");
}

#[test]
fn hash_depends_on_content_and_revision() {
    let mut a = Db::new();
    let mut b = Db::new();
    for db in [&mut a, &mut b] {
        db.put("k", "v");
        db.put("j", "w");
    }
    assert_eq!(
        a.store.snapshot().hash(3, 0, b"", b"").unwrap(),
        b.store.snapshot().hash(3, 0, b"", b"").unwrap()
    );
    assert_ne!(
        a.store.snapshot().hash(3, 0, b"", b"").unwrap(),
        a.store.snapshot().hash(2, 0, b"", b"").unwrap()
    );
    b.put("k", "changed");
    a.put("k", "other");
    assert_ne!(
        a.store.snapshot().hash(4, 0, b"", b"").unwrap(),
        b.store.snapshot().hash(4, 0, b"", b"").unwrap()
    );
}

/// The hashes of adjacent ranges combine into the hash of their union,
/// wherever the range is cut (a region boundary must not change HashKV).
#[test]
fn range_hashes_combine_into_the_whole_range() {
    let mut db = Db::new();
    for k in ["a", "b", "c", "m", "n", "z"] {
        db.put(k, "v");
    }
    db.put("b", "w");
    let view = db.store.snapshot();
    let whole = view.range_hash(db.rev, 0, b"", b"").unwrap();
    assert_eq!(whole.crc, view.hash(db.rev, 0, b"", b"").unwrap());
    for cut in [&b"a"[..], b"b", b"bb", b"m", b"zz"] {
        let left = view.range_hash(db.rev, 0, b"", cut).unwrap();
        let right = view.range_hash(db.rev, 0, cut, b"").unwrap();
        assert_eq!(left.combine(right), whole, "cut at {cut:?}");
    }
    let empty = view.range_hash(db.rev, 0, b"x", b"y").unwrap();
    assert_eq!(empty.combine(whole), whole);
    assert_eq!(mvcc::RangeHash::default().combine(whole), whole);
}

#[test]
fn events_carry_type_sub_order_and_prev_kv() {
    let mut db = Db::new();
    db.put("a", "1");
    let txn = TxnRequest {
        compare: vec![],
        success: vec![put_op("b", "2"), put_op("a", "3")],
        failure: vec![],
    };
    db.write(WriteRequest::Txn(txn)).unwrap();
    db.delete("a", "");
    let events = db
        .store
        .snapshot()
        .events(&KeyRange::from_etcd(b"a", b"c"), 2, db.rev, 0, true)
        .unwrap();
    let summary: Vec<(i32, String, i64)> = events
        .iter()
        .map(|e| {
            let kv = e.kv.as_ref().unwrap();
            (
                e.r#type,
                String::from_utf8(kv.key.clone()).unwrap(),
                kv.mod_revision,
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (EventType::Put as i32, "a".into(), 2),
            (EventType::Put as i32, "b".into(), 3),
            (EventType::Put as i32, "a".into(), 3),
            (EventType::Delete as i32, "a".into(), 4),
        ]
    );
    assert_eq!(events[3].prev_kv.as_ref().unwrap().value, b"3");
    // Only keys in range, only revisions in the interval.
    let only_b = db
        .store
        .snapshot()
        .events(&KeyRange::from_etcd(b"b", b""), 1, 3, 0, false)
        .unwrap();
    assert_eq!(only_b.len(), 1);
}

fn put_op(k: &str, v: &str) -> RequestOp {
    RequestOp {
        request: Some(Request::RequestPut(PutRequest {
            key: k.into(),
            value: v.into(),
            ..Default::default()
        })),
    }
}

#[test]
fn txn_semantics() {
    let mut db = Db::new();
    db.put("x", "1");
    let cmp = |target: CompareTarget, result: CompareResult, tu: TargetUnion| Compare {
        result: result as i32,
        target: target as i32,
        key: b"x".to_vec(),
        range_end: vec![],
        target_union: Some(tu),
    };
    // Compare true → success; a range after a put in the same txn sees it.
    let txn = TxnRequest {
        compare: vec![cmp(
            CompareTarget::Value,
            CompareResult::Equal,
            TargetUnion::Value(b"1".to_vec()),
        )],
        success: vec![
            RequestOp {
                request: Some(Request::RequestRange(RangeRequest {
                    key: b"x".to_vec(),
                    ..Default::default()
                })),
            },
            put_op("x", "2"),
            RequestOp {
                request: Some(Request::RequestRange(RangeRequest {
                    key: b"x".to_vec(),
                    ..Default::default()
                })),
            },
        ],
        failure: vec![],
    };
    let WriteResponse::Txn(resp) = db.write(WriteRequest::Txn(txn)).unwrap() else {
        unreachable!()
    };
    assert!(resp.succeeded);
    assert_eq!(resp.header.unwrap().revision, 3);
    let ranges: Vec<_> = resp
        .responses
        .iter()
        .filter_map(|r| match &r.response {
            Some(OpResponse::ResponseRange(r)) => Some(r.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(ranges[0].kvs[0].value, b"1");
    assert_eq!(ranges[0].header.as_ref().unwrap().revision, 2);
    assert_eq!(ranges[1].kvs[0].value, b"2");
    assert_eq!(ranges[1].kvs[0].mod_revision, 3);
    assert_eq!(ranges[1].header.as_ref().unwrap().revision, 3);

    // Compare on a missing key's value always fails; version compares 0.
    let missing = |target, tu| Compare {
        key: b"missing".to_vec(),
        ..cmp(target, CompareResult::Equal, tu)
    };
    let t = TxnRequest {
        compare: vec![missing(CompareTarget::Value, TargetUnion::Value(vec![]))],
        success: vec![],
        failure: vec![],
    };
    let WriteResponse::Txn(resp) = db.write(WriteRequest::Txn(t)).unwrap() else {
        unreachable!()
    };
    assert!(!resp.succeeded);
    // Read-only: no revision taken.
    assert_eq!(resp.header.unwrap().revision, 3);
    let t = TxnRequest {
        compare: vec![missing(CompareTarget::Version, TargetUnion::Version(0))],
        success: vec![],
        failure: vec![],
    };
    let WriteResponse::Txn(resp) = db.write(WriteRequest::Txn(t)).unwrap() else {
        unreachable!()
    };
    assert!(resp.succeeded);

    // ignore_value on a missing key fails the whole txn before any change.
    let t = TxnRequest {
        compare: vec![],
        success: vec![
            put_op("y", "1"),
            RequestOp {
                request: Some(Request::RequestPut(PutRequest {
                    key: b"nope".to_vec(),
                    ignore_value: true,
                    ..Default::default()
                })),
            },
        ],
        failure: vec![],
    };
    assert_eq!(
        db.write(WriteRequest::Txn(t)).unwrap_err(),
        Error::KeyNotFound
    );
    assert_eq!(db.get("y", i64::MAX), None);
    // A lease that does not exist.
    let p = PutRequest {
        key: b"z".to_vec(),
        lease: 42,
        ..Default::default()
    };
    assert_eq!(
        db.write(WriteRequest::Put(p)).unwrap_err(),
        Error::LeaseNotFound
    );
}

#[test]
fn delete_range_revision_only_when_something_was_deleted() {
    let mut db = Db::new();
    db.put("a", "1");
    let before = db.rev;
    let WriteResponse::DeleteRange(d) = db
        .write(WriteRequest::DeleteRange(DeleteRangeRequest {
            key: b"zzz".to_vec(),
            ..Default::default()
        }))
        .unwrap()
    else {
        unreachable!()
    };
    assert_eq!((d.deleted, d.header.unwrap().revision), (0, before));
    assert_eq!(db.rev, before);
    let WriteResponse::DeleteRange(d) = db
        .write(WriteRequest::DeleteRange(DeleteRangeRequest {
            key: b"a".to_vec(),
            range_end: b"\0".to_vec(),
            prev_kv: true,
        }))
        .unwrap()
    else {
        unreachable!()
    };
    assert_eq!((d.deleted, d.header.unwrap().revision), (1, before + 1));
    assert_eq!(d.prev_kvs[0].value, b"1");
}

/// A range cut into pieces (as regions cut it) and merged answers exactly
/// what one read of the whole range answers, for every option etcd has.
#[test]
fn merged_pieces_answer_like_one_range() {
    let mut db = Db::new();
    for (i, k) in ["a", "b", "c", "d", "e", "f", "g", "h"].iter().enumerate() {
        db.put(k, &format!("{}", 7 - i));
    }
    db.put("c", "x");
    db.delete("e", "");
    db.put("a", "y");
    let now = db.rev;
    let snap = db.store.snapshot();
    type SetOption = Box<dyn Fn(&mut RangeRequest)>;
    let options: Vec<SetOption> = vec![
        Box::new(|_| {}),
        Box::new(|r| r.limit = 1),
        Box::new(|r| r.limit = 3),
        Box::new(|r| r.limit = 7),
        Box::new(|r| r.count_only = true),
        Box::new(|r| {
            r.keys_only = true;
            r.limit = 2
        }),
        Box::new(|r| {
            r.sort_order = SortOrder::Descend as i32;
            r.limit = 3
        }),
        Box::new(|r| {
            r.sort_target = SortTarget::Value as i32;
            r.limit = 4
        }),
        Box::new(|r| {
            r.sort_target = SortTarget::Mod as i32;
            r.sort_order = SortOrder::Descend as i32;
        }),
        Box::new(|r| {
            r.min_mod_revision = 9;
            r.limit = 1
        }),
        Box::new(|r| r.max_create_revision = 4),
        Box::new(|r| {
            r.sort_target = SortTarget::Create as i32;
            r.sort_order = SortOrder::Descend as i32;
            r.limit = 2
        }),
        Box::new(|r| {
            r.sort_target = SortTarget::Version as i32;
            r.limit = 1
        }),
        Box::new(|r| {
            r.sort_target = SortTarget::Value as i32;
            r.keys_only = true;
        }),
        Box::new(|r| {
            r.sort_target = SortTarget::Value as i32;
            r.sort_order = SortOrder::Descend as i32;
            r.keys_only = true;
            r.limit = 2;
        }),
    ];
    let cuts: [&[&str]; 4] = [
        &["d"],
        &["b", "f"],
        &["a0", "c", "c0", "g"],
        &["b", "c", "d", "e", "f", "g", "h"],
    ];
    for option in &options {
        let mut whole = RangeRequest {
            key: b"a".to_vec(),
            range_end: vec![0],
            ..Default::default()
        };
        option(&mut whole);
        let expected = exec::range(&snap, &whole, now).unwrap();
        for cut in cuts {
            let mut bounds: Vec<Vec<u8>> = vec![b"a".to_vec()];
            bounds.extend(cut.iter().map(|k| k.as_bytes().to_vec()));
            bounds.push(vec![0]);
            let parts = bounds
                .windows(2)
                .map(|w| {
                    let mut piece = exec::piece_request(&whole);
                    piece.key = w[0].clone();
                    piece.range_end = w[1].clone();
                    exec::range(&snap, &piece, now).unwrap()
                })
                .collect();
            let merged = exec::merge_ranges(&whole, parts);
            assert_eq!(merged, expected, "{whole:?} cut at {cut:?}");
        }
    }
}

#[test]
fn size_and_split_key_of_a_range() {
    let mut db = Db::new();
    for k in ["a", "b", "c", "d"] {
        db.put(k, "0123456789");
    }
    db.put("b", "0123456789");
    db.delete("d", "");
    let snap = db.store.snapshot();
    let all = snap.size_of(b"a", b"").unwrap();
    assert_eq!(all.keys, 4);
    let one = snap.size_of(b"a", b"b").unwrap();
    assert_eq!(one.keys, 1);
    assert!(one.bytes > 10 && all.bytes > 4 * one.bytes);
    assert_eq!(snap.size_of(b"x", b"").unwrap(), Default::default());
    // Half the keys: split before the third.
    assert_eq!(
        snap.split_key(b"a", b"", u64::MAX, 2).unwrap(),
        Some(b"c".to_vec())
    );
    // "b" has two versions: half the bytes are reached before "c" too.
    assert_eq!(
        snap.split_key(b"a", b"", all.bytes / 2, u64::MAX).unwrap(),
        Some(b"c".to_vec())
    );
    // Never at the range's start, never past its end.
    assert_eq!(
        snap.split_key(b"a", b"", 0, 0).unwrap(),
        Some(b"b".to_vec())
    );
    assert_eq!(snap.split_key(b"c", b"d", 0, 0).unwrap(), None);
    assert_eq!(snap.split_key(b"a", b"c", u64::MAX, 5).unwrap(), None);
}

fn leased_put(key: &str, lease: i64) -> WriteRequest {
    WriteRequest::Put(PutRequest {
        key: key.into(),
        value: b"v".to_vec(),
        lease,
        ..Default::default()
    })
}

#[test]
fn puts_attach_keys_and_revokes_delete_those_still_carrying_them() {
    let mut db = Db::new();
    assert_eq!(db.write(leased_put("a", 7)), Err(Error::LeaseNotFound));
    db.leases.held.insert(7, HeldLease::default());
    // A put with a lease attaches its key, after the key's change and
    // without a sub-revision of its own.
    let eval = exec::evaluate(
        &db.store.snapshot(),
        &leased_put("a", 7),
        NO_BOUNDS,
        &db.leases,
    )
    .unwrap();
    let ops: Vec<_> = eval
        .mutations
        .iter()
        .map(|m| (m.op(), m.key.clone(), m.value.clone()))
        .collect();
    assert_eq!(
        ops,
        vec![
            (Op::Put, b"a".to_vec(), b"v".to_vec()),
            (Op::Attach, owner_key(7), b"a".to_vec())
        ]
    );
    db.write(leased_put("a", 7)).unwrap();
    db.write(leased_put("b", 7)).unwrap();
    // b leaves the lease; c was attached and deleted.
    db.put("b", "free");
    db.write(leased_put("c", 7)).unwrap();
    db.delete("c", "");
    let keys = |ks: &[&str]| ks.iter().map(|k| k.as_bytes().to_vec()).collect::<Vec<_>>();
    db.leases.held.insert(
        7,
        HeldLease {
            keys: keys(&["a", "b", "c", "d"]),
            expired: false,
            revoking: false,
        },
    );
    let revoke = |ks: &[&str], expired| {
        WriteRequest::LeaseRevoke(LeaseRevoke {
            id: 7,
            keys: keys(ks),
            expired,
        })
    };
    // A key attached since the revoke listed them: list again.
    assert_eq!(
        db.write(revoke(&["a", "b", "c"], false)),
        Err(Error::LeaseKeysChanged)
    );
    // The revoke of an expired lease that is not.
    assert_eq!(
        db.write(revoke(&["a", "b", "c", "d"], true)),
        Err(Error::LeaseNotExpired)
    );
    assert_eq!(
        db.write(revoke(&["d"], false)),
        Err(Error::LeaseKeysChanged)
    );
    let before = db.rev;
    let resp = db.write(revoke(&["d", "c", "b", "a"], false)).unwrap();
    assert_eq!(
        resp,
        WriteResponse::LeaseRevoke {
            revision: before + 1
        }
    );
    let snap = db.store.snapshot();
    assert_eq!(
        snap.get(b"a", i64::MAX).unwrap(),
        None,
        "a still carried the lease"
    );
    assert_eq!(
        snap.get(b"b", i64::MAX).unwrap().map(|kv| kv.value),
        Some(b"free".to_vec())
    );
    let all = KeyRange::from_etcd(b"\0", b"\0");
    let events = snap.events(&all, before + 1, before + 1, 0, false).unwrap();
    assert_eq!(events.len(), 1, "only a is deleted: {events:?}");
    assert_eq!(
        events[0].kv.as_ref().map(|kv| kv.key.clone()),
        Some(b"a".to_vec())
    );
    drop(snap);
    // While a revoke is under way a put with the lease waits (retryable).
    db.leases.held.insert(
        8,
        HeldLease {
            revoking: true,
            ..Default::default()
        },
    );
    assert_eq!(db.write(leased_put("x", 8)), Err(Error::LeaseRevoking));
    db.leases.held.clear();
    assert_eq!(db.write(revoke(&[], false)), Err(Error::LeaseNotFound));
}
