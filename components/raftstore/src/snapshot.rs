//! Region snapshots: the whole state machine of a region, for replicas too
//! far behind to catch up from the leader's log. A snapshot is generated
//! off the replica's thread (`gen`) into a file, which travels and is
//! validated and installed as a file (`file`, `install`); the raft
//! snapshot's data is only the file's descriptor. Nodes of an older
//! version put the encoding below in the raft snapshot's data itself,
//! which is still installed.
//!
//! Encoding of a snapshot file (all integers big-endian):
//!
//! ```text
//! magic    b"MSRS" | version u8 = 4
//! region_id u64 | applied_revision i64 | compact_revision i64
//! region_len u32 | region (prost `metapb::Region`: range, epoch, peers)
//! records: tag u8 (1 = MVCC CF, 2 = revision CF, 3 = transaction lock,
//!          4 = transaction decision, 5 = merge decision, 6 = the region's
//!          merge state, 7 = a lease, 8 = a key attached to a lease) |
//!          key_len u32 | key | value_len u32 |
//!          value
//!          (an MVCC record: its MVCC CF key and version record, which
//!          holds the sub-revision, so the version's revision CF entry is
//!          derived from it and version 4 sends no revision CF records;
//!          version 3, still read, sent them and has no tags 5 and 6)
//!          (a lock: key = transaction id u64, value = `TxnLockRecord`; a
//!          decision: key = its primary key, value = `TxnCommitRecord`; a
//!          merge decision: key = the merged source's end key, value =
//!          `MergeRecord`; the merge state: empty key, value `MergeState`,
//!          present only while the region is frozen for a merge; a lease:
//!          empty key, value `LeaseRecord`; an attachment: key = the
//!          attached key, value = the lease id i64)
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
//! state and raft log by the snapshot's, writing RocksDB in batches of
//! bounded size between a first synced write that records the install
//! (and makes reads of the region refuse) and a last one that puts the
//! region state (`Normal`) and the apply state (applied and truncated at
//! the snapshot's index and term, with the snapshot's revisions, and its
//! compaction revision pending again since the leader's physical clean-up
//! may not be done) and drops the record; then the region's raft-engine
//! log is replaced (cleaned, hard state with the commit at the snapshot
//! and a term not below it, the snapshot's conf state) with fsync; then
//! raft-rs's storage is told. A crash before the first write leaves the
//! old state and the leader sends the snapshot again; a crash between the
//! first and the last leaves the record, and start-up does the install
//! again ([`finish_installs`], see `install`); a crash after the last
//! leaves the new apply state with the old log, which start-up reconciles
//! (`Store::reconcile_log`).
//!
//! Work is bounded by the region's key range: generating walks the range's
//! MVCC CF keys (records of the old format, without a sub-revision, go out
//! re-encoded with the sub-revision looked up under their revision), and
//! installing finds the revision CF entries to replace from the replica's
//! own versions in the range and the snapshot's records, never by a scan
//! of the node's revision CF.

use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};

use engine::{cf, KvEngine};
use mvcc::{codec, MvccStore};
use prost::Message as _;
use proto::metapb;
use proto::raft_serverpb::{
    LeaseRecord, MergeRecord, MergeState, RaftApplyState, RegionLocalState, TxnCommitRecord,
    TxnLockRecord,
};
use raft::eraftpb::Snapshot;

use crate::keys;
use crate::lease;
use crate::txn;
use crate::{Error, Result};

mod file;
mod gen;
mod install;

pub use file::{Descriptor, SnapDir, SnapshotSink};
pub(crate) use gen::Generator;
pub(crate) use install::{
    clear_removed, finish_installs, install, pending_install_files, INSTALL_BATCH_BYTES,
};
#[cfg(test)]
use install::{install_data, write_data};

const MAGIC: &[u8] = b"MSRS";
/// Largest key or value a record may have (etcd's are far smaller): a
/// length above it is a corrupt snapshot, not an allocation to attempt.
const MAX_FIELD: u32 = 64 << 20;
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
const TAG_LEASE: u8 = 7;
const TAG_LEASE_KEY: u8 = 8;

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
    /// The leases whose owner keys the region holds (see `lease`).
    pub leases: Vec<LeaseRecord>,
    /// Their attached keys (lease id, key).
    pub lease_keys: Vec<(i64, Vec<u8>)>,
    /// For a snapshot that came as a file (see `file`): the file, whose
    /// MVCC records installing reads; `mvcc` and `revision` are empty.
    pub file: Option<PathBuf>,
}

fn in_range(region: &metapb::Region, user_key: &[u8]) -> bool {
    user_key >= region.start_key.as_slice()
        && (region.end_key.is_empty() || user_key < region.end_key.as_slice())
}

fn put_bytes(out: &mut impl Write, b: &[u8]) -> Result<()> {
    let len = u32::try_from(b.len())
        .ok()
        .filter(|&n| n <= MAX_FIELD)
        .ok_or_else(|| Error::Corrupted("snapshot record field too large".into()))?;
    out.write_all(&len.to_be_bytes())?;
    out.write_all(b)?;
    Ok(())
}

fn put_record(out: &mut impl Write, tag: u8, key: &[u8], value: &[u8]) -> Result<()> {
    out.write_all(&[tag])?;
    put_bytes(out, key)?;
    put_bytes(out, value)
}

/// [`generate_into`] a buffer.
#[cfg(test)]
pub fn generate(kv: &KvEngine, region_id: u64) -> Result<(RaftApplyState, Vec<u8>)> {
    let mut out = Vec::new();
    let (apply_state, _) = generate_into(kv, region_id, &mut out)?;
    Ok((apply_state, out))
}

/// Writes region `region_id`'s meta, apply state and data, read from one
/// RocksDB snapshot, to `out`, so the data and meta are exactly the state
/// at the returned apply state's applied index (apply writes all three in
/// one batch); returns that apply state and region meta.
pub fn generate_into(
    kv: &KvEngine,
    region_id: u64,
    out: &mut impl Write,
) -> Result<(RaftApplyState, metapb::Region)> {
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
    out.write_all(MAGIC)?;
    out.write_all(&[VERSION])?;
    out.write_all(&region_id.to_be_bytes())?;
    out.write_all(&apply_state.applied_revision.to_be_bytes())?;
    out.write_all(&apply_state.compact_revision.to_be_bytes())?;
    put_bytes(out, &region.encode_to_vec())?;
    view.versions(&region.start_key, &region.end_key, |k, v, _| {
        put_record(out, TAG_MVCC, k, v)
    })?;
    for lock in txn::snapshot_locks(snap, region_id)? {
        put_record(
            out,
            TAG_LOCK,
            &lock.txn_id.to_be_bytes(),
            &lock.encode_to_vec(),
        )?;
    }
    for (primary, record) in txn::snapshot_records(snap, region)? {
        put_record(out, TAG_TXN_RECORD, &primary, &record.encode_to_vec())?;
    }
    let (lower, upper) = keys::merge_record_bounds(&region.start_key, &region.end_key);
    let mut it = snap.iter(cf::META, &lower, &upper);
    it.seek(&lower);
    while let (Some(k), Some(v)) = (it.key(), it.value()) {
        if let Some(end_key) = keys::decode_merge_record_key(k) {
            put_record(out, TAG_MERGE_RECORD, &end_key, v)?;
        }
        it.next();
    }
    it.status().map_err(engine::Error::from)?;
    drop(it);
    if let Some(m) = &merging {
        put_record(out, TAG_MERGE_STATE, &[], &m.encode_to_vec())?;
    }
    for record in lease::records(snap, region)? {
        put_record(out, TAG_LEASE, &[], &record.encode_to_vec())?;
    }
    for (id, key) in lease::attachments(snap, region)? {
        put_record(out, TAG_LEASE_KEY, &key, &id.to_be_bytes())?;
    }
    out.write_all(&[TAG_END])?;
    Ok((apply_state, region.clone()))
}

/// Reads the encoding from a byte source, checking every length.
struct Reader<R> {
    src: R,
}

impl<R: Read> Reader<R> {
    fn fill(&mut self, buf: &mut [u8]) -> Result<()> {
        self.src.read_exact(buf).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => {
                Error::Corrupted("truncated region snapshot".into())
            }
            _ => Error::Io(e),
        })
    }

    fn u8(&mut self) -> Result<u8> {
        let mut b = [0u8; 1];
        self.fill(&mut b)?;
        Ok(b[0])
    }

    fn u32(&mut self) -> Result<u32> {
        let mut b = [0u8; 4];
        self.fill(&mut b)?;
        Ok(u32::from_be_bytes(b))
    }

    fn u64(&mut self) -> Result<u64> {
        let mut b = [0u8; 8];
        self.fill(&mut b)?;
        Ok(u64::from_be_bytes(b))
    }

    fn bytes(&mut self) -> Result<Vec<u8>> {
        let n = self.u32()?;
        if n > MAX_FIELD {
            return Err(Error::Corrupted("region snapshot: field too large".into()));
        }
        let mut out = vec![0u8; n as usize];
        self.fill(&mut out)?;
        Ok(out)
    }

    /// Whether the source is exhausted.
    fn at_end(&mut self) -> Result<bool> {
        let mut b = [0u8; 1];
        Ok(self.src.read(&mut b)? == 0)
    }
}

/// Decodes and validates the data of `snap`, a raft snapshot of region
/// `region_id`: the descriptor of a file received into `dir` (see `file`),
/// or the region data itself, as nodes of an older version send it.
pub fn decode_data(region_id: u64, snap: &Snapshot, dir: &SnapDir) -> Result<RegionSnapshot> {
    let data = snap.get_data();
    if !Descriptor::is_descriptor(data) {
        return decode(region_id, data);
    }
    let desc = Descriptor::decode(data)?;
    let meta = snap.get_metadata();
    if (desc.region_id, desc.index, desc.term) != (region_id, meta.index, meta.term) {
        return Err(Error::Corrupted(
            "snapshot descriptor does not match its snapshot".into(),
        ));
    }
    decode_file(region_id, &dir.received(&desc))
}

/// The file in `dir` a received raft snapshot describes, if its data is
/// a descriptor.
pub fn received_file(snap: &Snapshot, dir: &SnapDir) -> Option<PathBuf> {
    Descriptor::decode(snap.get_data())
        .ok()
        .map(|desc| dir.received(&desc))
}

pub(crate) use file::remove as remove_file;

/// Decodes and validates snapshot data for region `region_id`.
pub fn decode(region_id: u64, data: &[u8]) -> Result<RegionSnapshot> {
    let (mut mvcc, mut revision) = (Vec::new(), Vec::new());
    let mut snap = decode_from(region_id, data, &mut |tag, k, v| {
        match tag {
            TAG_MVCC => mvcc.push((k, v)),
            _ => revision.push((k, v)),
        }
        Ok(())
    })?;
    snap.mvcc = mvcc;
    snap.revision = revision;
    Ok(snap)
}

/// Decodes and validates the snapshot file at `path` for region
/// `region_id`, without keeping its MVCC records: installing reads them
/// from the file again (`RegionSnapshot::file`).
pub fn decode_file(region_id: u64, path: &Path) -> Result<RegionSnapshot> {
    let mut snap = decode_from(region_id, open_file(path)?, &mut |_, _, _| Ok(()))?;
    snap.file = Some(path.to_owned());
    Ok(snap)
}

fn open_file(path: &Path) -> Result<BufReader<File>> {
    Ok(BufReader::with_capacity(1 << 20, File::open(path)?))
}

/// A data record's tag, key and value, as decoding meets it.
type OnData<'a> = dyn FnMut(u8, Vec<u8>, Vec<u8>) -> Result<()> + 'a;

/// Decodes and validates a snapshot read from `src`, handing its data
/// records (MVCC, and revision records of version 3) to `on_data`.
fn decode_from(region_id: u64, src: impl Read, on_data: &mut OnData<'_>) -> Result<RegionSnapshot> {
    let bad = |what: &str| Error::Corrupted(format!("region snapshot: {what}"));
    let mut r = Reader { src };
    let mut magic = [0u8; 4];
    r.fill(&mut magic)?;
    if magic[..] != *MAGIC {
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
    let (mut locks, mut txn_records) = (Vec::new(), Vec::new());
    let (mut merge_records, mut merging) = (Vec::new(), None);
    let (mut leases, mut lease_keys) = (Vec::new(), Vec::new());
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
                on_data(TAG_MVCC, k, v)?;
            }
            TAG_REVISION if version == VERSION_WITH_REVISION_RECORDS => {
                let (k, v) = (r.bytes()?, r.bytes()?);
                codec::decode_revision_key(&k).map_err(|_| bad("revision key"))?;
                if !in_range(region, &v) {
                    return Err(bad("revision entry outside the region"));
                }
                on_data(TAG_REVISION, k, v)?;
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
            TAG_LEASE => {
                let (_, v) = (r.bytes()?, r.bytes()?);
                let record = LeaseRecord::decode(v.as_slice()).map_err(|_| bad("lease"))?;
                if !in_range(region, &lease::owner_key(record.id)) {
                    return Err(bad("lease outside the region"));
                }
                leases.push(record);
            }
            TAG_LEASE_KEY => {
                let (k, v) = (r.bytes()?, r.bytes()?);
                let id: [u8; 8] = v.as_slice().try_into().map_err(|_| bad("lease key"))?;
                let id = i64::from_be_bytes(id);
                if !in_range(region, &lease::owner_key(id)) {
                    return Err(bad("lease key outside the region"));
                }
                lease_keys.push((id, k));
            }
            _ => return Err(bad("unknown record tag")),
        }
    }
    if !r.at_end()? {
        return Err(bad("trailing bytes"));
    }
    snap.locks = locks;
    snap.txn_records = txn_records;
    snap.merge_records = merge_records;
    snap.merging = merging;
    snap.leases = leases;
    snap.lease_keys = lease_keys;
    Ok(snap)
}

#[cfg(test)]
mod tests;
