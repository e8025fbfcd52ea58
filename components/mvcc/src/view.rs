//! What request evaluation (`exec`) reads: [`ReadView`], implemented by a
//! RocksDB snapshot of this node ([`MvccSnapshot`]) and by [`FetchedView`],
//! the keys of a transaction over several regions as its participants sent
//! them (the coordinator evaluates it, holding every region's lock on them,
//! so they cannot change meanwhile).

use std::collections::BTreeMap;

use proto::mvccpb::KeyValue;

use crate::store::{KeyRange, MvccSnapshot, RangeResult};
use crate::Result;

/// A consistent read view of the keys an evaluation touches.
pub trait ReadView {
    /// Live keys of `range` as of `rev` (`i64::MAX`: the newest), in key
    /// order; at most `limit` of them collected (0 = all) and only when
    /// `collect`; `count` covers the whole range.
    fn range(&self, range: &KeyRange, rev: i64, limit: usize, collect: bool)
        -> Result<RangeResult>;

    /// The live version of `key` as of `rev`.
    fn get(&self, key: &[u8], rev: i64) -> Result<Option<KeyValue>> {
        let range = KeyRange {
            start: key.to_vec(),
            end: None,
        };
        Ok(self.range(&range, rev, 1, true)?.kvs.pop())
    }
}

impl ReadView for MvccSnapshot<'_> {
    fn range(
        &self,
        range: &KeyRange,
        rev: i64,
        limit: usize,
        collect: bool,
    ) -> Result<RangeResult> {
        MvccSnapshot::range(self, range, rev, limit, collect)
    }
}

/// A view as of revision `at`: its newest state is `inner`'s at `at` (a
/// read-only request served at a revision some later writes are already
/// applied above).
pub struct AtRevision<'a> {
    pub inner: &'a dyn ReadView,
    pub at: i64,
}

impl ReadView for AtRevision<'_> {
    fn range(
        &self,
        range: &KeyRange,
        rev: i64,
        limit: usize,
        collect: bool,
    ) -> Result<RangeResult> {
        self.inner.range(range, rev.min(self.at), limit, collect)
    }
}

/// Live keys fetched for an evaluation, per revision they were read at
/// (`i64::MAX` = the newest state). It answers only for the ranges and
/// revisions it was filled for: the caller fetched every range the request
/// reads, at every revision it reads them; a read at a revision never
/// fetched finds nothing.
#[derive(Debug, Default)]
pub struct FetchedView {
    at: BTreeMap<i64, BTreeMap<Vec<u8>, KeyValue>>,
}

impl FetchedView {
    /// Adds live keys read at `rev`.
    pub fn insert(&mut self, rev: i64, kvs: impl IntoIterator<Item = KeyValue>) {
        let keys = self.at.entry(rev).or_default();
        for kv in kvs {
            keys.insert(kv.key.clone(), kv);
        }
    }
}

impl ReadView for FetchedView {
    fn range(
        &self,
        range: &KeyRange,
        rev: i64,
        limit: usize,
        collect: bool,
    ) -> Result<RangeResult> {
        let mut out = RangeResult::default();
        let Some(keys) = self.at.get(&rev) else {
            return Ok(out);
        };
        for kv in keys
            .range(range.start.clone()..)
            .map(|(_, kv)| kv)
            .take_while(|kv| range.contains(&kv.key))
        {
            out.count += 1;
            if collect && (limit == 0 || out.kvs.len() < limit) {
                out.kvs.push(kv.clone());
            }
        }
        Ok(out)
    }
}
