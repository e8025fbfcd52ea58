//! Counting without reading values: the key index and the cursor every
//! range walks with.
//!
//! The key index (`mvcc_keys` CF, see [`codec`](crate::codec)) holds exactly
//! the keys of the MVCC CF, each with one byte saying whether the version
//! stored under it is a put or a tombstone. Counting the live keys of a
//! range at a revision walks it instead of the version records: the walk
//! reads ~40 bytes per version rather than the whole record, so its cost
//! does not grow with the values' sizes, and no value is copied. Being keyed
//! exactly like the MVCC CF, it answers at any revision the MVCC CF answers
//! at: a key's newest entry at or below `rev` says whether it was live then.
//!
//! Keeping it equal to the MVCC CF's key set: every change to the MVCC CF
//! stages the same change to the index in the same write batch — a new
//! version ([`MvccStore::stage_changes`]), a version removed by compaction,
//! a region snapshot replacing a key range ([`MvccStore::stage_clear`],
//! [`MvccStore::stage_version_record`]). Compaction deletes exact
//! `(key, revision)` entries that nothing writes again, so it cannot race
//! with writes. A store written before the index existed gets it at start
//! ([`MvccStore::build_key_index`]); [`MvccSnapshot::check_key_index`]
//! compares the two.
//!
//! [`NewestAt`] is the walk both ranges and counts use: it stops at each
//! key's newest version at or below a revision and steps over a key's other
//! versions with a few `next`s before falling back to one seek, as a seek
//! costs several times a step and most keys have only a few versions.

use engine::{cf, RawIter, WriteBatch};

use crate::codec;
use crate::store::{MvccSnapshot, MvccStore};
use crate::{Error, Result};

/// Steps over a key's versions before seeking instead (RocksDB's own
/// `max_sequential_skip_in_iterations` default is 8 too).
const MAX_STEPS: usize = 8;

/// Index entries written per batch while building the index.
const BUILD_BATCH: usize = 4096;

/// Key of the "index complete" marker, in the index CF itself: no encoded
/// user key is empty, so it is never counted nor cleared with a range.
const BUILT_MARKER: &[u8] = b"";
const BUILT_VALUE: &[u8] = b"key index v1";

/// A walk over an MVCC-keyed CF (the MVCC CF or the key index) that stops
/// at every key's newest entry at or below `rev`, in key order. Keys with
/// no entry at or below `rev` are skipped.
pub(crate) struct NewestAt<'a> {
    it: RawIter<'a>,
    rev: i64,
    /// Encoded user key of the entry the walk stands on.
    key: Vec<u8>,
    /// Revision of that entry.
    key_rev: i64,
    on_key: bool,
}

impl<'a> NewestAt<'a> {
    /// A walk of `it` at `rev` (below 0: as 0, where nothing is live) that
    /// starts at the first entry at or after the MVCC key `from`.
    pub fn new(mut it: RawIter<'a>, rev: i64, from: &[u8]) -> NewestAt<'a> {
        it.seek(from);
        NewestAt {
            it,
            rev: rev.max(0),
            key: Vec::new(),
            key_rev: 0,
            on_key: false,
        }
    }

    /// Moves to the next key's newest entry at or below the walk's
    /// revision; false once the iterator's bounds are reached.
    pub fn advance(&mut self) -> Result<bool> {
        if self.on_key {
            // Past this key's older versions.
            self.skip_above(0)?;
            self.on_key = false;
        }
        loop {
            let Some(raw) = self.it.key() else {
                self.it.status()?;
                return Ok(false);
            };
            let (key, rev) = codec::split_mvcc_key(raw)?;
            self.key.clear();
            self.key.extend_from_slice(key);
            if rev <= self.rev {
                self.key_rev = rev;
                self.on_key = true;
                return Ok(true);
            }
            self.skip_above(self.rev)?;
        }
    }

    /// Encoded user key of the current entry.
    pub fn key(&self) -> &[u8] {
        &self.key
    }

    /// Revision of the current entry.
    pub fn revision(&self) -> i64 {
        self.key_rev
    }

    /// Value of the current entry.
    pub fn value(&self) -> &[u8] {
        self.it.value().unwrap_or_default()
    }

    /// MVCC key just past every version of the current key.
    pub fn past_key(&self) -> Vec<u8> {
        let mut out = self.key.clone();
        out.extend_from_slice(&u64::MAX.to_be_bytes());
        out
    }

    /// Moves past the entries of the current key with revisions above
    /// `above` (>= 0; 0 = all of them): up to [`MAX_STEPS`] steps, then one
    /// seek. Leaves the iterator on the next entry, whatever key it has.
    fn skip_above(&mut self, above: i64) -> Result<()> {
        for _ in 0..MAX_STEPS {
            self.it.next();
            let Some(raw) = self.it.key() else {
                return Ok(());
            };
            match codec::split_mvcc_key(raw)? {
                (key, rev) if key == self.key.as_slice() && rev > above => {}
                _ => return Ok(()),
            }
        }
        let mut target = self.key.clone();
        target.extend_from_slice(&(u64::MAX - above as u64).to_be_bytes());
        self.it.seek(&target);
        Ok(())
    }

    /// Counts the keys live at the walk's revision from here on; `live`
    /// tells from an entry's value whether it is a live version.
    pub fn count_live(mut self, live: impl Fn(&[u8]) -> Result<bool>) -> Result<usize> {
        let mut count = 0;
        while self.advance()? {
            if live(self.value())? {
                count += 1;
            }
        }
        Ok(count)
    }
}

impl MvccSnapshot<'_> {
    /// Keys of `[lower, upper)` (MVCC CF bounds) live at `rev`, counted on
    /// the key index from the MVCC key `from` on.
    pub(crate) fn count_on_index(
        &self,
        lower: &[u8],
        upper: &[u8],
        from: &[u8],
        rev: i64,
    ) -> Result<usize> {
        let walk = NewestAt::new(self.kv().iter(cf::MVCC_KEYS, lower, upper), rev, from);
        walk.count_live(|value| Ok(!codec::key_index_is_tombstone(value)?))
    }

    /// Checks that the key index holds exactly the MVCC CF's keys, each
    /// with its version's kind: for tests and consistency checks. Reads
    /// both column families whole.
    pub fn check_key_index(&self) -> Result<()> {
        let mut versions = self.kv().iter(cf::MVCC, &[], &[]);
        versions.seek_to_first();
        let mut index = self.kv().iter(cf::MVCC_KEYS, &[], &[]);
        index.seek(codec::mvcc_lower_bound(b""));
        let missing = |k: &[u8]| {
            Error::Corrupted(format!(
                "version {} missing from the key index",
                describe(k)
            ))
        };
        loop {
            match (versions.key(), index.key()) {
                (None, None) => break,
                (Some(k), Some(i)) if k == i => {
                    let record = codec::is_tombstone(versions.value().unwrap_or_default());
                    let indexed = codec::key_index_is_tombstone(index.value().unwrap_or_default())?;
                    if record != indexed {
                        return Err(Error::Corrupted(format!(
                            "key index kind differs at {}",
                            describe(k)
                        )));
                    }
                    versions.next();
                    index.next();
                }
                (Some(k), None) => return Err(missing(k)),
                (Some(k), Some(i)) if k < i => return Err(missing(k)),
                (_, Some(i)) => {
                    return Err(Error::Corrupted(format!(
                        "key index entry {} without a version",
                        describe(i)
                    )));
                }
            }
        }
        versions.status()?;
        index.status()?;
        Ok(())
    }
}

/// An MVCC key for error messages: the user key (escaped) and revision.
fn describe(mvcc_key: &[u8]) -> String {
    match codec::decode_mvcc_key(mvcc_key) {
        Ok((key, rev)) => format!("{}@{rev}", key.escape_ascii()),
        Err(_) => format!("{} (undecodable)", mvcc_key.escape_ascii()),
    }
}

impl MvccStore {
    /// Builds the key index from the MVCC CF unless it is complete (a store
    /// written before the index existed); returns whether it built it. Call
    /// once when the node starts, before anything reads or writes the
    /// store. A build stopped half way is done again from the start: the
    /// "complete" marker is written last.
    pub fn build_key_index(&self) -> Result<bool> {
        let engine = self.engine();
        if engine.get(cf::MVCC_KEYS, BUILT_MARKER)?.is_some() {
            return Ok(false);
        }
        let view = engine.snapshot();
        let mut it = view.iter(cf::MVCC, &[], &[]);
        it.seek_to_first();
        let mut batch = WriteBatch::default();
        let (mut staged, mut total) = (0, 0usize);
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            engine.put_to(
                &mut batch,
                cf::MVCC_KEYS,
                k,
                &codec::key_index_value(codec::is_tombstone(v)),
            );
            staged += 1;
            total += 1;
            if staged >= BUILD_BATCH {
                engine.write(std::mem::take(&mut batch))?;
                staged = 0;
            }
            it.next();
        }
        it.status()?;
        engine.put_to(&mut batch, cf::MVCC_KEYS, BUILT_MARKER, BUILT_VALUE);
        engine.write_sync(batch)?;
        tracing::info!(versions = total, "built the MVCC key index");
        Ok(true)
    }

    /// Stages the removal of every version of the user keys in
    /// `[start, end)` (`end` empty = unbounded) from the MVCC CF and the
    /// key index, for a region snapshot that replaces the range.
    pub fn stage_clear(&self, batch: &mut WriteBatch, start: &[u8], end: &[u8]) -> Result<()> {
        let engine = self.engine();
        let lower = codec::mvcc_lower_bound(start);
        let upper = codec::mvcc_upper_bound(end);
        for name in [cf::MVCC, cf::MVCC_KEYS] {
            if upper.is_empty() {
                // No key sorts above every encoded key, so bound the range
                // by the last key present.
                let mut it = engine.iter(name, &lower, &upper);
                it.seek_to_last();
                if let Some(last) = it.key() {
                    engine.delete_range_to(batch, name, &lower, last);
                    engine.delete_from(batch, name, last);
                }
                it.status()?;
            } else {
                engine.delete_range_to(batch, name, &lower, &upper);
            }
        }
        Ok(())
    }

    /// Stages an encoded version record under its MVCC key (as a region
    /// snapshot carries them), with its key index entry.
    pub fn stage_version_record(&self, batch: &mut WriteBatch, mvcc_key: &[u8], record: &[u8]) {
        let engine = self.engine();
        engine.put_to(batch, cf::MVCC, mvcc_key, record);
        engine.put_to(
            batch,
            cf::MVCC_KEYS,
            mvcc_key,
            &codec::key_index_value(codec::is_tombstone(record)),
        );
    }
}
