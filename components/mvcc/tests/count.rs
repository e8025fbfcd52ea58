//! Counts of ranges (`count_only`, and the `count` of a limited range as
//! every page of a paged list carries it) against a model of the history:
//! at every revision, with deletes and re-creations, long histories, after
//! compaction, after a restart, after rebuilding the key index and after a
//! region snapshot replaced a key range.

use std::collections::BTreeMap;

use engine::{cf, KvEngine, WriteBatch};
use mvcc::exec;
use mvcc::{codec, KeyRange, MvccStore};
use proto::etcdserverpb::RangeRequest;
use proto::raft_cmdpb::{mutation::Op, Mutation};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A key's changes in revision order: the value put, `None` = deleted.
type KeyHistory = Vec<(i64, Option<Vec<u8>>)>;

/// What every key held after each revision.
#[derive(Default)]
struct Model {
    history: BTreeMap<Vec<u8>, KeyHistory>,
}

impl Model {
    fn live_at(&self, rev: i64) -> BTreeMap<Vec<u8>, (i64, Vec<u8>)> {
        let mut out = BTreeMap::new();
        for (k, versions) in &self.history {
            if let Some((r, Some(v))) = versions.iter().rev().find(|(r, _)| *r <= rev) {
                out.insert(k.clone(), (*r, v.clone()));
            }
        }
        out
    }

    fn current(&self, key: &[u8]) -> Option<(i64, i64, i64)> {
        // (create revision, version, mod revision) of the live key.
        let versions = self.history.get(key)?;
        let (mod_rev, value) = versions.last()?;
        value.as_ref()?;
        let since_create = versions
            .iter()
            .rev()
            .take_while(|(_, v)| v.is_some())
            .collect::<Vec<_>>();
        let create = since_create.last().map(|(r, _)| *r)?;
        Some((create, since_create.len() as i64, *mod_rev))
    }
}

struct Store {
    dir: tempfile::TempDir,
    store: MvccStore,
    rev: i64,
    model: Model,
}

impl Store {
    fn new() -> Store {
        let dir = tempfile::tempdir().unwrap();
        let store = MvccStore::new(KvEngine::open(&dir.path().join("kv")).unwrap());
        Store {
            dir,
            store,
            rev: 1,
            model: Model::default(),
        }
    }

    /// Closes and reopens the engine, as a node restart does.
    fn reopen(&mut self) {
        // RocksDB allows one open per directory: close it first (by
        // putting a scratch store in its place).
        let scratch = KvEngine::open(&self.dir.path().join("scratch")).unwrap();
        self.store = MvccStore::new(scratch);
        self.store = MvccStore::new(KvEngine::open(&self.dir.path().join("kv")).unwrap());
        self.store.build_key_index().unwrap();
    }

    /// One revision: puts (`Some`) and deletes (`None`) of distinct keys.
    fn commit(&mut self, changes: &[(&[u8], Option<&[u8]>)]) -> i64 {
        self.rev += 1;
        let mut mutations = Vec::new();
        for (sub, (key, value)) in changes.iter().enumerate() {
            let m = match value {
                Some(v) => {
                    let (create, version) = match self.model.current(key) {
                        Some((c, ver, _)) => (c, ver + 1),
                        None => (0, 1),
                    };
                    Mutation {
                        op: Op::Put as i32,
                        key: key.to_vec(),
                        sub: sub as u32,
                        create_revision: create,
                        version,
                        lease: 0,
                        value: v.to_vec(),
                    }
                }
                None => Mutation {
                    op: Op::Delete as i32,
                    key: key.to_vec(),
                    sub: sub as u32,
                    ..Default::default()
                },
            };
            mutations.push(m);
            self.model
                .history
                .entry(key.to_vec())
                .or_default()
                .push((self.rev, value.map(<[u8]>::to_vec)));
        }
        let mut wb = WriteBatch::default();
        self.store.stage_changes(&mut wb, self.rev, &mutations);
        self.store.engine().write(wb).unwrap();
        self.rev
    }

    fn put(&mut self, key: &str, value: &str) -> i64 {
        self.commit(&[(key.as_bytes(), Some(value.as_bytes()))])
    }

    fn delete(&mut self, key: &str) -> i64 {
        self.commit(&[(key.as_bytes(), None)])
    }

    fn count(&self, start: &[u8], end: &[u8], rev: i64) -> usize {
        let range = KeyRange::from_etcd(start, end);
        self.store
            .snapshot()
            .range(&range, rev, 0, false)
            .unwrap()
            .count
    }

    /// Checks every count the store gives for `[start, end)` at `rev`
    /// (count only, and with every limit up to a few) against the model.
    fn check_range(&self, start: &[u8], end: &[u8], rev: i64) {
        let live = self.model.live_at(rev);
        let range = KeyRange::from_etcd(start, end);
        let expected: Vec<_> = live.iter().filter(|(k, _)| range.contains(k)).collect();
        let snap = self.store.snapshot();
        let what = format!(
            "[{}, {}) at {rev}",
            start.escape_ascii(),
            end.escape_ascii()
        );
        assert_eq!(
            snap.range(&range, rev, 0, false).unwrap().count,
            expected.len(),
            "count_only of {what}"
        );
        for limit in [0, 1, 2, 3, 7] {
            let found = snap.range(&range, rev, limit, true).unwrap();
            assert_eq!(
                found.count,
                expected.len(),
                "count with limit {limit} of {what}"
            );
            let want = if limit == 0 {
                expected.len()
            } else {
                limit.min(expected.len())
            };
            let got: Vec<_> = found
                .kvs
                .iter()
                .map(|kv| (kv.key.clone(), kv.mod_revision, kv.value.clone()))
                .collect();
            let model: Vec<_> = expected
                .iter()
                .take(want)
                .map(|(k, (r, v))| ((*k).clone(), *r, v.clone()))
                .collect();
            assert_eq!(got, model, "keys with limit {limit} of {what}");
        }
    }

    fn check_all(&self, from_rev: i64) {
        for rev in from_rev..=self.rev + 1 {
            self.check_range(b"a", b"\0", rev);
            self.check_range(b"b", b"d", rev);
            self.check_range(b"c", b"", rev);
            self.check_range(b"k03", b"k11", rev);
        }
        self.store.snapshot().check_key_index().unwrap();
    }
}

#[test]
fn counts_at_every_revision_with_deletes_and_recreations() {
    let mut s = Store::new();
    s.put("a", "1"); // 2
    s.put("b", "1"); // 3
    s.put("c", "1"); // 4
    s.put("b", "2"); // 5
    s.delete("a"); // 6
    s.put("a", "again"); // 7
    s.delete("c"); // 8
    s.commit(&[(b"d", Some(b"1")), (b"b", None)]); // 9
    s.put("c", "back"); // 10
    assert_eq!(s.count(b"a", b"\0", 1), 0);
    assert_eq!(s.count(b"a", b"\0", 4), 3);
    assert_eq!(s.count(b"a", b"\0", 6), 2);
    assert_eq!(s.count(b"a", b"\0", 8), 2);
    assert_eq!(s.count(b"a", b"\0", 9), 2);
    assert_eq!(s.count(b"a", b"\0", 10), 3);
    assert_eq!(s.count(b"b", b"", 8), 1, "a single key");
    assert_eq!(s.count(b"b", b"", 9), 0, "a single deleted key");
    assert_eq!(s.count(b"c", b"", 9), 0);
    assert_eq!(s.count(b"c", b"", 10), 1);
    s.check_all(1);
}

#[test]
fn counts_keys_with_long_histories() {
    // More versions per key than the walk steps over before seeking, on
    // keys next to ones with a single version.
    let mut s = Store::new();
    for round in 0..30 {
        s.put("b", &format!("v{round}"));
        if round % 7 == 3 {
            s.delete("c");
        } else {
            s.put("c", &format!("v{round}"));
        }
        if round % 10 == 0 {
            s.put(&format!("k{round:02}"), "x");
        }
    }
    s.put("a", "1");
    s.put("d", "1");
    s.check_all(1);
}

#[test]
fn random_histories_match_the_model() {
    for seed in 0..4 {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut s = Store::new();
        let keys: Vec<String> = (0..24).map(|i| format!("k{i:02}")).collect();
        for _ in 0..300 {
            let n = rng.gen_range(1..4);
            let mut picked: Vec<&String> = Vec::new();
            while picked.len() < n {
                let k = &keys[rng.gen_range(0..keys.len())];
                if !picked.contains(&k) {
                    picked.push(k);
                }
            }
            let changes: Vec<(&[u8], Option<&[u8]>)> = picked
                .iter()
                .map(|k| {
                    let v: Option<&[u8]> = if rng.gen_bool(0.3) { None } else { Some(b"v") };
                    (k.as_bytes(), v)
                })
                .collect();
            s.commit(&changes);
        }
        for rev in (1..=s.rev).step_by(7) {
            for _ in 0..4 {
                let a = rng.gen_range(0..keys.len());
                let b = rng.gen_range(a..=keys.len());
                let end = keys.get(b).map(String::as_bytes).unwrap_or(b"\0");
                s.check_range(keys[a].as_bytes(), end, rev);
            }
        }
        // Compaction keeps every count at or above its revision.
        let compact = s.rev / 2;
        s.store.compact(compact, b"", b"").unwrap();
        for rev in compact..=s.rev {
            s.check_range(b"k", b"l", rev);
            s.check_range(b"k05", b"k17", rev);
        }
        s.store.snapshot().check_key_index().unwrap();
    }
}

#[test]
fn compaction_drops_deleted_keys_from_the_index() {
    let mut s = Store::new();
    s.put("a", "1");
    s.put("b", "1");
    s.put("b", "2");
    s.delete("a");
    let compacted = s.put("c", "1");
    s.put("b", "3");
    s.store.compact(compacted, b"", b"").unwrap();
    s.store.snapshot().check_key_index().unwrap();
    // Only b@4, b@7 and c@6 are left, in both column families.
    let snap = s.store.snapshot();
    let mut it = snap
        .kv()
        .iter(cf::MVCC_KEYS, &codec::mvcc_lower_bound(b""), &[]);
    it.seek_to_first();
    let mut left = Vec::new();
    while let Some(k) = it.key() {
        left.push(codec::decode_mvcc_key(k).unwrap());
        it.next();
    }
    assert_eq!(
        left,
        vec![(b"b".to_vec(), 7), (b"b".to_vec(), 4), (b"c".to_vec(), 6)]
    );
    for rev in compacted..=s.rev {
        s.check_range(b"a", b"\0", rev);
    }
}

#[test]
fn paged_list_counts_the_rest_at_the_first_pages_revision() {
    let mut s = Store::new();
    for i in 0..50 {
        s.put(&format!("/pods/p{i:03}"), "v");
    }
    // Some history after the list's revision: it must not show.
    let list_rev = s.rev;
    for i in (0..50).step_by(3) {
        s.delete(&format!("/pods/p{i:03}"));
    }
    for i in 50..60 {
        s.put(&format!("/pods/p{i:03}"), "v");
    }
    let snap = s.store.snapshot();
    let mut key = b"/pods/".to_vec();
    let (mut listed, mut pages) = (0, 0);
    loop {
        let resp = exec::range(
            &snap,
            &RangeRequest {
                key: key.clone(),
                range_end: b"/pods0".to_vec(),
                limit: 7,
                ..Default::default()
            },
            list_rev,
        )
        .unwrap();
        assert_eq!(resp.count, 50 - listed, "page {pages}");
        listed += resp.kvs.len() as i64;
        pages += 1;
        if !resp.more {
            break;
        }
        key = resp.kvs.last().unwrap().key.clone();
        key.push(0);
    }
    assert_eq!((listed, pages), (50, 8));
    // count_only at the newest revision sees the later changes.
    let resp = exec::range(
        &snap,
        &RangeRequest {
            key: b"/pods/".to_vec(),
            range_end: b"/pods0".to_vec(),
            count_only: true,
            ..Default::default()
        },
        s.rev,
    )
    .unwrap();
    assert_eq!((resp.count, resp.kvs.len()), (50 - 17 + 10, 0));
}

#[test]
fn counts_survive_a_restart_and_an_index_rebuild() {
    let mut s = Store::new();
    for i in 0..20 {
        s.put(&format!("k{i:02}"), "v");
    }
    for i in (0..20).step_by(4) {
        s.delete(&format!("k{i:02}"));
    }
    s.put("k04", "back");
    s.reopen();
    s.check_all(1);
    // A store written before the index existed: no entries, no marker.
    let mut wb = WriteBatch::default();
    let engine = s.store.engine();
    engine.delete_range_to(&mut wb, cf::MVCC_KEYS, b"", &[0xff; 32]);
    engine.write(wb).unwrap();
    assert!(s.store.snapshot().check_key_index().is_err());
    assert!(s.store.build_key_index().unwrap(), "built");
    assert!(!s.store.build_key_index().unwrap(), "built once only");
    s.check_all(1);
    s.reopen();
    s.check_all(1);
}

#[test]
fn replacing_a_key_range_keeps_the_index() {
    // What a region snapshot install does: clear the region's range, then
    // write the snapshot's version records.
    let mut source = Store::new();
    let mut target = Store::new();
    for i in 0..10 {
        source.put(&format!("m{i}"), "from the leader");
        target.put(&format!("m{i}"), "stale");
        target.put(&format!("z{i}"), "outside");
    }
    source.delete("m3");
    let records: Vec<(Vec<u8>, Vec<u8>)> = {
        let snap = source.store.snapshot();
        let mut it = snap.kv().iter(cf::MVCC, &[], &[]);
        it.seek_to_first();
        let mut out = Vec::new();
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            out.push((k.to_vec(), v.to_vec()));
            it.next();
        }
        out
    };
    for end in [&b"n"[..], b""] {
        let mut wb = WriteBatch::default();
        target.store.stage_clear(&mut wb, b"m", end).unwrap();
        for (k, v) in &records {
            target.store.stage_version_record(&mut wb, k, v);
        }
        target.store.engine().write(wb).unwrap();
        target.store.snapshot().check_key_index().unwrap();
        let at = source.rev;
        let expected_outside = if end.is_empty() { 0 } else { 10 };
        assert_eq!(target.count(b"m", b"n", at), 9);
        assert_eq!(target.count(b"z", b"\0", i64::MAX), expected_outside);
    }
}
