//! Region snapshots: the whole state machine of a region as raft snapshot
//! data, for replicas too far behind to catch up from the leader's log.
//!
//! Encoding of `Snapshot.data` (all integers big-endian):
//!
//! ```text
//! magic    b"MSRS" | version u8 = 3
//! region_id u64 | applied_revision i64 | compact_revision i64
//! region_len u32 | region (prost `metapb::Region`: range, epoch, peers)
//! records: tag u8 (1 = MVCC CF, 2 = revision CF, 3 = transaction lock,
//!          4 = transaction decision) | key_len u32 | key | value_len u32
//!          | value
//!          (a lock: key = transaction id u64, value = `TxnLockRecord`; a
//!          decision: key = its primary key, value = `TxnCommitRecord`)
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
//! reconciles (`Store::reconcile_log`). Until splits exist the snapshot's
//! range is the replica's own (or the first one a replica created on demand
//! gets).

use engine::{cf, KvEngine, KvSnapshot, RaftLogBatch, RaftLogEngine, WriteBatch};
use mvcc::{codec, MvccStore};
use prost::Message as _;
use proto::metapb;
use proto::raft_serverpb::{
    PeerState, RaftApplyState, RegionLocalState, TxnCommitRecord, TxnLockRecord,
};
use raft::eraftpb::{HardState, Snapshot};
use tracing::info;

use crate::keys;
use crate::storage::PeerStorage;
use crate::txn;
use crate::{Error, Result};

const MAGIC: &[u8] = b"MSRS";
const VERSION: u8 = 3;
const TAG_END: u8 = 0;
const TAG_MVCC: u8 = 1;
const TAG_REVISION: u8 = 2;
const TAG_LOCK: u8 = 3;
const TAG_TXN_RECORD: u8 = 4;

/// The decoded content of a region snapshot.
#[derive(Debug, Default, PartialEq)]
pub struct RegionSnapshot {
    /// The region meta at the snapshot's applied index.
    pub region: metapb::Region,
    pub applied_revision: i64,
    pub compact_revision: i64,
    pub mvcc: Vec<(Vec<u8>, Vec<u8>)>,
    pub revision: Vec<(Vec<u8>, Vec<u8>)>,
    pub locks: Vec<TxnLockRecord>,
    /// (primary key, decision) of the transactions this region decided.
    pub txn_records: Vec<(Vec<u8>, TxnCommitRecord)>,
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
    let snap = kv.snapshot();
    let apply_state = match snap.get(cf::META, &keys::apply_state_key(region_id))? {
        Some(raw) => RaftApplyState::decode(raw.as_slice())?,
        None => {
            return Err(Error::Corrupted(format!(
                "region {region_id} without apply state"
            )))
        }
    };
    let region = match snap.get(cf::META, &keys::region_state_key(region_id))? {
        Some(raw) => RegionLocalState::decode(raw.as_slice())?
            .region
            .unwrap_or_default(),
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
    scan(&snap, cf::MVCC, region, |k, v| {
        put_record(&mut out, TAG_MVCC, k, v)
    })?;
    scan(&snap, cf::REVISION, region, |k, v| {
        put_record(&mut out, TAG_REVISION, k, v)
    })?;
    for lock in txn::snapshot_locks(&snap, region_id)? {
        put_record(
            &mut out,
            TAG_LOCK,
            &lock.txn_id.to_be_bytes(),
            &lock.encode_to_vec(),
        )?;
    }
    for (primary, record) in txn::snapshot_records(&snap, region)? {
        put_record(&mut out, TAG_TXN_RECORD, &primary, &record.encode_to_vec())?;
    }
    out.push(TAG_END);
    Ok((apply_state, out))
}

/// Calls `f` on every entry of `region` in `cf` (MVCC or revision CF).
fn scan(
    snap: &KvSnapshot<'_>,
    cf_name: &str,
    region: &metapb::Region,
    mut f: impl FnMut(&[u8], &[u8]) -> Result<()>,
) -> Result<()> {
    let (lower, upper) = if cf_name == cf::MVCC {
        (
            codec::mvcc_lower_bound(&region.start_key),
            codec::mvcc_upper_bound(&region.end_key),
        )
    } else {
        // Revision CF keys are revisions: the region's entries are found
        // by their value (the user key), over the whole CF.
        (Vec::new(), Vec::new())
    };
    let mut it = snap.iter(cf_name, &lower, &upper);
    it.seek(&lower);
    while let (Some(k), Some(v)) = (it.key(), it.value()) {
        if cf_name == cf::MVCC || in_range(region, v) {
            f(k, v)?;
        }
        it.next();
    }
    it.status().map_err(engine::Error::from)?;
    Ok(())
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
    if r.u8()? != VERSION {
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
    loop {
        match r.u8()? {
            TAG_END => break,
            TAG_MVCC => {
                let (k, v) = (r.bytes()?, r.bytes()?);
                let (user_key, _) = codec::decode_mvcc_key(&k).map_err(|_| bad("mvcc key"))?;
                codec::Version::decode(&v).map_err(|_| bad("mvcc value"))?;
                if !in_range(region, &user_key) {
                    return Err(bad("mvcc key outside the region"));
                }
                mvcc.push((k, v));
            }
            TAG_REVISION => {
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
    // The revision CF is ordered by revision, not key: finding the region's
    // entries costs a scan of the node's whole revision index.
    let mut it = kv.iter(cf::REVISION, &[], &[]);
    it.seek_to_first();
    while let (Some(k), Some(v)) = (it.key(), it.value()) {
        if in_range(region, v) {
            kv.delete_from(wb, cf::REVISION, k);
        }
        it.next();
    }
    it.status().map_err(engine::Error::from)?;
    for (k, v) in &snap.mvcc {
        mvcc.stage_version_record(wb, k, v);
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
    Ok(())
}

/// A region snapshot installed by [`install`]: the replica's new state.
pub(crate) struct Installed {
    pub apply_state: RaftApplyState,
    pub region: metapb::Region,
    pub locks: Vec<TxnLockRecord>,
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
        state: PeerState::Normal as i32,
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
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region() -> metapb::Region {
        metapb::Region {
            id: 7,
            start_key: b"b".to_vec(),
            end_key: b"d".to_vec(),
            region_epoch: Some(metapb::RegionEpoch {
                conf_ver: 2,
                version: 1,
            }),
            peers: vec![metapb::Peer {
                id: 1,
                node_id: 1,
                role: 0,
            }],
        }
    }

    fn encoded_with(region: &metapb::Region, records: &[(u8, Vec<u8>, Vec<u8>)]) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        out.push(VERSION);
        out.extend_from_slice(&7u64.to_be_bytes());
        out.extend_from_slice(&3i64.to_be_bytes());
        out.extend_from_slice(&1i64.to_be_bytes());
        put_bytes(&mut out, &region.encode_to_vec()).unwrap();
        for (tag, k, v) in records {
            put_record(&mut out, *tag, k, v).unwrap();
        }
        out.push(TAG_END);
        out
    }

    fn encoded(records: &[(u8, Vec<u8>, Vec<u8>)]) -> Vec<u8> {
        encoded_with(&region(), records)
    }

    #[test]
    fn decodes_valid_and_rejects_malformed() {
        let put = codec::Version::Tombstone.encode();
        let good = encoded(&[
            (TAG_MVCC, codec::mvcc_key(b"c", 3), put.clone()),
            (
                TAG_REVISION,
                codec::revision_key(3, 0).to_vec(),
                b"c".to_vec(),
            ),
        ]);
        let snap = decode(7, &good).unwrap();
        assert_eq!(snap.region, region());
        assert_eq!(snap.applied_revision, 3);
        assert_eq!(snap.compact_revision, 1);
        assert_eq!(snap.mvcc.len(), 1);
        assert_eq!(snap.revision.len(), 1);

        for n in 0..good.len() {
            assert!(decode(7, &good[..n]).is_err(), "prefix {n}");
        }
        let mut trailing = good.clone();
        trailing.push(0);
        assert!(decode(7, &trailing).is_err());
        assert!(decode(8, &good).is_err());
        let mut other = region();
        other.id = 8;
        assert!(decode(7, &encoded_with(&other, &[])).is_err());
        let mut no_peers = region();
        no_peers.peers.clear();
        assert!(decode(7, &encoded_with(&no_peers, &[])).is_err());
        let outside = encoded(&[(TAG_MVCC, codec::mvcc_key(b"e", 3), put.clone())]);
        assert!(decode(7, &outside).is_err());
        let outside = encoded(&[(
            TAG_REVISION,
            codec::revision_key(3, 0).to_vec(),
            b"a".to_vec(),
        )]);
        assert!(decode(7, &outside).is_err());
        // Transaction locks and decisions travel with the region's data,
        // and only those of the region's keys.
        let lock = |key: &[u8]| TxnLockRecord {
            txn_id: 5,
            primary_key: key.to_vec(),
            spans: vec![txn::range_span(&mvcc::KeyRange {
                start: key.to_vec(),
                end: None,
            })],
            base_revision: 2,
        };
        let record = TxnCommitRecord {
            txn_id: 5,
            revision: 3,
            mutations: Vec::new(),
        };
        let with_txn = encoded(&[
            (
                TAG_LOCK,
                5u64.to_be_bytes().to_vec(),
                lock(b"c").encode_to_vec(),
            ),
            (TAG_TXN_RECORD, b"c".to_vec(), record.encode_to_vec()),
        ]);
        let snap = decode(7, &with_txn).unwrap();
        assert_eq!(snap.locks, vec![lock(b"c")]);
        assert_eq!(snap.txn_records, vec![(b"c".to_vec(), record.clone())]);
        let outside = encoded(&[(
            TAG_LOCK,
            5u64.to_be_bytes().to_vec(),
            lock(b"e").encode_to_vec(),
        )]);
        assert!(decode(7, &outside).is_err());
        let outside = encoded(&[(TAG_TXN_RECORD, b"a".to_vec(), record.encode_to_vec())]);
        assert!(decode(7, &outside).is_err());
        let bad_key = encoded(&[(TAG_MVCC, b"xx".to_vec(), put)]);
        assert!(decode(7, &bad_key).is_err());
        let mut huge_len = MAGIC.to_vec();
        huge_len.push(VERSION);
        huge_len.extend_from_slice(&7u64.to_be_bytes());
        huge_len.extend_from_slice(&[0; 16]);
        put_bytes(&mut huge_len, &region().encode_to_vec()).unwrap();
        huge_len.extend_from_slice(&[TAG_MVCC, 0xFF, 0xFF, 0xFF, 0xFF]);
        assert!(decode(7, &huge_len).is_err());
        let mut huge_meta = MAGIC.to_vec();
        huge_meta.push(VERSION);
        huge_meta.extend_from_slice(&7u64.to_be_bytes());
        huge_meta.extend_from_slice(&[0; 16]);
        huge_meta.extend_from_slice(&[0xFF, 0xFF, 0xFF, 0xFF]);
        assert!(decode(7, &huge_meta).is_err());
    }

    /// A store with `keys` put at revisions 2, 3, ... and then `deleted`
    /// deleted.
    fn store_with(dir: &std::path::Path, keys: &[&str], deleted: &[&str]) -> MvccStore {
        use proto::raft_cmdpb::{mutation::Op, Mutation};
        let store = MvccStore::new(KvEngine::open(dir).unwrap());
        let changes = keys
            .iter()
            .map(|k| (k, Op::Put))
            .chain(deleted.iter().map(|k| (k, Op::Delete)));
        for (rev, (key, op)) in (2..).zip(changes) {
            let mut wb = WriteBatch::default();
            let m = Mutation {
                op: op as i32,
                key: key.as_bytes().to_vec(),
                version: 1,
                value: b"v".to_vec(),
                ..Default::default()
            };
            store.stage_changes(&mut wb, rev, &[m]);
            store.engine().write(wb).unwrap();
        }
        store
    }

    #[test]
    fn installing_rebuilds_the_key_index_of_the_range() {
        let dir = tempfile::tempdir().unwrap();
        let leader = store_with(&dir.path().join("a"), &["b1", "b2", "c1", "c2"], &["c1"]);
        let follower = store_with(
            &dir.path().join("b"),
            &["a1", "b1", "b9", "c5", "d1"],
            &["b1"],
        );
        let mut snap = RegionSnapshot {
            region: region(),
            ..Default::default()
        };
        let view = leader.engine().snapshot();
        scan(&view, cf::MVCC, &snap.region, |k, v| {
            snap.mvcc.push((k.to_vec(), v.to_vec()));
            Ok(())
        })
        .unwrap();
        let mut wb = WriteBatch::default();
        stage_apply(follower.engine(), &mut wb, &snap).unwrap();
        follower.engine().write(wb).unwrap();
        let view = follower.snapshot();
        view.check_key_index().unwrap();
        let count = |start: &[u8], end: &[u8]| {
            let range = mvcc::KeyRange::from_etcd(start, end);
            view.range(&range, i64::MAX, 0, false).unwrap().count
        };
        // b1, b2, c2 from the leader; a1 and d1 outside the region kept.
        assert_eq!(count(b"b", b"d"), 3);
        assert_eq!(count(b"a", b"\0"), 5);
    }
}
