//! Physical compaction and hashing of a key range's history, by a walk of
//! the range's MVCC CF keys.
//!
//! The versions of one key are contiguous in the MVCC CF and newest first
//! (see [`codec`]), so what a compaction at revision `R` keeps of a key —
//! its newest version at or below `R` unless that is a tombstone, and every
//! version above `R` — is found by one seek per key, and the work is
//! bounded by the range: other regions' keys on the same node are never
//! read. A version's revision CF entry is deleted with it, found from the
//! sub-revision in its record (the old record format has none: it is
//! looked up under the version's revision in the revision CF).
//!
//! Edge cases:
//! * A compaction is incremental in effect: after one at `R1` finished,
//!   every key holds at most one version at or below `R1`, so one at `R2`
//!   reads per key that version and the ones in `(R1, R2]` (plus a seek
//!   past the ones above `R2`). Running one again, or one below the last,
//!   removes nothing.
//! * Versions of one key are deleted oldest first (a tombstone last), and a
//!   key's deletions may span write batches, so a crash half way never
//!   makes an older version visible again.
//! * A version whose revision CF entry is missing (nothing writes such a
//!   thing, but a partial older clean-up could have) is deleted anyway.
//! * Hashing reads versions above `rev` not at all, and of the ones at or
//!   below the compaction revision only the survivor: the result does not
//!   depend on how far a physical clean-up has got, nor on the record
//!   format a replica holds a version in.

use engine::{cf, WriteBatch};

use crate::codec;
use crate::store::{MvccSnapshot, MvccStore};
use crate::Result;

/// Counts of a physical compaction.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct CompactStats {
    /// Keys of the range with at least one version.
    pub keys: usize,
    pub versions_removed: usize,
    /// Versions at or below the compaction revision that stay (one per
    /// key at most).
    pub versions_kept: usize,
}

const COMPACT_BATCH: usize = 1024;

/// The CRC32 of a key range's hash stream (see [`MvccSnapshot::hash`]) and
/// the stream's length in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RangeHash {
    pub crc: u32,
    pub len: u64,
}

impl RangeHash {
    /// The hash of this range's stream followed by `next`'s: for adjacent
    /// ranges in key order, the hash of their union.
    pub fn combine(self, next: RangeHash) -> RangeHash {
        let mut h = crc32fast::Hasher::new_with_initial_len(self.crc, self.len);
        h.combine(&crc32fast::Hasher::new_with_initial_len(next.crc, next.len));
        RangeHash {
            len: h.total_len(),
            crc: h.finalize(),
        }
    }
}

/// Where a walk over a key's versions is.
struct KeyWalk {
    key: Vec<u8>,
    /// The newest version at or below the compaction revision was seen.
    past_survivor: bool,
}

impl MvccStore {
    /// Physically removes, for keys in `[lower, upper)` (`upper` empty =
    /// unbounded), every version that no read at or above `rev` can see:
    /// versions superseded at or before `rev`, and tombstones at or before
    /// `rev` with everything older. Reads at `rev` itself still work. See
    /// the module docs for cost and crash safety.
    pub fn compact(&self, rev: i64, lower: &[u8], upper: &[u8]) -> Result<CompactStats> {
        let lo = codec::mvcc_lower_bound(lower);
        let up = codec::mvcc_upper_bound(upper);
        let stats = self.delete_compacted(rev, &lo, &up)?;
        // After the read view is gone: RocksDB keeps what a live snapshot
        // can see, deleted or not. Only the range's own MVCC keys: the
        // revision CF entries deleted are spread over the node's whole
        // revision order, and compacting that for every region would cost
        // what this walk saves; RocksDB's own compactions drop them.
        if stats.versions_removed > 0 {
            let up = (!up.is_empty()).then_some(up.as_slice());
            self.engine().compact_range(cf::MVCC, Some(&lo), up);
            self.engine().compact_range(cf::MVCC_KEYS, Some(&lo), up);
        }
        Ok(stats)
    }

    fn delete_compacted(&self, rev: i64, lo: &[u8], up: &[u8]) -> Result<CompactStats> {
        let mut stats = CompactStats::default();
        // What is deleted here is invisible to every read at or above `rev`,
        // so reading a snapshot taken now is as good as the live data.
        let view = self.snapshot();
        let mut it = view.kv.iter(cf::MVCC, lo, up);
        it.seek(lo);
        let mut batch = WriteBatch::default();
        let mut staged = 0;
        let mut walk: Option<KeyWalk> = None;
        // The current key's versions to delete, newest first.
        let mut doomed: Vec<(i64, Vec<u8>)> = Vec::new();
        loop {
            let entry = match (it.key(), it.value()) {
                (Some(k), Some(v)) => Some((codec::decode_mvcc_key(k)?, v)),
                _ => None,
            };
            let same_key = matches!((&entry, &walk), (Some(((k, _), _)), Some(w)) if *k == w.key);
            if !same_key {
                if let Some(w) = walk.take() {
                    // Oldest first.
                    for (version_rev, raw) in doomed.drain(..).rev() {
                        self.stage_delete(&view, &mut batch, &w.key, version_rev, &raw)?;
                        stats.versions_removed += 1;
                        staged += 1;
                        if staged >= COMPACT_BATCH {
                            self.engine().write(std::mem::take(&mut batch))?;
                            staged = 0;
                        }
                    }
                }
            }
            let Some(((key, version_rev), raw)) = entry else {
                break;
            };
            if !same_key {
                stats.keys += 1;
                walk = Some(KeyWalk {
                    key,
                    past_survivor: false,
                });
            }
            let Some(w) = walk.as_mut() else {
                break;
            };
            if version_rev > rev {
                // Skip the versions above `rev` at once.
                it.seek(codec::mvcc_key(&w.key, rev));
                continue;
            }
            if w.past_survivor {
                doomed.push((version_rev, raw.to_vec()));
            } else {
                w.past_survivor = true;
                if codec::is_tombstone(raw) {
                    doomed.push((version_rev, raw.to_vec()));
                } else {
                    stats.versions_kept += 1;
                }
            }
            it.next();
        }
        it.status()?;
        self.engine().write(batch)?;
        Ok(stats)
    }

    /// Stages the deletion of `key`'s version at `version_rev` (record
    /// `raw`), its key index entry and its revision CF entry.
    fn stage_delete(
        &self,
        view: &MvccSnapshot<'_>,
        batch: &mut WriteBatch,
        key: &[u8],
        version_rev: i64,
        raw: &[u8],
    ) -> Result<()> {
        let engine = self.engine();
        let mvcc_key = codec::mvcc_key(key, version_rev);
        engine.delete_from(batch, cf::MVCC, &mvcc_key);
        engine.delete_from(batch, cf::MVCC_KEYS, &mvcc_key);
        let sub = match codec::record_sub(raw)? {
            Some(sub) => Some(sub),
            None => view.legacy_sub(key, version_rev)?,
        };
        if let Some(sub) = sub {
            engine.delete_from(batch, cf::REVISION, &codec::revision_key(version_rev, sub));
        }
        Ok(())
    }
}

impl MvccSnapshot<'_> {
    /// CRC32 of the history of keys in `[lower, upper)` up to `rev`, as a
    /// compaction at `compact_rev` leaves it: per key in key order, its
    /// versions newest first, each as key, revision and content. Independent
    /// of how far the physical clean-up of that compaction has got and of
    /// the record format, so equal on every replica that applied the same
    /// log prefix (see the module docs).
    pub fn hash(&self, rev: i64, compact_rev: i64, lower: &[u8], upper: &[u8]) -> Result<u32> {
        Ok(self.range_hash(rev, compact_rev, lower, upper)?.crc)
    }

    /// [`MvccSnapshot::hash`] with the length of the hashed stream, so the
    /// hashes of adjacent ranges combine ([`RangeHash::combine`]) into the
    /// hash of their union: the whole keyspace's hash is the same however
    /// it is cut into regions.
    pub fn range_hash(
        &self,
        rev: i64,
        compact_rev: i64,
        lower: &[u8],
        upper: &[u8],
    ) -> Result<RangeHash> {
        let mut hasher = crc32fast::Hasher::new();
        let lo = codec::mvcc_lower_bound(lower);
        let up = codec::mvcc_upper_bound(upper);
        let mut it = self.kv.iter(cf::MVCC, &lo, &up);
        it.seek(&lo);
        while let (Some(raw_key), Some(raw)) = (it.key(), it.value()) {
            let (key, version_rev) = codec::decode_mvcc_key(raw_key)?;
            if version_rev > rev {
                it.seek(codec::mvcc_key(&key, rev));
                continue;
            }
            let (tombstone, fields) = codec::record_content(raw)?;
            let survivor = version_rev <= compact_rev;
            if !(survivor && tombstone) {
                hasher.update(&(key.len() as u32).to_be_bytes());
                hasher.update(&key);
                hasher.update(&version_rev.to_be_bytes());
                hasher.update(&[u8::from(tombstone)]);
                hasher.update(fields);
            }
            if survivor {
                // Everything older is compacted away.
                it.seek(codec::mvcc_key_end(&key));
            } else {
                it.next();
            }
        }
        it.status()?;
        let len = hasher.total_len();
        Ok(RangeHash {
            crc: hasher.finalize(),
            len,
        })
    }

    /// Calls `f(mvcc key, record, revision CF key)` for every version of
    /// the keys in `[lower, upper)` (`upper` empty = unbounded), in MVCC CF
    /// order: what a region snapshot carries, and what installing one
    /// replaces. The record is in the current format, so it names its
    /// revision CF key itself; one of the old format is given re-encoded
    /// with the sub-revision looked up in the revision CF (as it is, with
    /// no revision key, if there is none to find). Stops at `f`'s first
    /// error.
    pub fn versions<E: From<crate::Error>>(
        &self,
        lower: &[u8],
        upper: &[u8],
        mut f: impl FnMut(&[u8], &[u8], Option<&[u8]>) -> std::result::Result<(), E>,
    ) -> std::result::Result<(), E> {
        let lo = codec::mvcc_lower_bound(lower);
        let up = codec::mvcc_upper_bound(upper);
        let mut it = self.kv.iter(cf::MVCC, &lo, &up);
        it.seek(&lo);
        while let (Some(raw_key), Some(raw)) = (it.key(), it.value()) {
            match codec::record_sub(raw)? {
                Some(sub) => {
                    let (_, rev) = codec::decode_mvcc_key(raw_key)?;
                    f(raw_key, raw, Some(&codec::revision_key(rev, sub)))?;
                }
                None => {
                    let (key, rev) = codec::decode_mvcc_key(raw_key)?;
                    match self.legacy_sub(&key, rev)? {
                        Some(sub) => {
                            let upgraded = codec::Version::decode(raw)?.encode(sub);
                            f(raw_key, &upgraded, Some(&codec::revision_key(rev, sub)))?;
                        }
                        None => f(raw_key, raw, None)?,
                    }
                }
            }
            it.next();
        }
        it.status().map_err(crate::Error::from)?;
        Ok(())
    }

    /// The sub-revision of `key`'s change at `rev` from the revision CF,
    /// for a version record of the old format (which does not hold it):
    /// the entry under `rev` whose value is `key`. `None` if there is none.
    pub(crate) fn legacy_sub(&self, key: &[u8], rev: i64) -> Result<Option<u32>> {
        let lower = codec::revision_key(rev, 0);
        let upper = codec::revision_key(rev.saturating_add(1), 0);
        let mut it = self.kv.iter(cf::REVISION, &lower, &upper);
        it.seek(lower);
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            if v == key {
                return Ok(Some(codec::decode_revision_key(k)?.1));
            }
            it.next();
        }
        it.status()?;
        Ok(None)
    }
}
