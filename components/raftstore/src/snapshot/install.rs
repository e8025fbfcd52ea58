//! Installing a region snapshot into the node's engines, and clearing the
//! data of a replica removed from its region. Both start by clearing the
//! region's key range of everything a replica keeps there (see
//! [`clear_region`]); the work is bounded by that range, never a scan of
//! the node's whole revision index.
//!
//! Both write in batches of about [`INSTALL_BATCH_BYTES`], so memory stays
//! bounded whatever the region's size, and each batch leaves every version
//! whole (record, key index entry, revision index entry) or gone. An
//! install is bracketed: its first write (synced) records the install
//! (`SnapshotInstall`, with the snapshot's file kept) and sets the apply
//! state's `installing_snapshot`, which makes reads of the region refuse
//! (`RegionHandle::read_state`); its last write (synced) puts the new
//! region and apply states and deletes the record. A crash in between
//! leaves the record, and start-up ([`finish_installs`]) does the install
//! again from its first batch. A removed replica's clearing is bracketed by
//! its clean-up mark the same way.

use engine::{cf, KvEngine, RaftLogBatch, RaftLogEngine, WriteBatch};
use mvcc::{codec, MvccStore};
use prost::Message as _;
use proto::metapb;
use proto::raft_serverpb::{
    MergeState, PeerState, RaftApplyState, RegionLocalState, SnapshotInstall, TxnLockRecord,
};
use protobuf::Message as _;
use raft::eraftpb::{ConfState, HardState, Snapshot};
use tracing::info;

use super::file::{self, Descriptor, SnapDir};
use super::{decode_data, decode_from, open_file, RegionSnapshot, TAG_MVCC, TAG_REVISION};
use crate::keys;
use crate::lease;
use crate::storage::PeerStorage;
use crate::{Error, Result};

/// Bytes of staged changes after which an install writes what it staged
/// and starts a new batch, by default (`StoreOptions::install_batch_bytes`):
/// memory while installing stays at about this, whatever the region's size.
pub(crate) const INSTALL_BATCH_BYTES: usize = 1 << 20;

/// Writes staged changes to the KV engine in batches of about `limit`
/// bytes, without sync (the install's last write is synced). `on_write`
/// sees the number of each batch written; tests fail it to stop an
/// install half-way, as a crash would.
struct Batches<'a> {
    kv: &'a KvEngine,
    wb: WriteBatch,
    limit: usize,
    written: usize,
    on_write: &'a mut dyn FnMut(usize) -> Result<()>,
}

impl Batches<'_> {
    fn maybe_write(&mut self) -> Result<()> {
        if self.wb.size_in_bytes() >= self.limit {
            self.write()?;
        }
        Ok(())
    }

    fn write(&mut self) -> Result<()> {
        if self.wb.is_empty() {
            return Ok(());
        }
        self.kv.write(std::mem::take(&mut self.wb))?;
        self.written += 1;
        (self.on_write)(self.written)
    }
}

/// Removes everything a replica of `region` keeps in its key range, in
/// batches, the last one left staged in `out`: the MVCC versions with
/// their key index and revision index entries (found from the versions'
/// records, version by version so that every batch leaves each version
/// whole or gone), then by range what the walk cannot see (key index
/// entries without a version), the region's transaction locks, and the
/// transaction and merge decisions kept under its keys.
fn clear_region(region: &metapb::Region, out: &mut Batches<'_>) -> Result<()> {
    let kv = out.kv;
    let mvcc = MvccStore::new(kv.clone());
    mvcc.snapshot().versions(
        &region.start_key,
        &region.end_key,
        |mvcc_key, _, revision_key| {
            kv.delete_from(&mut out.wb, cf::MVCC, mvcc_key);
            kv.delete_from(&mut out.wb, cf::MVCC_KEYS, mvcc_key);
            if let Some(revision_key) = revision_key {
                kv.delete_from(&mut out.wb, cf::REVISION, revision_key);
            }
            out.maybe_write()
        },
    )?;
    mvcc.stage_clear(&mut out.wb, &region.start_key, &region.end_key)?;
    let (lower, upper) = keys::txn_lock_bounds(region.id);
    kv.delete_range_to(&mut out.wb, cf::META, &lower, &upper);
    let (lower, upper) = keys::txn_record_bounds(&region.start_key, &region.end_key);
    kv.delete_range_to(&mut out.wb, cf::META, &lower, &upper);
    let (lower, upper) = keys::merge_record_bounds(&region.start_key, &region.end_key);
    kv.delete_range_to(&mut out.wb, cf::META, &lower, &upper);
    let (lower, upper) = keys::lease_record_bounds(&region.start_key, &region.end_key);
    kv.delete_range_to(&mut out.wb, cf::META, &lower, &upper);
    let (lower, upper) = keys::lease_key_bounds(&region.start_key, &region.end_key);
    kv.delete_range_to(&mut out.wb, cf::META, &lower, &upper);
    Ok(())
}

/// Replaces the data in the snapshot region's range by `snap`'s, in
/// batches (see [`Batches`]), and returns the last batch unwritten for the
/// caller to complete. The range is the snapshot's, not the replica's: a
/// replica created on demand has no range yet.
///
/// Every batch leaves the range consistent version by version (a version's
/// MVCC record, key index entry and revision CF entry come and go in the
/// same batch), so an install cut short at any batch can start again from
/// whatever it left: first the versions in the range are deleted (found by
/// walking them), then what the walk cannot see (key index entries without
/// a version, the region's locks and decisions) by range, then the
/// snapshot's versions are written, and the last batch holds its locks and
/// decisions. The key index is rebuilt from the versions (snapshots do not
/// carry it).
pub(super) fn write_data(
    kv: &KvEngine,
    snap: &RegionSnapshot,
    limit: usize,
    on_write: &mut dyn FnMut(usize) -> Result<()>,
) -> Result<WriteBatch> {
    let region = &snap.region;
    let mut out = Batches {
        kv,
        wb: WriteBatch::default(),
        limit,
        written: 0,
        on_write,
    };
    clear_region(region, &mut out)?;
    out.write()?;
    let mvcc = MvccStore::new(kv.clone());
    let mut stage = |tag: u8, k: &[u8], v: &[u8]| -> Result<()> {
        if tag == TAG_REVISION {
            kv.put_to(&mut out.wb, cf::REVISION, k, v);
        } else {
            mvcc.stage_version_record(&mut out.wb, k, v);
            if let Some(sub) = codec::record_sub(v)? {
                let (user_key, rev) = codec::decode_mvcc_key(k)?;
                kv.put_to(
                    &mut out.wb,
                    cf::REVISION,
                    &codec::revision_key(rev, sub),
                    &user_key,
                );
            }
        }
        out.maybe_write()
    };
    if let Some(path) = &snap.file {
        // Validated when it arrived; decoded again, records one by one.
        decode_from(region.id, open_file(path)?, &mut |tag, k, v| {
            stage(tag, &k, &v)
        })?;
    }
    for (k, v) in &snap.mvcc {
        stage(TAG_MVCC, k, v)?;
    }
    for (k, v) in &snap.revision {
        stage(TAG_REVISION, k, v)?;
    }
    out.write()?;
    let mut wb = WriteBatch::default();
    for lock in &snap.locks {
        kv.put_to(
            &mut wb,
            cf::META,
            &keys::txn_lock_key(region.id, lock.txn_id),
            &lock.encode_to_vec(),
        );
    }
    for (primary, record) in &snap.txn_records {
        kv.put_to(
            &mut wb,
            cf::META,
            &keys::txn_record_key(primary, record.txn_id),
            &record.encode_to_vec(),
        );
    }
    for (end_key, record) in &snap.merge_records {
        kv.put_to(
            &mut wb,
            cf::META,
            &keys::merge_record_key(end_key, record.source_id),
            &record.encode_to_vec(),
        );
    }
    for record in &snap.leases {
        kv.put_to(
            &mut wb,
            cf::META,
            &keys::lease_record_key(&lease::owner_key(record.id)),
            &record.encode_to_vec(),
        );
    }
    for (id, key) in &snap.lease_keys {
        kv.put_to(
            &mut wb,
            cf::META,
            &keys::lease_key_key(&lease::owner_key(*id), key),
            &[],
        );
    }
    Ok(wb)
}

/// Deletes the data of `region`, whose replica here a membership change
/// removed (its region state is `Tombstone` and its clean-up mark, staged
/// with that state, is still set), and then the mark, in batches, the mark
/// with the last. Call
/// it while no other replica here can own the range: before the removed
/// replica is unregistered, or at start-up before any replica starts. A
/// crash before it finished leaves the mark, and start-up does it again.
pub(crate) fn clear_removed(kv: &KvEngine, region: &metapb::Region, limit: usize) -> Result<()> {
    let mut out = Batches {
        kv,
        wb: WriteBatch::default(),
        limit,
        written: 0,
        on_write: &mut |_| Ok(()),
    };
    clear_region(region, &mut out)?;
    kv.delete_from(&mut out.wb, cf::META, &keys::cleanup_key(region.id));
    out.write()?;
    info!(
        region_id = region.id,
        "deleted the data of a removed replica"
    );
    Ok(())
}

/// A region snapshot installed by [`install`]: the replica's new state.
pub(crate) struct Installed {
    pub apply_state: RaftApplyState,
    pub region: metapb::Region,
    pub locks: Vec<TxnLockRecord>,
    pub merging: Option<MergeState>,
}

/// Replaces the data, region meta, apply state and raft log of `store`'s
/// region by `snap`'s (see the module docs for the order of writes), and
/// updates raft-rs's `store` to match. `hs` is the hard state to persist
/// with the new log (its commit already at the snapshot). `decoded` is the
/// snapshot as decoded when it arrived, with its index and term; it is
/// used if it is this snapshot, otherwise the data is decoded again.
/// RocksDB is written in batches of about `limit` bytes.
#[allow(clippy::too_many_arguments)]
pub(crate) fn install(
    kv: &KvEngine,
    log: &RaftLogEngine,
    store: &mut PeerStorage,
    snap: &Snapshot,
    mut hs: HardState,
    decoded: Option<(u64, u64, RegionSnapshot)>,
    dir: &SnapDir,
    limit: usize,
) -> Result<Installed> {
    let region_id = store.region_id();
    let meta = snap.get_metadata();
    let (index, term) = (meta.index, meta.term);
    let data = match decoded {
        Some((i, t, data)) if i == index && t == term => data,
        other => {
            if let Some(file) = other.and_then(|(_, _, d)| d.file) {
                file::remove(&file);
            }
            decode_data(region_id, snap, dir)?
        }
    };
    hs.term = hs.term.max(term);
    let record = SnapshotInstall {
        index,
        term,
        data: snap.get_data().to_vec(),
        conf_state: meta
            .get_conf_state()
            .write_to_bytes()
            .map_err(codec_error)?,
        hard_state: hs.write_to_bytes().map_err(codec_error)?,
    };
    let installed = install_data(kv, log, region_id, &record, &data, limit, &mut |_| Ok(()))?;
    store.set_truncated(index, term);
    store.set_conf_state(meta.get_conf_state().clone());
    store.set_hard_state(hs);
    Ok(installed)
}

/// Installs `data`, the snapshot `record` describes, for region
/// `region_id`: the install record and the `installing_snapshot` flag
/// (synced), the data in batches of about `limit` bytes, then the region
/// state, the apply state and the snapshot's locks and decisions with the
/// record deleted (synced), then the raft log. `on_write` is
/// [`Batches`]'s.
pub(super) fn install_data(
    kv: &KvEngine,
    log: &RaftLogEngine,
    region_id: u64,
    record: &SnapshotInstall,
    data: &RegionSnapshot,
    limit: usize,
    on_write: &mut dyn FnMut(usize) -> Result<()>,
) -> Result<Installed> {
    let (index, term) = (record.index, record.term);
    let mut wb = WriteBatch::default();
    kv.put_to(
        &mut wb,
        cf::META,
        &keys::install_key(region_id),
        &record.encode_to_vec(),
    );
    let mut apply_state = match kv.get(cf::META, &keys::apply_state_key(region_id))? {
        Some(raw) => RaftApplyState::decode(raw.as_slice())?,
        None => RaftApplyState::default(),
    };
    apply_state.installing_snapshot = true;
    kv.put_to(
        &mut wb,
        cf::META,
        &keys::apply_state_key(region_id),
        &apply_state.encode_to_vec(),
    );
    kv.write_sync(wb)?;

    let mut wb = write_data(kv, data, limit, on_write)?;
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
    let apply_state = RaftApplyState {
        applied_index: index,
        applied_term: term,
        truncated_index: index,
        truncated_term: term,
        applied_revision: data.applied_revision,
        compact_revision: data.compact_revision,
        // The leader's physical clean-up may not be done; redo it here.
        pending_compact_revision: data.compact_revision,
        installing_snapshot: false,
    };
    kv.put_to(
        &mut wb,
        cf::META,
        &keys::apply_state_key(region_id),
        &apply_state.encode_to_vec(),
    );
    kv.delete_from(&mut wb, cf::META, &keys::install_key(region_id));
    kv.write_sync(wb)?;
    if let Some(file) = &data.file {
        file::remove(file);
    }

    let mut conf_state = ConfState::default();
    conf_state
        .merge_from_bytes(&record.conf_state)
        .map_err(codec_error)?;
    let mut hs = HardState::default();
    hs.merge_from_bytes(&record.hard_state)
        .map_err(codec_error)?;
    let mut batch = RaftLogBatch::default();
    batch.clean(region_id);
    batch.put_hard_state(region_id, &hs)?;
    batch.put_conf_state(region_id, &conf_state)?;
    log.write(&mut batch, true)?;
    info!(
        region_id,
        index,
        term,
        from_file = data.file.is_some(),
        applied_revision = data.applied_revision,
        "installed region snapshot"
    );
    Ok(Installed {
        apply_state,
        region: data.region.clone(),
        locks: data.locks.clone(),
        merging: data.merging.clone(),
    })
}

fn codec_error(e: protobuf::ProtobufError) -> Error {
    Error::Corrupted(format!("snapshot install record: {e}"))
}

/// The snapshot files of the installs a crash cut short (see
/// [`finish_installs`]), which opening the snapshot directory must keep.
pub(crate) fn pending_install_files(kv: &KvEngine) -> Result<Vec<String>> {
    Ok(pending_installs(kv)?
        .into_iter()
        .filter_map(|(_, record)| Descriptor::decode(&record.data).ok())
        .map(|desc| SnapDir::received_name(&desc))
        .collect())
}

/// Every install record left in the meta column family, by region id.
fn pending_installs(kv: &KvEngine) -> Result<Vec<(u64, SnapshotInstall)>> {
    let (lower, upper) = keys::region_key_bounds();
    let mut out = Vec::new();
    let mut it = kv.iter(cf::META, &lower, &upper);
    it.seek(&lower);
    while let (Some(k), Some(v)) = (it.key(), it.value()) {
        if let Some(region_id) = keys::decode_install_key(k) {
            out.push((region_id, SnapshotInstall::decode(v)?));
        }
        it.next();
    }
    it.status().map_err(engine::Error::from)?;
    Ok(out)
}

/// Finishes every install a crash cut short, from its record and the
/// snapshot it names (start-up, before any replica starts): the install
/// starts again from its first batch. Fails if a snapshot file named by a
/// record is gone, which only happens if someone deleted it.
pub(crate) fn finish_installs(
    kv: &KvEngine,
    log: &RaftLogEngine,
    dir: &SnapDir,
    limit: usize,
) -> Result<()> {
    for (region_id, record) in pending_installs(kv)? {
        info!(
            region_id,
            index = record.index,
            "finishing a region snapshot install cut short"
        );
        let mut snap = Snapshot::default();
        snap.set_data(record.data.clone().into());
        snap.mut_metadata().index = record.index;
        snap.mut_metadata().term = record.term;
        let data = decode_data(region_id, &snap, dir)?;
        install_data(kv, log, region_id, &record, &data, limit, &mut |_| Ok(()))?;
    }
    Ok(())
}
