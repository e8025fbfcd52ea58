//! Physical compaction, hashing and version listing of a key range on a
//! node that holds other ranges' data too, and records of the old format
//! (without sub-revisions) still readable, compactable and hashable.

use engine::{cf, KvEngine, WriteBatch};
use mvcc::codec::{self, Version};
use mvcc::{KeyRange, MvccStore};
use proto::raft_cmdpb::{mutation::Op, Mutation};

struct Db {
    _dir: tempfile::TempDir,
    store: MvccStore,
    rev: i64,
    /// Write records in the old format (as an older version did).
    legacy: bool,
}

impl Db {
    fn new() -> Db {
        let dir = tempfile::tempdir().unwrap();
        let engine = KvEngine::open(&dir.path().join("kv")).unwrap();
        Db {
            _dir: dir,
            store: MvccStore::new(engine),
            rev: 1,
            legacy: false,
        }
    }

    /// One revision with `changes` (key, Some(value) = put, None = delete),
    /// sub-revisions in order.
    fn write(&mut self, changes: &[(&str, Option<&str>)]) -> i64 {
        self.rev += 1;
        let mutations: Vec<Mutation> = changes
            .iter()
            .enumerate()
            .map(|(sub, (k, v))| {
                let mut m = Mutation {
                    key: k.as_bytes().to_vec(),
                    sub: sub as u32,
                    version: 1,
                    value: v.unwrap_or_default().as_bytes().to_vec(),
                    ..Default::default()
                };
                m.set_op(if v.is_some() { Op::Put } else { Op::Delete });
                m
            })
            .collect();
        let engine = self.store.engine();
        let mut wb = WriteBatch::default();
        if self.legacy {
            for m in &mutations {
                let version = if m.op() == Op::Put {
                    Version::Put {
                        create_revision: self.rev,
                        version: m.version,
                        lease: 0,
                        value: m.value.clone(),
                    }
                } else {
                    Version::Tombstone
                };
                let key = codec::mvcc_key(&m.key, self.rev);
                engine.put_to(&mut wb, cf::MVCC, &key, &version.encode_legacy());
                let rev_key = codec::revision_key(self.rev, m.sub);
                engine.put_to(&mut wb, cf::REVISION, &rev_key, &m.key);
            }
        } else {
            self.store.stage_changes(&mut wb, self.rev, &mutations);
        }
        engine.write(wb).unwrap();
        self.rev
    }

    fn put(&mut self, k: &str, v: &str) -> i64 {
        self.write(&[(k, Some(v))])
    }

    fn get(&self, k: &str, rev: i64) -> Option<String> {
        let kv = self.store.snapshot().get(k.as_bytes(), rev).unwrap()?;
        Some(String::from_utf8(kv.value).unwrap())
    }

    fn hash(&self, rev: i64, compacted: i64, lower: &str, upper: &str) -> u32 {
        self.store
            .snapshot()
            .hash(rev, compacted, lower.as_bytes(), upper.as_bytes())
            .unwrap()
    }

    /// Every (revision, sub, key) of the revision CF.
    fn revision_index(&self) -> Vec<(i64, u32, String)> {
        let kv = self.store.engine();
        let mut it = kv.iter(cf::REVISION, &[], &[]);
        it.seek_to_first();
        let mut out = Vec::new();
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            let (rev, sub) = codec::decode_revision_key(k).unwrap();
            out.push((rev, sub, String::from_utf8(v.to_vec()).unwrap()));
            it.next();
        }
        out
    }

    /// Every (key, revision) of the MVCC CF.
    fn versions(&self) -> Vec<(String, i64)> {
        let kv = self.store.engine();
        let mut it = kv.iter(cf::MVCC, &[], &[]);
        it.seek_to_first();
        let mut out = Vec::new();
        while let Some(k) = it.key() {
            let (key, rev) = codec::decode_mvcc_key(k).unwrap();
            out.push((String::from_utf8(key).unwrap(), rev));
            it.next();
        }
        out
    }
}

/// A history over keys `a…`, `m…` and `z…`, as three regions of one node
/// would hold it, with several changes per revision.
fn interleaved(db: &mut Db) -> i64 {
    for i in 0..5 {
        let v = format!("v{i}");
        db.write(&[("a1", Some(&v)), ("m1", Some(&v)), ("z1", Some(&v))]);
        db.write(&[("m2", Some(&v)), ("a2", Some(&v))]);
        if i == 2 {
            db.write(&[("m2", None), ("z1", None)]);
        }
    }
    db.rev
}

#[test]
fn compaction_of_a_range_leaves_other_ranges_alone() {
    let mut db = Db::new();
    let compact_at = interleaved(&mut db) - 1;
    db.put("m1", "late");
    let before: Vec<_> = db.versions();
    let hash_m = db.hash(db.rev, compact_at, "m", "n");
    let hash_a = db.hash(db.rev, 0, "a", "b");
    let stats = db.store.compact(compact_at, b"m", b"n").unwrap();
    assert_eq!(stats.keys, 2);
    assert!(stats.versions_removed > 0);
    let after = db.versions();
    // Only `m` keys lost versions.
    let lost: Vec<_> = before.iter().filter(|v| !after.contains(v)).collect();
    assert!(!lost.is_empty());
    assert!(lost.iter().all(|(k, _)| k.starts_with('m')), "{lost:?}");
    // Their revision CF entries went with them, nothing else's did.
    let index = db.revision_index();
    for (k, rev) in &after {
        assert!(
            index.iter().any(|(r, _, key)| r == rev && key == k),
            "{k}@{rev} lost its index entry"
        );
    }
    assert_eq!(index.len(), after.len());
    // Reads at and above the compaction revision, hashes, other ranges:
    // unchanged.
    assert_eq!(db.hash(db.rev, compact_at, "m", "n"), hash_m);
    assert_eq!(db.hash(db.rev, 0, "a", "b"), hash_a);
    assert_eq!(db.get("m1", compact_at).as_deref(), Some("v4"));
    assert_eq!(db.get("m1", db.rev).as_deref(), Some("late"));
    assert_eq!(db.get("a1", 2).as_deref(), Some("v0"));
    // Incremental: once more at the same revision removes nothing; a later
    // one removes just what became superseded.
    let again = db.store.compact(compact_at, b"m", b"n").unwrap();
    assert_eq!((again.versions_removed, again.versions_kept), (0, 2));
    let later = db.store.compact(db.rev, b"m", b"n").unwrap();
    assert_eq!(later.versions_removed, 2);
    assert_eq!(db.get("m1", db.rev).as_deref(), Some("late"));
}

#[test]
fn hash_of_a_range_depends_on_its_keys_only() {
    let mut mixed = Db::new();
    let mut alone = Db::new();
    interleaved(&mut mixed);
    // The same history of `m` keys at the same revisions, nothing else.
    for i in 0..5 {
        let v = format!("v{i}");
        alone.write(&[("m1", Some(&v))]);
        alone.write(&[("m2", Some(&v))]);
        if i == 2 {
            alone.write(&[("m2", None)]);
        }
    }
    assert_eq!(mixed.rev, alone.rev);
    for compacted in [0, 5, 9, mixed.rev] {
        assert_eq!(
            mixed.hash(mixed.rev, compacted, "m", "n"),
            alone.hash(alone.rev, compacted, "", ""),
            "compacted at {compacted}"
        );
    }
    assert_ne!(
        mixed.hash(mixed.rev, 0, "m", "n"),
        mixed.hash(mixed.rev - 1, 0, "m", "n")
    );
}

#[test]
fn old_format_records_are_read_listed_compacted_and_hashed_alike() {
    let mut old = Db::new();
    old.legacy = true;
    let mut new = Db::new();
    for db in [&mut old, &mut new] {
        interleaved(db);
    }
    // A node upgraded mid-history: it builds the key index when it starts,
    // and later writes are in the new format.
    old.legacy = false;
    assert!(old.store.build_key_index().unwrap());
    old.put("m1", "after-upgrade");
    new.put("m1", "after-upgrade");
    let rev = new.rev;
    assert_eq!(old.get("m1", 3).as_deref(), Some("v0"));
    assert_eq!(old.get("m2", 9), None);
    let all = KeyRange::from_etcd(b"\0", b"\0");
    let events = |db: &Db| db.store.snapshot().events(&all, 1, rev, 0, true).unwrap();
    assert_eq!(events(&old), events(&new));
    let count = |db: &Db| {
        db.store
            .snapshot()
            .range(&all, rev, 0, false)
            .unwrap()
            .count
    };
    assert_eq!(count(&old), count(&new));
    // Same content, whatever the format: same hash.
    for compacted in [0, 7, rev] {
        assert_eq!(
            old.hash(rev, compacted, "", ""),
            new.hash(rev, compacted, "", "")
        );
    }
    // The versions a snapshot carries come out in the new format with
    // their revision CF keys.
    let listed = |db: &Db| {
        let mut out = Vec::new();
        db.store
            .snapshot()
            .versions(b"", b"", |k, v, rev_key| {
                out.push((k.to_vec(), v.to_vec(), rev_key.map(<[u8]>::to_vec)));
                Ok::<_, mvcc::Error>(())
            })
            .unwrap();
        out
    };
    assert_eq!(listed(&old), listed(&new));
    assert!(listed(&old).iter().all(|(_, _, r)| r.is_some()));
    // Compaction finds the old records' revision CF entries too.
    let compact_at = rev - 3;
    let hash = old.hash(rev, compact_at, "", "");
    let stats_old = old.store.compact(compact_at, b"", b"").unwrap();
    let stats_new = new.store.compact(compact_at, b"", b"").unwrap();
    assert_eq!(stats_old, stats_new);
    assert_eq!(old.revision_index(), new.revision_index());
    assert_eq!(old.versions(), new.versions());
    assert_eq!(old.revision_index().len(), old.versions().len());
    assert_eq!(old.hash(rev, compact_at, "", ""), hash);
}
