//! Transaction locks and decisions of a region: the participant's side of a
//! write over several regions (the coordinator is the router's `txn`
//! module, which documents the protocol).
//!
//! State, per region, in the meta column family (so it is written in the
//! same batch as the data and the apply state):
//! * locks (`keys::txn_lock_key`): which key spans a transaction holds and
//!   the region's applied revision when it took them; loaded into the
//!   replica's [`LockTable`] at start, after every apply run that changes
//!   them (before any caller is answered) and after a snapshot install;
//! * decisions (`keys::txn_record_key`): the revision, every mutation and
//!   every participant's locked spans of a committed transaction, kept by
//!   the region holding its primary key (keyed by that key, so a split
//!   hands them to the right side).
//!
//! Contract of applying the commands ([`TxnApply`]; an `Err` is the entry's
//! answer and changes nothing):
//! * `lock`: every span must lie in the region and overlap no other
//!   transaction's lock (`StaleCommand` otherwise); locking again for the
//!   same transaction changes nothing;
//! * `commit`: the region must hold the transaction's lock, the revision be
//!   above the lock's base revision and every mutation of the region lie
//!   in the lock's spans (`StaleCommand` otherwise); the region's mutations
//!   are staged at the revision and the lock dropped; the primary also
//!   records the decision. The region's applied revision does not move: a
//!   write sequenced before the commit's revision may still be in the log
//!   behind it, and the applied revision must stay a revision every write
//!   at or below which has applied;
//! * `rollback`: drops the lock; `StaleCommand` if there is none (the
//!   transaction was committed or rolled back already);
//! * `forget`: deletes the decision record, if any.
//!
//! Other commands check the locks too (see `apply`): a write of a locked
//! key, a compaction and a split are refused while locks exist on what they
//! touch.

use std::time::{Duration, Instant};

use engine::{cf, KvEngine, KvSnapshot, WriteBatch};
use mvcc::{KeyRange, MvccStore};
use parking_lot::Mutex;
use prost::Message as _;
use proto::metapb;
use proto::raft_cmdpb::{
    KeySpan, TxnCommitRequest, TxnForgetRequest, TxnLockRequest, TxnRollbackRequest,
};
use proto::raft_serverpb::{TxnCommitRecord, TxnLockRecord};
use tokio::sync::watch;

use crate::keys;
use crate::split;
use crate::{Error, Result};

/// A span of a lock as a key range.
pub fn span_range(s: &KeySpan) -> KeyRange {
    KeyRange {
        start: s.start.clone(),
        end: if s.single { None } else { Some(s.end.clone()) },
    }
}

/// A key range as a lock span.
pub fn range_span(r: &KeyRange) -> KeySpan {
    KeySpan {
        start: r.start.clone(),
        end: r.end.clone().unwrap_or_default(),
        single: r.end.is_none(),
    }
}

/// Whether `region` owns every key of `r`.
pub fn region_covers(region: &metapb::Region, r: &KeyRange) -> bool {
    if !split::contains(region, &r.start) {
        return false;
    }
    match &r.end {
        None => true,
        Some(end) if end.is_empty() => region.end_key.is_empty(),
        Some(end) => region.end_key.is_empty() || end.as_slice() <= region.end_key.as_slice(),
    }
}

/// A lock as the replica holds it.
#[derive(Clone, Debug)]
pub struct Lock {
    pub record: TxnLockRecord,
    /// When this replica learned of it (applied or loaded it): its age
    /// tells an abandoned transaction from a slow one.
    pub since: Instant,
    ranges: Vec<KeyRange>,
}

impl Lock {
    fn new(record: TxnLockRecord, since: Instant) -> Lock {
        let ranges = record.spans.iter().map(span_range).collect();
        Lock {
            record,
            since,
            ranges,
        }
    }

    pub fn overlaps(&self, spans: &[KeyRange]) -> bool {
        self.ranges
            .iter()
            .any(|r| spans.iter().any(|s| r.overlaps(s)))
    }

    pub fn covers_key(&self, key: &[u8]) -> bool {
        self.ranges.iter().any(|r| r.contains(key))
    }

    pub fn age(&self) -> Duration {
        self.since.elapsed()
    }
}

/// The locks a replica has applied, shared with the layers above.
pub struct LockTable {
    locks: Mutex<Vec<Lock>>,
    /// Bumped on every change, for waiters.
    version: watch::Sender<u64>,
}

impl Default for LockTable {
    fn default() -> Self {
        LockTable {
            locks: Mutex::default(),
            version: watch::channel(0).0,
        }
    }
}

impl LockTable {
    /// Locks of transactions other than `txn_id` overlapping `spans`.
    pub fn conflicting(&self, spans: &[KeyRange], txn_id: u64) -> Vec<Lock> {
        self.locks
            .lock()
            .iter()
            .filter(|l| l.record.txn_id != txn_id && l.overlaps(spans))
            .cloned()
            .collect()
    }

    pub fn get(&self, txn_id: u64) -> Option<Lock> {
        self.locks
            .lock()
            .iter()
            .find(|l| l.record.txn_id == txn_id)
            .cloned()
    }

    pub fn all(&self) -> Vec<Lock> {
        self.locks.lock().clone()
    }

    /// A receiver that sees every change after this call: subscribe, then
    /// check, then wait, and no change is missed.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    /// Makes `records` the table; locks already held keep their age.
    pub(crate) fn replace(&self, records: &[TxnLockRecord]) {
        let now = Instant::now();
        {
            let mut locks = self.locks.lock();
            let old = std::mem::take(&mut *locks);
            *locks = records
                .iter()
                .map(|r| {
                    let since = old
                        .iter()
                        .find(|l| l.record.txn_id == r.txn_id)
                        .map_or(now, |l| l.since);
                    Lock::new(r.clone(), since)
                })
                .collect();
        }
        self.version.send_modify(|v| *v += 1);
    }
}

/// Region `region_id`'s locks as stored in `kv`.
pub(crate) fn load_locks(kv: &KvEngine, region_id: u64) -> Result<Vec<TxnLockRecord>> {
    snapshot_locks(&kv.snapshot(), region_id)
}

/// Region `region_id`'s locks as of `snap`.
pub(crate) fn snapshot_locks(snap: &KvSnapshot<'_>, region_id: u64) -> Result<Vec<TxnLockRecord>> {
    let (lower, upper) = keys::txn_lock_bounds(region_id);
    let mut out = Vec::new();
    let mut it = snap.iter(cf::META, &lower, &upper);
    it.seek(&lower);
    while let Some(v) = it.value() {
        out.push(TxnLockRecord::decode(v)?);
        it.next();
    }
    it.status().map_err(engine::Error::from)?;
    Ok(out)
}

/// The decision records of the primary keys in `region`, as of `snap`:
/// (primary key, record).
pub(crate) fn snapshot_records(
    snap: &KvSnapshot<'_>,
    region: &metapb::Region,
) -> Result<Vec<(Vec<u8>, TxnCommitRecord)>> {
    let (lower, upper) = keys::txn_record_bounds(&region.start_key, &region.end_key);
    let mut out = Vec::new();
    let mut it = snap.iter(cf::META, &lower, &upper);
    it.seek(&lower);
    while let (Some(k), Some(v)) = (it.key(), it.value()) {
        let primary = keys::decode_txn_record_key(k)
            .ok_or_else(|| Error::Corrupted("bad transaction record key".into()))?;
        out.push((primary, TxnCommitRecord::decode(v)?));
        it.next();
    }
    it.status().map_err(engine::Error::from)?;
    Ok(out)
}

/// The decision of transaction `txn_id` with primary key `primary_key`, as
/// of `snap` (`None`: not recorded here).
pub fn read_record(
    snap: &KvSnapshot<'_>,
    primary_key: &[u8],
    txn_id: u64,
) -> Result<Option<TxnCommitRecord>> {
    snap.get(cf::META, &keys::txn_record_key(primary_key, txn_id))?
        .map(|raw| TxnCommitRecord::decode(raw.as_slice()).map_err(Error::from))
        .transpose()
}

/// Applies the transaction commands of one entry (see the module docs).
/// Each method checks everything before staging anything, so a refused
/// command leaves the batch as it was.
pub(crate) struct TxnApply<'a> {
    pub kv: &'a KvEngine,
    pub mvcc: &'a MvccStore,
    pub wb: &'a mut WriteBatch,
    pub region: &'a metapb::Region,
    pub applied_revision: i64,
    /// The region's locks before the entry; updated by it.
    pub locks: &'a mut Vec<TxnLockRecord>,
}

fn refuse<T>(why: String) -> Result<T> {
    Err(Error::StaleCommand(why))
}

impl TxnApply<'_> {
    pub fn lock(self, req: &TxnLockRequest) -> Result<()> {
        if self.locks.iter().any(|l| l.txn_id == req.txn_id) {
            return Ok(());
        }
        let ranges: Vec<KeyRange> = req.spans.iter().map(span_range).collect();
        if let Some(r) = ranges.iter().find(|r| !region_covers(self.region, r)) {
            return refuse(format!(
                "lock of {:?} is not inside region {}",
                String::from_utf8_lossy(&r.start),
                self.region.id
            ));
        }
        for other in self.locks.iter() {
            let held: Vec<KeyRange> = other.spans.iter().map(span_range).collect();
            if held.iter().any(|h| ranges.iter().any(|r| h.overlaps(r))) {
                return refuse(format!("keys locked by transaction {}", other.txn_id));
            }
        }
        let record = TxnLockRecord {
            txn_id: req.txn_id,
            primary_key: req.primary_key.clone(),
            spans: req.spans.clone(),
            base_revision: self.applied_revision,
        };
        self.kv.put_to(
            self.wb,
            cf::META,
            &keys::txn_lock_key(self.region.id, req.txn_id),
            &record.encode_to_vec(),
        );
        self.locks.push(record);
        Ok(())
    }

    pub fn commit(self, req: &TxnCommitRequest) -> Result<()> {
        let Some(pos) = self.locks.iter().position(|l| l.txn_id == req.txn_id) else {
            return refuse(format!(
                "transaction {} holds no lock in region {}",
                req.txn_id, self.region.id
            ));
        };
        let lock = Lock::new(self.locks[pos].clone(), Instant::now());
        if req.revision <= lock.record.base_revision {
            return refuse(format!(
                "transaction revision {} is not above {} (its lock's base)",
                req.revision, lock.record.base_revision
            ));
        }
        let mine: Vec<_> = req
            .mutations
            .iter()
            .filter(|m| split::contains(self.region, &m.key))
            .cloned()
            .collect();
        if let Some(m) = mine.iter().find(|m| !lock.covers_key(&m.key)) {
            return refuse(format!(
                "key {:?} is not locked by transaction {}",
                String::from_utf8_lossy(&m.key),
                req.txn_id
            ));
        }
        self.mvcc.stage_changes(self.wb, req.revision, &mine);
        self.kv.delete_from(
            self.wb,
            cf::META,
            &keys::txn_lock_key(self.region.id, req.txn_id),
        );
        if req.primary {
            let record = TxnCommitRecord {
                txn_id: req.txn_id,
                revision: req.revision,
                mutations: req.mutations.clone(),
                lock_spans: req.lock_spans.clone(),
            };
            self.kv.put_to(
                self.wb,
                cf::META,
                &keys::txn_record_key(&req.primary_key, req.txn_id),
                &record.encode_to_vec(),
            );
        }
        self.locks.remove(pos);
        Ok(())
    }

    pub fn rollback(self, req: &TxnRollbackRequest) -> Result<()> {
        let Some(pos) = self.locks.iter().position(|l| l.txn_id == req.txn_id) else {
            return refuse(format!(
                "transaction {} holds no lock in region {}",
                req.txn_id, self.region.id
            ));
        };
        self.kv.delete_from(
            self.wb,
            cf::META,
            &keys::txn_lock_key(self.region.id, req.txn_id),
        );
        self.locks.remove(pos);
        Ok(())
    }

    pub fn forget(self, req: &TxnForgetRequest) -> Result<()> {
        self.kv.delete_from(
            self.wb,
            cf::META,
            &keys::txn_record_key(&req.primary_key, req.txn_id),
        );
        Ok(())
    }
}

/// The first lock in `locks` covering one of `keys`, for refusing writes.
pub(crate) fn locked_key<'k>(
    locks: &[TxnLockRecord],
    mut keys: impl Iterator<Item = &'k [u8]>,
) -> Option<(u64, &'k [u8])> {
    if locks.is_empty() {
        return None;
    }
    let held: Vec<(u64, Vec<KeyRange>)> = locks
        .iter()
        .map(|l| (l.txn_id, l.spans.iter().map(span_range).collect()))
        .collect();
    keys.find_map(|k| {
        held.iter()
            .find(|(_, rs)| rs.iter().any(|r| r.contains(k)))
            .map(|(id, _)| (*id, k))
    })
}
