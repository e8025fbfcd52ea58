//! The MVCC store: etcd's key history on the node's RocksDB.
//!
//! Every method takes the revision it works at explicitly; the store keeps
//! no notion of "current" or "compacted" revision — those belong to the
//! region's apply state, and the callers check them first (reads below the
//! compaction revision or above the current one never reach this layer).
//! Key ranges use etcd's convention, see [`KeyRange`].
//!
//! Reads go through an [`MvccSnapshot`]: one RocksDB snapshot, so a read
//! sees one state however long it iterates, while writes are applied and
//! physical compaction deletes versions underneath. The region's apply
//! state (applied and compaction revisions) lives in the same RocksDB and
//! is written in the same batch as the data it describes, so a caller that
//! reads it through the same snapshot ([`MvccSnapshot::kv`]) checks a read's
//! revision against exactly the data the read will see: the physical
//! clean-up of a compaction starts only after the compaction revision was
//! written, so a snapshot either shows that revision (and the read below it
//! is refused) or predates every deletion of that clean-up.

use engine::{cf, KvEngine, KvSnapshot, WriteBatch};
use proto::mvccpb::{event::EventType, Event, KeyValue};
use proto::raft_cmdpb::{mutation::Op, Mutation};

use crate::codec::{self, Version};
use crate::index::NewestAt;
use crate::Result;

/// A key range in etcd's terms.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct KeyRange {
    pub start: Vec<u8>,
    /// `None`: the single key `start`. `Some(empty)`: every key `>= start`.
    /// `Some(end)`: `[start, end)`; empty when `end <= start`.
    pub end: Option<Vec<u8>>,
}

impl KeyRange {
    /// From an etcd request's `key` and `range_end`: an empty `range_end`
    /// is the single key, `"\0"` means "to the end of the keyspace".
    pub fn from_etcd(key: &[u8], range_end: &[u8]) -> KeyRange {
        let end = match range_end {
            [] => None,
            [0] => Some(Vec::new()),
            end => Some(end.to_vec()),
        };
        KeyRange {
            start: key.to_vec(),
            end,
        }
    }

    pub fn contains(&self, key: &[u8]) -> bool {
        match &self.end {
            None => key == self.start.as_slice(),
            Some(end) => key >= self.start.as_slice() && (end.is_empty() || key < end.as_slice()),
        }
    }

    /// Whether some key lies in both ranges.
    pub fn overlaps(&self, other: &KeyRange) -> bool {
        if self.is_empty() || other.is_empty() {
            return false;
        }
        let below = |start: &[u8], upper: &[u8]| upper.is_empty() || start < upper;
        below(&self.start, &other.upper()) && below(&other.start, &self.upper())
    }

    /// Exclusive upper bound as raw bytes; empty = unbounded.
    pub fn upper(&self) -> Vec<u8> {
        match &self.end {
            None => {
                let mut next = self.start.clone();
                next.push(0);
                next
            }
            Some(end) => end.clone(),
        }
    }

    /// Whether no key lies in the range (`[start, end)` with `end <=
    /// start`).
    pub fn is_empty(&self) -> bool {
        matches!(&self.end, Some(end) if !end.is_empty() && end.as_slice() <= self.start.as_slice())
    }
}

/// What [`MvccSnapshot::range`] found.
#[derive(Debug, Default, PartialEq)]
pub struct RangeResult {
    /// Live keys in key order, at most `limit` of them.
    pub kvs: Vec<KeyValue>,
    /// All live keys in the range, regardless of `limit`.
    pub count: usize,
}

/// How much history a key range holds (see [`MvccSnapshot::size_of`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SizeStats {
    /// Bytes of every version record (encoded key and value).
    pub bytes: u64,
    /// Keys with at least one version (deleted ones included: their
    /// history still takes room until compacted).
    pub keys: u64,
}

#[derive(Clone)]
pub struct MvccStore {
    engine: KvEngine,
}

impl MvccStore {
    pub fn new(engine: KvEngine) -> MvccStore {
        MvccStore { engine }
    }

    pub fn engine(&self) -> &KvEngine {
        &self.engine
    }

    /// A consistent read view of the store as of now (see the module docs).
    /// Cheap; hold it only for the duration of one request.
    pub fn snapshot(&self) -> MvccSnapshot<'_> {
        MvccSnapshot {
            kv: self.engine.snapshot(),
        }
    }

    /// Stages the changes of one revision into `batch` (the versions, their
    /// key index entries and the revision index). `create_revision` 0 in a
    /// put means the key is created by `rev`; lease changes (`Attach`,
    /// `Revoke`) are skipped. The caller guarantees one change per key per
    /// revision and distinct `sub`s.
    pub fn stage_changes(&self, batch: &mut WriteBatch, rev: i64, mutations: &[Mutation]) {
        for m in mutations {
            let version = match m.op() {
                // Lease changes are not versions of keys (the region's
                // apply stages them).
                Op::Attach | Op::Revoke => continue,
                Op::Put => Version::Put {
                    create_revision: if m.create_revision == 0 {
                        rev
                    } else {
                        m.create_revision
                    },
                    version: m.version,
                    lease: m.lease,
                    value: m.value.clone(),
                },
                Op::Delete => Version::Tombstone,
            };
            let key = codec::mvcc_key(&m.key, rev);
            self.engine.put_to(
                batch,
                cf::MVCC_KEYS,
                &key,
                &codec::key_index_value(version.is_tombstone()),
            );
            self.engine
                .put_to(batch, cf::MVCC, &key, &version.encode(m.sub));
            self.engine.put_to(
                batch,
                cf::REVISION,
                &codec::revision_key(rev, m.sub),
                &m.key,
            );
        }
    }
}

/// A consistent read view of an [`MvccStore`]: every read through it sees
/// the store as of the moment [`MvccStore::snapshot`] was called.
pub struct MvccSnapshot<'a> {
    pub(crate) kv: KvSnapshot<'a>,
}

impl MvccSnapshot<'_> {
    /// The underlying RocksDB snapshot, for reading other state (the
    /// region's apply state) as of the same moment.
    pub fn kv(&self) -> &KvSnapshot<'_> {
        &self.kv
    }

    /// The live version of `key` as of `rev` (`None` if it did not exist or
    /// was deleted then). `i64::MAX` reads the newest version.
    pub fn get(&self, key: &[u8], rev: i64) -> Result<Option<KeyValue>> {
        let range = KeyRange {
            start: key.to_vec(),
            end: None,
        };
        Ok(self.range(&range, rev, 1, true)?.kvs.pop())
    }

    /// Live keys of `range` as of `rev`, in key order. Collects at most
    /// `limit` of them (0 = all) and only when `collect`; `count` always
    /// covers the whole range.
    ///
    /// Only the collected keys' version records are read: the other keys
    /// are counted on the key index (see `index.rs`), whose cost per
    /// version does not depend on the value's size. So `count_only` and
    /// the count of a limited range (every page of a paged list) cost one
    /// walk over the range's index entries, and a revision below the
    /// newest is answered like the newest. Edge cases: an empty range
    /// counts 0; a single-key range never reads the index; `rev` below 1
    /// finds nothing.
    pub fn range(
        &self,
        range: &KeyRange,
        rev: i64,
        limit: usize,
        collect: bool,
    ) -> Result<RangeResult> {
        let mut out = RangeResult::default();
        if range.is_empty() {
            return Ok(out);
        }
        let lower = codec::mvcc_lower_bound(&range.start);
        let upper = codec::mvcc_upper_bound(&range.upper());
        let mut count_from = codec::mvcc_key(&range.start, rev.max(0));
        if collect {
            let it = self.kv.iter(cf::MVCC, &lower, &upper);
            let mut versions = NewestAt::new(it, rev, &count_from);
            while limit == 0 || out.kvs.len() < limit {
                if !versions.advance()? {
                    // The whole range is read.
                    return Ok(out);
                }
                let record = versions.value();
                if codec::is_tombstone(record) {
                    continue;
                }
                out.count += 1;
                let (user_key, _) = codec::decode_bytes(versions.key())?;
                if let Some(kv) = key_value(user_key, versions.revision(), Version::decode(record)?)
                {
                    out.kvs.push(kv);
                }
            }
            if range.end.is_none() {
                return Ok(out);
            }
            count_from = versions.past_key();
        }
        out.count += self.count_on_index(&lower, &upper, &count_from, rev)?;
        Ok(out)
    }

    /// Changes to keys in `range` with revisions in `[from_rev, to_rev]`, in
    /// revision order, at most `limit` (0 = all). Deletes carry only the key
    /// and mod_revision, as in etcd. With `prev_kv`, each event also carries
    /// the key's previous live version (absent if compacted away).
    pub fn events(
        &self,
        range: &KeyRange,
        from_rev: i64,
        to_rev: i64,
        limit: usize,
        prev_kv: bool,
    ) -> Result<Vec<Event>> {
        let changes = self.changes(range, from_rev, to_rev, limit, prev_kv)?;
        Ok(changes.into_iter().map(|(_, event)| event).collect())
    }

    /// [`MvccSnapshot::events`], each with its sub-revision (its order
    /// among the changes of its revision, in every region).
    pub fn changes(
        &self,
        range: &KeyRange,
        from_rev: i64,
        to_rev: i64,
        limit: usize,
        prev_kv: bool,
    ) -> Result<Vec<(u32, Event)>> {
        let mut events = Vec::new();
        if from_rev > to_rev || range.is_empty() {
            return Ok(events);
        }
        let lower = codec::revision_key(from_rev, 0);
        let upper = codec::revision_key(to_rev.saturating_add(1), 0);
        let mut it = self.kv.iter(cf::REVISION, &lower, &upper);
        it.seek(lower);
        while it.valid() && (limit == 0 || events.len() < limit) {
            let (Some(raw_key), Some(user_key)) = (it.key(), it.value()) else {
                break;
            };
            if range.contains(user_key) {
                let (rev, sub) = codec::decode_revision_key(raw_key)?;
                if let Some(event) = self.event_at(user_key, rev, prev_kv)? {
                    events.push((sub, event));
                }
            }
            it.next();
        }
        it.status()?;
        Ok(events)
    }

    fn event_at(&self, key: &[u8], rev: i64, prev_kv: bool) -> Result<Option<Event>> {
        let Some(raw) = self.kv.get(cf::MVCC, &codec::mvcc_key(key, rev))? else {
            // Compacted away between reading the index and the version.
            return Ok(None);
        };
        let version = Version::decode(&raw)?;
        let (r#type, kv) = match key_value(key.to_vec(), rev, version) {
            Some(kv) => (EventType::Put, kv),
            None => (
                EventType::Delete,
                KeyValue {
                    key: key.to_vec(),
                    mod_revision: rev,
                    ..Default::default()
                },
            ),
        };
        let prev_kv = if prev_kv {
            self.get(key, rev - 1)?
        } else {
            None
        };
        Ok(Some(Event {
            r#type: r#type as i32,
            kv: Some(kv),
            prev_kv,
        }))
    }

    /// How much history the keys in `[start, end)` (`end` empty =
    /// unbounded) hold: a scan of their versions.
    pub fn size_of(&self, start: &[u8], end: &[u8]) -> Result<SizeStats> {
        let mut stats = SizeStats::default();
        self.walk_keys(start, end, |_, bytes| {
            stats.bytes += bytes;
            stats.keys += 1;
            true
        })?;
        Ok(stats)
    }

    /// A key to split `[start, end)` at: the first key, after `start`,
    /// before which the keys' history holds at least `bytes` bytes or
    /// `keys` keys. `None` if there is none (the range ends first, or holds
    /// a single key).
    pub fn split_key(
        &self,
        start: &[u8],
        end: &[u8],
        bytes: u64,
        keys: u64,
    ) -> Result<Option<Vec<u8>>> {
        let mut seen = SizeStats::default();
        let mut found = None;
        self.walk_keys(start, end, |key, key_bytes| {
            if (seen.bytes >= bytes || seen.keys >= keys) && key > start {
                found = Some(key.to_vec());
                return false;
            }
            seen.bytes += key_bytes;
            seen.keys += 1;
            true
        })?;
        Ok(found)
    }

    /// Calls `f(key, bytes of its versions)` for every key with versions in
    /// `[start, end)`, in key order, while it returns true.
    fn walk_keys(
        &self,
        start: &[u8],
        end: &[u8],
        mut f: impl FnMut(&[u8], u64) -> bool,
    ) -> Result<()> {
        let lower = codec::mvcc_lower_bound(start);
        let upper = codec::mvcc_upper_bound(end);
        let mut it = self.kv.iter(cf::MVCC, &lower, &upper);
        it.seek(&lower);
        let mut current: Option<(Vec<u8>, u64)> = None;
        while it.valid() {
            let (Some(raw_key), Some(raw_value)) = (it.key(), it.value()) else {
                break;
            };
            let size = (raw_key.len() + raw_value.len()) as u64;
            let (user_key, _) = codec::decode_mvcc_key(raw_key)?;
            match &mut current {
                Some((key, bytes)) if *key == user_key => *bytes += size,
                _ => {
                    if let Some((key, bytes)) = current.take() {
                        if !f(&key, bytes) {
                            return Ok(());
                        }
                    }
                    current = Some((user_key, size));
                }
            }
            it.next();
        }
        it.status()?;
        if let Some((key, bytes)) = current {
            f(&key, bytes);
        }
        Ok(())
    }
}

pub(crate) fn key_value(key: Vec<u8>, mod_revision: i64, version: Version) -> Option<KeyValue> {
    match version {
        Version::Put {
            create_revision,
            version,
            lease,
            value,
        } => Some(KeyValue {
            key,
            create_revision,
            mod_revision,
            version,
            value,
            lease,
        }),
        Version::Tombstone => None,
    }
}
