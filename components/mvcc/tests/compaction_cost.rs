//! Cost of a region's compaction, hashing and change listing on a node
//! holding many regions (a measurement, not a check: run with
//! `cargo test -p mvcc --release --test compaction_cost -- --ignored --nocapture`;
//! figures in docs/performance.md). `COST_REGIONS`, `COST_KEYS` (per
//! region) and `COST_VERSIONS` (per key) size the data.
//!
//! "before" re-implements what compaction and hashing did until the
//! sub-revision was stored in the version record: a walk of the node's
//! whole revision CF up to the revision, filtered by the region's keys, with
//! a seek into the MVCC CF per version of the region.

use std::time::{Duration, Instant};

use engine::{cf, KvEngine, WriteBatch};
use mvcc::{codec, KeyRange, MvccStore};
use proto::raft_cmdpb::{mutation::Op, Mutation};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn region_bounds(i: usize, regions: usize) -> (Vec<u8>, Vec<u8>) {
    let start = if i == 0 {
        Vec::new()
    } else {
        format!("r{i:04}").into_bytes()
    };
    let end = if i + 1 == regions {
        Vec::new()
    } else {
        format!("r{:04}", i + 1).into_bytes()
    };
    (start, end)
}

/// The old compaction: a walk of the node's whole revision CF up to
/// `rev`, deleting the region's versions a read at `rev` cannot see, then
/// RocksDB compactions of the whole MVCC CF and of the revision CF up to
/// `rev`.
fn before_compact(store: &MvccStore, rev: i64, lower: &[u8], upper: &[u8]) -> usize {
    let view = store.snapshot();
    let start = codec::revision_key(1, 0);
    let end = codec::revision_key(rev + 1, 0);
    let mut it = view.kv().iter(cf::REVISION, &start, &end);
    it.seek(start);
    let mut batch = WriteBatch::default();
    let mut doomed = 0;
    while let (Some(k), Some(user_key)) = (it.key(), it.value()) {
        if user_key >= lower && (upper.is_empty() || user_key < upper) {
            let (version_rev, _) = codec::decode_revision_key(k).unwrap();
            if !before_visible(&view, user_key, version_rev, rev) {
                let engine = store.engine();
                engine.delete_from(
                    &mut batch,
                    cf::MVCC,
                    &codec::mvcc_key(user_key, version_rev),
                );
                engine.delete_from(&mut batch, cf::REVISION, k);
                doomed += 1;
            }
        }
        it.next();
    }
    store.engine().write(batch).unwrap();
    drop(it);
    drop(view);
    if doomed > 0 {
        store.engine().compact_range(cf::MVCC, None, None);
        store
            .engine()
            .compact_range(cf::REVISION, Some(&start), Some(&end));
    }
    doomed
}

fn before_visible(view: &mvcc::MvccSnapshot<'_>, key: &[u8], version_rev: i64, rev: i64) -> bool {
    let lower = codec::mvcc_lower_bound(key);
    let upper = codec::mvcc_key_end(key);
    let mut it = view.kv().iter(cf::MVCC, &lower, &upper);
    it.seek(codec::mvcc_key(key, rev));
    match it.key() {
        Some(raw) => {
            codec::decode_mvcc_key(raw).unwrap().1 == version_rev
                && !codec::is_tombstone(it.value().unwrap())
        }
        None => false,
    }
}

fn before_hash(store: &MvccStore, rev: i64, compacted: i64, lower: &[u8], upper: &[u8]) -> u32 {
    let view = store.snapshot();
    let mut hasher = crc32fast::Hasher::new();
    let start = codec::revision_key(1, 0);
    let end = codec::revision_key(rev + 1, 0);
    let mut it = view.kv().iter(cf::REVISION, &start, &end);
    it.seek(start);
    while let (Some(k), Some(user_key)) = (it.key(), it.value()) {
        if user_key >= lower && (upper.is_empty() || user_key < upper) {
            let (version_rev, _) = codec::decode_revision_key(k).unwrap();
            if version_rev > compacted || before_visible(&view, user_key, version_rev, compacted) {
                let value = view
                    .kv()
                    .get(cf::MVCC, &codec::mvcc_key(user_key, version_rev))
                    .unwrap()
                    .unwrap_or_default();
                hasher.update(k);
                hasher.update(user_key);
                hasher.update(&value);
            }
        }
        it.next();
    }
    hasher.finalize()
}

/// Change listing by a walk of the range's MVCC keys (the alternative to
/// the revision CF): versions in `[from, to]`, sorted by revision and sub.
fn events_by_key_walk(store: &MvccStore, lower: &[u8], upper: &[u8], from: i64, to: i64) -> usize {
    let view = store.snapshot();
    let lo = codec::mvcc_lower_bound(lower);
    let up = codec::mvcc_upper_bound(upper);
    let mut it = view.kv().iter(cf::MVCC, &lo, &up);
    it.seek(&lo);
    let mut found = Vec::new();
    while let (Some(k), Some(v)) = (it.key(), it.value()) {
        let (key, rev) = codec::decode_mvcc_key(k).unwrap();
        if rev > to {
            it.seek(codec::mvcc_key(&key, to));
            continue;
        }
        if rev < from {
            it.seek(codec::mvcc_key_end(&key));
            continue;
        }
        found.push((rev, codec::record_sub(v).unwrap(), key));
        it.next();
    }
    found.sort();
    found.len()
}

/// Writes the history (see the test) and returns the last revision.
fn fill(store: &MvccStore, regions: usize, keys: usize, versions: usize) -> i64 {
    // Every revision writes one key of every region: the node's revision
    // order interleaves all regions, as writes spread over regions do.
    let mut rev = 1;
    for v in 0..versions {
        for k in 0..keys {
            rev += 1;
            let mut wb = WriteBatch::default();
            let mutations: Vec<Mutation> = (0..regions)
                .map(|r| {
                    let mut m = Mutation {
                        key: format!("r{r:04}/{k:06}").into_bytes(),
                        sub: r as u32,
                        version: v as i64 + 1,
                        create_revision: if v == 0 { 0 } else { 2 + k as i64 },
                        value: vec![b'x'; 100],
                        ..Default::default()
                    };
                    m.set_op(Op::Put);
                    m
                })
                .collect();
            store.stage_changes(&mut wb, rev, &mutations);
            store.engine().write(wb).unwrap();
        }
    }
    store.engine().compact_range(cf::MVCC, None, None);
    store.engine().compact_range(cf::REVISION, None, None);
    rev
}

fn per_region(regions: usize, mut f: impl FnMut(&[u8], &[u8])) -> Duration {
    let started = Instant::now();
    for i in 0..regions {
        let (start, end) = region_bounds(i, regions);
        f(&start, &end);
    }
    started.elapsed()
}

#[test]
#[ignore]
fn compaction_and_hash_cost_with_many_regions() {
    let regions = env("COST_REGIONS", 64);
    let keys = env("COST_KEYS", 200);
    let versions = env("COST_VERSIONS", 10);
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let stores: Vec<MvccStore> = dirs
        .iter()
        .map(|d| MvccStore::new(KvEngine::open(&d.path().join("kv")).unwrap()))
        .collect();
    let mut rev = 1;
    for store in &stores {
        rev = fill(store, regions, keys, versions);
    }
    let (old, store) = (&stores[0], &stores[1]);
    let total = regions * keys * versions;
    println!("{regions} regions x {keys} keys x {versions} versions = {total} versions");
    let compact_at = rev - keys as i64; // the last round of versions stays
    let hash_before = per_region(regions, |s, e| {
        before_hash(old, rev, compact_at, s, e);
    });
    let hash_after = per_region(regions, |s, e| {
        store.snapshot().hash(rev, compact_at, s, e).unwrap();
    });
    println!(
        "hash of every region: before {:?}, after {:?}",
        hash_before, hash_after
    );
    let compact_before = per_region(regions, |s, e| {
        before_compact(old, compact_at, s, e);
    });
    let compact_after = per_region(regions, |s, e| {
        store.compact(compact_at, s, e).unwrap();
    });
    println!("compaction of every region: before {compact_before:?}, after {compact_after:?}");
    let next = compact_at + keys as i64 / 2;
    let again_before = per_region(regions, |s, e| {
        before_compact(old, next, s, e);
    });
    let again_after = per_region(regions, |s, e| {
        store.compact(next, s, e).unwrap();
    });
    println!(
        "next compaction (half the keys changed since) of every region: before {again_before:?}, after {again_after:?}"
    );
    // Both removed the same versions.
    let count = |s: &MvccStore| {
        let mut n = 0;
        s.snapshot()
            .versions(b"", b"", |_, _, _| {
                n += 1;
                Ok::<_, mvcc::Error>(())
            })
            .unwrap();
        n
    };
    assert_eq!(count(old), count(store));

    // Change listing of one region over the newest 1% of revisions: the
    // revision CF window (what events() does) against a walk of the
    // region's keys.
    let from = rev - (rev / 100).max(1);
    let (start, end) = region_bounds(regions / 2, regions);
    let range = KeyRange {
        start: start.clone(),
        end: Some(end.clone()),
    };
    let t = Instant::now();
    let n = store
        .snapshot()
        .events(&range, from, rev, 0, false)
        .unwrap()
        .len();
    let by_index = t.elapsed();
    let t = Instant::now();
    let m = events_by_key_walk(store, &start, &end, from, rev);
    let by_keys = t.elapsed();
    assert_eq!(n, m);
    println!(
        "events of one region, newest 1% of revisions ({n} events): revision CF {by_index:?}, key walk {by_keys:?}"
    );
    let t = Instant::now();
    let n = store
        .snapshot()
        .events(&range, 1, rev, 0, false)
        .unwrap()
        .len();
    let by_index = t.elapsed();
    let t = Instant::now();
    let m = events_by_key_walk(store, &start, &end, 1, rev);
    let by_keys = t.elapsed();
    assert_eq!(n, m);
    println!(
        "events of one region, all revisions ({n} events): revision CF {by_index:?}, key walk {by_keys:?}"
    );
}
