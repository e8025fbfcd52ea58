//! Region snapshots: the whole state machine of a region as raft snapshot
//! data, for replicas too far behind to catch up from the leader's log.
//!
//! Encoding of `Snapshot.data` (all integers big-endian):
//!
//! ```text
//! magic    b"MSRS" | version u8 = 4
//! region_id u64 | applied_revision i64 | compact_revision i64
//! region_len u32 | region (prost `metapb::Region`: range, epoch, peers)
//! records: tag u8 (1 = MVCC CF, 2 = revision CF, 3 = transaction lock,
//!          4 = transaction decision, 5 = merge decision, 6 = the region's
//!          merge state) | key_len u32 | key | value_len u32 | value
//!          (an MVCC record: its MVCC CF key and version record, which
//!          holds the sub-revision, so the version's revision CF entry is
//!          derived from it and version 4 sends no revision CF records;
//!          version 3, still read, sent them and has no tags 5 and 6)
//!          (a lock: key = transaction id u64, value = `TxnLockRecord`; a
//!          decision: key = its primary key, value = `TxnCommitRecord`; a
//!          merge decision: key = the merged source's end key, value =
//!          `MergeRecord`; the merge state: empty key, value `MergeState`,
//!          present only while the region is frozen for a merge)
//! end:     tag u8 = 0, then nothing
//! ```
//!
//! The region meta travels with the data because a replica created on
//! demand knows nothing of its region but the id until the snapshot comes.
//! It is read from the same RocksDB snapshot as the data, so it is the meta
//! as of the snapshot's applied index.
//!
//! The blob comes from another node, so decoding checks every length, that
//! the meta is for the expected region, and that every record belongs to
//! the meta's key range: a malformed or foreign snapshot is rejected before
//! anything is written.
//!
//! Installing ([`install`]) replaces a replica's data, region meta, apply
//! state and raft log by the snapshot's. Order of writes: the data, the
//! region state (`Normal`) and the apply state (applied and truncated at the
//! snapshot's index and term, with the snapshot's revisions, and its
//! compaction revision pending again since the leader's physical clean-up
//! may not be done) go to RocksDB in one synced batch; then the region's
//! raft-engine log is replaced (cleaned, hard state with the commit at the
//! snapshot and a term not below it, the snapshot's conf state) with fsync;
//! then raft-rs's storage is told. A crash before the RocksDB write leaves
//! the old state and the leader sends the snapshot again; a crash between
//! the two leaves the new apply state with the old log, which start-up
//! reconciles (`Store::reconcile_log`).
//!
//! Work is bounded by the region's key range: generating walks the range's
//! MVCC CF keys (records of the old format, without a sub-revision, go out
//! re-encoded with the sub-revision looked up under their revision), and
//! installing finds the revision CF entries to replace from the replica's
//! own versions in the range and the snapshot's records, never by a scan
//! of the node's revision CF.

use engine::{cf, KvEngine, RaftLogBatch, RaftLogEngine, WriteBatch};
use mvcc::{codec, MvccStore};
use prost::Message as _;
use proto::metapb;
use proto::raft_serverpb::{
    MergeRecord, MergeState, PeerState, RaftApplyState, RegionLocalState, TxnCommitRecord,
    TxnLockRecord,
};
use raft::eraftpb::{HardState, Snapshot};
use tracing::info;

use crate::keys;
use crate::storage::PeerStorage;
use crate::txn;
use crate::{Error, Result};

const MAGIC: &[u8] = b"MSRS";
const VERSION: u8 = 4;
/// Older snapshots still installed: they carry revision CF records.
const VERSION_WITH_REVISION_RECORDS: u8 = 3;
const TAG_END: u8 = 0;
const TAG_MVCC: u8 = 1;
const TAG_REVISION: u8 = 2;
const TAG_LOCK: u8 = 3;
const TAG_TXN_RECORD: u8 = 4;
const TAG_MERGE_RECORD: u8 = 5;
const TAG_MERGE_STATE: u8 = 6;

/// The decoded content of a region snapshot.
#[derive(Debug, Default, PartialEq)]
pub struct RegionSnapshot {
    /// The region meta at the snapshot's applied index.
    pub region: metapb::Region,
    pub applied_revision: i64,
    pub compact_revision: i64,
    pub mvcc: Vec<(Vec<u8>, Vec<u8>)>,
    /// Revision CF records of a version 3 snapshot (version 4 derives them
    /// from `mvcc`).
    pub revision: Vec<(Vec<u8>, Vec<u8>)>,
    pub locks: Vec<TxnLockRecord>,
    /// (primary key, decision) of the transactions this region decided.
    pub txn_records: Vec<(Vec<u8>, TxnCommitRecord)>,
    /// (source end key, decision) of the merges decided in this range.
    pub merge_records: Vec<(Vec<u8>, MergeRecord)>,
    /// Set while the region is frozen as a merge's source.
    pub merging: Option<MergeState>,
}

fn in_range(region: &metapb::Region, user_key: &[u8]) -> bool {
    user_key >= region.start_key.as_slice()
        && (region.end_key.is_empty() || user_key < region.end_key.as_slice())
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) -> Result<()> {
    let len = u32::try_from(b.len())
        .map_err(|_| Error::Corrupted("snapshot record larger than 4 GiB".into()))?;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(b);
    Ok(())
}

fn put_record(out: &mut Vec<u8>, tag: u8, key: &[u8], value: &[u8]) -> Result<()> {
    out.push(tag);
    put_bytes(out, key)?;
    put_bytes(out, value)
}

/// Reads region `region_id`'s meta, apply state and data from one RocksDB
/// snapshot, so the data and meta are exactly the state at the returned
/// apply state's applied index (apply writes all three in one batch).
pub fn generate(kv: &KvEngine, region_id: u64) -> Result<(RaftApplyState, Vec<u8>)> {
    let store = MvccStore::new(kv.clone());
    let view = store.snapshot();
    let snap = view.kv();
    let apply_state = match snap.get(cf::META, &keys::apply_state_key(region_id))? {
        Some(raw) => RaftApplyState::decode(raw.as_slice())?,
        None => {
            return Err(Error::Corrupted(format!(
                "region {region_id} without apply state"
            )))
        }
    };
    let (region, merging) = match snap.get(cf::META, &keys::region_state_key(region_id))? {
        Some(raw) => {
            let state = RegionLocalState::decode(raw.as_slice())?;
            (state.region.unwrap_or_default(), state.merge_state)
        }
        None => {
            return Err(Error::Corrupted(format!(
                "region {region_id} without region state"
            )))
        }
    };
    let region = &region;
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.extend_from_slice(&region_id.to_be_bytes());
    out.extend_from_slice(&apply_state.applied_revision.to_be_bytes());
    out.extend_from_slice(&apply_state.compact_revision.to_be_bytes());
    put_bytes(&mut out, &region.encode_to_vec())?;
    view.versions(&region.start_key, &region.end_key, |k, v, _| {
        put_record(&mut out, TAG_MVCC, k, v)
    })?;
    for lock in txn::snapshot_locks(snap, region_id)? {
        put_record(
            &mut out,
            TAG_LOCK,
            &lock.txn_id.to_be_bytes(),
            &lock.encode_to_vec(),
        )?;
    }
    for (primary, record) in txn::snapshot_records(snap, region)? {
        put_record(&mut out, TAG_TXN_RECORD, &primary, &record.encode_to_vec())?;
    }
    let (lower, upper) = keys::merge_record_bounds(&region.start_key, &region.end_key);
    let mut it = snap.iter(cf::META, &lower, &upper);
    it.seek(&lower);
    while let (Some(k), Some(v)) = (it.key(), it.value()) {
        if let Some(end_key) = keys::decode_merge_record_key(k) {
            put_record(&mut out, TAG_MERGE_RECORD, &end_key, v)?;
        }
        it.next();
    }
    it.status().map_err(engine::Error::from)?;
    drop(it);
    if let Some(m) = &merging {
        put_record(&mut out, TAG_MERGE_STATE, &[], &m.encode_to_vec())?;
    }
    out.push(TAG_END);
    Ok((apply_state, out))
}

struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.data.len() < n {
            return Err(Error::Corrupted("truncated region snapshot".into()));
        }
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32> {
        let mut b = [0u8; 4];
        b.copy_from_slice(self.take(4)?);
        Ok(u32::from_be_bytes(b))
    }

    fn u64(&mut self) -> Result<u64> {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(b))
    }

    fn bytes(&mut self) -> Result<Vec<u8>> {
        let n = self.u32()? as usize;
        Ok(self.take(n)?.to_vec())
    }
}

/// Decodes and validates snapshot data for region `region_id`.
pub fn decode(region_id: u64, data: &[u8]) -> Result<RegionSnapshot> {
    let bad = |what: &str| Error::Corrupted(format!("region snapshot: {what}"));
    let mut r = Reader { data };
    if r.take(MAGIC.len())? != MAGIC {
        return Err(bad("bad magic"));
    }
    let version = r.u8()?;
    if version != VERSION && version != VERSION_WITH_REVISION_RECORDS {
        return Err(bad("unknown version"));
    }
    if r.u64()? != region_id {
        return Err(bad("for another region"));
    }
    let applied_revision = r.u64()? as i64;
    let compact_revision = r.u64()? as i64;
    let region = metapb::Region::decode(r.bytes()?.as_slice()).map_err(|_| bad("region meta"))?;
    if region.id != region_id {
        return Err(bad("region meta of another region"));
    }
    if region.region_epoch.is_none() || region.peers.is_empty() {
        return Err(bad("region meta without epoch or peers"));
    }
    let mut snap = RegionSnapshot {
        region,
        applied_revision,
        compact_revision,
        ..Default::default()
    };
    let region = &snap.region;
    let (mut mvcc, mut revision) = (Vec::new(), Vec::new());
    let (mut locks, mut txn_records) = (Vec::new(), Vec::new());
    let (mut merge_records, mut merging) = (Vec::new(), None);
    loop {
        match r.u8()? {
            TAG_END => break,
            TAG_MVCC => {
                let (k, v) = (r.bytes()?, r.bytes()?);
                let (user_key, _) = codec::decode_mvcc_key(&k).map_err(|_| bad("mvcc key"))?;
                codec::Version::decode(&v).map_err(|_| bad("mvcc value"))?;
                codec::record_sub(&v).map_err(|_| bad("mvcc value"))?;
                if !in_range(region, &user_key) {
                    return Err(bad("mvcc key outside the region"));
                }
                mvcc.push((k, v));
            }
            TAG_REVISION if version == VERSION_WITH_REVISION_RECORDS => {
                let (k, v) = (r.bytes()?, r.bytes()?);
                codec::decode_revision_key(&k).map_err(|_| bad("revision key"))?;
                if !in_range(region, &v) {
                    return Err(bad("revision entry outside the region"));
                }
                revision.push((k, v));
            }
            TAG_LOCK => {
                let (_, v) = (r.bytes()?, r.bytes()?);
                let lock = TxnLockRecord::decode(v.as_slice()).map_err(|_| bad("lock"))?;
                if !lock
                    .spans
                    .iter()
                    .all(|s| txn::region_covers(region, &txn::span_range(s)))
                {
                    return Err(bad("lock outside the region"));
                }
                locks.push(lock);
            }
            TAG_TXN_RECORD => {
                let (k, v) = (r.bytes()?, r.bytes()?);
                let record =
                    TxnCommitRecord::decode(v.as_slice()).map_err(|_| bad("transaction record"))?;
                if !in_range(region, &k) {
                    return Err(bad("transaction record outside the region"));
                }
                txn_records.push((k, record));
            }
            TAG_MERGE_RECORD => {
                let (k, v) = (r.bytes()?, r.bytes()?);
                let record = MergeRecord::decode(v.as_slice()).map_err(|_| bad("merge record"))?;
                if !in_range(region, &k) {
                    return Err(bad("merge record outside the region"));
                }
                merge_records.push((k, record));
            }
            TAG_MERGE_STATE => {
                let (_, v) = (r.bytes()?, r.bytes()?);
                merging = Some(MergeState::decode(v.as_slice()).map_err(|_| bad("merge state"))?);
            }
            _ => return Err(bad("unknown record tag")),
        }
    }
    if !r.data.is_empty() {
        return Err(bad("trailing bytes"));
    }
    snap.mvcc = mvcc;
    snap.revision = revision;
    snap.locks = locks;
    snap.txn_records = txn_records;
    snap.merge_records = merge_records;
    snap.merging = merging;
    Ok(snap)
}

/// Stages into `wb` the replacement of the MVCC data (versions, their key
/// index, revision index) in the snapshot region's range by `snap`'s. The
/// range is the snapshot's, not the replica's: a replica created on demand
/// has no range yet. Deletes come first in the batch, so puts of the same
/// keys win.
pub fn stage_apply(kv: &KvEngine, wb: &mut WriteBatch, snap: &RegionSnapshot) -> Result<()> {
    let region = &snap.region;
    let mvcc = MvccStore::new(kv.clone());
    // The MVCC CF with its key index (rebuilt from the versions, not
    // shipped).
    mvcc.stage_clear(wb, &region.start_key, &region.end_key)?;
    // The revision CF entries of the versions the replica holds in the
    // range, found from their records: bounded by the range.
    mvcc.snapshot()
        .versions(&region.start_key, &region.end_key, |_, _, revision_key| {
            if let Some(revision_key) = revision_key {
                kv.delete_from(wb, cf::REVISION, revision_key);
            }
            Ok::<_, Error>(())
        })?;
    for (k, v) in &snap.mvcc {
        mvcc.stage_version_record(wb, k, v);
        if let Some(sub) = codec::record_sub(v)? {
            let (user_key, rev) = codec::decode_mvcc_key(k)?;
            kv.put_to(wb, cf::REVISION, &codec::revision_key(rev, sub), &user_key);
        }
    }
    for (k, v) in &snap.revision {
        kv.put_to(wb, cf::REVISION, k, v);
    }
    let (lower, upper) = keys::txn_lock_bounds(region.id);
    kv.delete_range_to(wb, cf::META, &lower, &upper);
    for lock in &snap.locks {
        kv.put_to(
            wb,
            cf::META,
            &keys::txn_lock_key(region.id, lock.txn_id),
            &lock.encode_to_vec(),
        );
    }
    let (lower, upper) = keys::txn_record_bounds(&region.start_key, &region.end_key);
    kv.delete_range_to(wb, cf::META, &lower, &upper);
    for (primary, record) in &snap.txn_records {
        kv.put_to(
            wb,
            cf::META,
            &keys::txn_record_key(primary, record.txn_id),
            &record.encode_to_vec(),
        );
    }
    let (lower, upper) = keys::merge_record_bounds(&region.start_key, &region.end_key);
    kv.delete_range_to(wb, cf::META, &lower, &upper);
    for (end_key, record) in &snap.merge_records {
        kv.put_to(
            wb,
            cf::META,
            &keys::merge_record_key(end_key, record.source_id),
            &record.encode_to_vec(),
        );
    }
    Ok(())
}

/// A region snapshot installed by [`install`]: the replica's new state.
pub(crate) struct Installed {
    pub apply_state: RaftApplyState,
    pub region: metapb::Region,
    pub locks: Vec<TxnLockRecord>,
    pub merging: Option<MergeState>,
}

/// Replaces region `region_id`'s data, region meta, apply state and raft
/// log by `snap`'s (see the module docs for the order of writes), and
/// updates raft-rs's `store` to match. `hs` is the hard state to persist
/// with the new log (its commit already at the snapshot). `decoded` is the
/// snapshot as decoded when it arrived, with its index and term; it is
/// used if it is this snapshot, otherwise the data is decoded again.
pub(crate) fn install(
    kv: &KvEngine,
    log: &RaftLogEngine,
    store: &mut PeerStorage,
    region_id: u64,
    snap: &Snapshot,
    mut hs: HardState,
    decoded: Option<(u64, u64, RegionSnapshot)>,
) -> Result<Installed> {
    let meta = snap.get_metadata();
    let (index, term) = (meta.index, meta.term);
    let data = match decoded {
        Some((i, t, data)) if i == index && t == term => data,
        _ => decode(region_id, snap.get_data())?,
    };
    let mut wb = WriteBatch::default();
    // Until splits exist, the snapshot's range is the replica's own (or
    // the first one a replica created on demand gets).
    stage_apply(kv, &mut wb, &data)?;
    let region_state = RegionLocalState {
        region: Some(data.region.clone()),
        state: if data.merging.is_some() {
            PeerState::Merging
        } else {
            PeerState::Normal
        } as i32,
        merge_state: data.merging.clone(),
    };
    kv.put_to(
        &mut wb,
        cf::META,
        &keys::region_state_key(region_id),
        &region_state.encode_to_vec(),
    );
    let mut apply_state = RaftApplyState {
        applied_index: index,
        applied_term: term,
        truncated_index: index,
        truncated_term: term,
        applied_revision: data.applied_revision,
        compact_revision: data.compact_revision,
        pending_compact_revision: 0,
    };
    if data.compact_revision > 0 {
        // The leader's physical clean-up may not be done; redo it here.
        apply_state.pending_compact_revision = data.compact_revision;
    }
    kv.put_to(
        &mut wb,
        cf::META,
        &keys::apply_state_key(region_id),
        &apply_state.encode_to_vec(),
    );
    kv.write_sync(wb)?;

    hs.term = hs.term.max(term);
    let mut batch = RaftLogBatch::default();
    batch.clean(region_id);
    batch.put_hard_state(region_id, &hs)?;
    batch.put_conf_state(region_id, meta.get_conf_state())?;
    log.write(&mut batch, true)?;

    store.set_truncated(index, term);
    store.set_conf_state(meta.get_conf_state().clone());
    store.set_hard_state(hs);
    info!(
        region_id,
        index,
        term,
        mvcc_entries = data.mvcc.len(),
        revision_entries = data.revision.len(),
        applied_revision = data.applied_revision,
        "installed region snapshot"
    );
    Ok(Installed {
        apply_state,
        region: data.region,
        locks: data.locks,
        merging: data.merging,
    })
}

#[cfg(test)]
mod tests;
