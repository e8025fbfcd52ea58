//! Installing a region snapshot into the node's engines, and clearing the
//! data of a replica removed from its region. Both start by clearing the
//! region's key range of everything a replica keeps there (see
//! [`stage_clear_region`]); the work is bounded by that range, never a scan
//! of the node's whole revision index.

use engine::{cf, KvEngine, RaftLogBatch, RaftLogEngine, WriteBatch};
use mvcc::{codec, MvccStore};
use prost::Message as _;
use proto::metapb;
use proto::raft_serverpb::{
    MergeState, PeerState, RaftApplyState, RegionLocalState, TxnLockRecord,
};
use raft::eraftpb::{HardState, Snapshot};
use tracing::info;

use super::file::{self, SnapDir};
use super::{decode_data, decode_from, open_file, RegionSnapshot, TAG_MVCC, TAG_REVISION};
use crate::keys;
use crate::storage::PeerStorage;
use crate::{Error, Result};

/// Stages into `wb` the removal of everything a replica of `region` keeps
/// in its key range: the MVCC versions with their key index and revision
/// index entries (found from the versions' records), the region's
/// transaction locks, and the transaction and merge decisions kept under
/// its keys.
pub(crate) fn stage_clear_region(
    kv: &KvEngine,
    wb: &mut WriteBatch,
    region: &metapb::Region,
) -> Result<()> {
    let mvcc = MvccStore::new(kv.clone());
    mvcc.stage_clear(wb, &region.start_key, &region.end_key)?;
    mvcc.snapshot()
        .versions(&region.start_key, &region.end_key, |_, _, revision_key| {
            if let Some(revision_key) = revision_key {
                kv.delete_from(wb, cf::REVISION, revision_key);
            }
            Ok::<_, Error>(())
        })?;
    let (lower, upper) = keys::txn_lock_bounds(region.id);
    kv.delete_range_to(wb, cf::META, &lower, &upper);
    let (lower, upper) = keys::txn_record_bounds(&region.start_key, &region.end_key);
    kv.delete_range_to(wb, cf::META, &lower, &upper);
    let (lower, upper) = keys::merge_record_bounds(&region.start_key, &region.end_key);
    kv.delete_range_to(wb, cf::META, &lower, &upper);
    Ok(())
}

/// Stages into `wb` the replacement of the data in the snapshot region's
/// range by `snap`'s. The range is the snapshot's, not the replica's: a
/// replica created on demand has no range yet. Deletes come first in the
/// batch, so puts of the same keys win. The key index is rebuilt from the
/// versions (snapshots do not carry it).
pub fn stage_apply(kv: &KvEngine, wb: &mut WriteBatch, snap: &RegionSnapshot) -> Result<()> {
    let region = &snap.region;
    stage_clear_region(kv, wb, region)?;
    let mvcc = MvccStore::new(kv.clone());
    let mut stage = |tag: u8, k: &[u8], v: &[u8]| -> Result<()> {
        if tag == TAG_REVISION {
            kv.put_to(wb, cf::REVISION, k, v);
            return Ok(());
        }
        mvcc.stage_version_record(wb, k, v);
        if let Some(sub) = codec::record_sub(v)? {
            let (user_key, rev) = codec::decode_mvcc_key(k)?;
            kv.put_to(wb, cf::REVISION, &codec::revision_key(rev, sub), &user_key);
        }
        Ok(())
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
    for lock in &snap.locks {
        kv.put_to(
            wb,
            cf::META,
            &keys::txn_lock_key(region.id, lock.txn_id),
            &lock.encode_to_vec(),
        );
    }
    for (primary, record) in &snap.txn_records {
        kv.put_to(
            wb,
            cf::META,
            &keys::txn_record_key(primary, record.txn_id),
            &record.encode_to_vec(),
        );
    }
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

/// Deletes the data of `region`, whose replica here a membership change
/// removed (its region state is `Tombstone` and its clean-up mark, staged
/// with that state, is still set), and then the mark, in one batch. Call
/// it while no other replica here can own the range: before the removed
/// replica is unregistered, or at start-up before any replica starts. A
/// crash before it finished leaves the mark, and start-up does it again.
pub(crate) fn clear_removed(kv: &KvEngine, region: &metapb::Region) -> Result<()> {
    let mut wb = WriteBatch::default();
    stage_clear_region(kv, &mut wb, region)?;
    kv.delete_from(&mut wb, cf::META, &keys::cleanup_key(region.id));
    kv.write(wb)?;
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
pub(crate) fn install(
    kv: &KvEngine,
    log: &RaftLogEngine,
    store: &mut PeerStorage,
    snap: &Snapshot,
    mut hs: HardState,
    decoded: Option<(u64, u64, RegionSnapshot)>,
    dir: &SnapDir,
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
    let mut wb = WriteBatch::default();
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
    if let Some(file) = &data.file {
        file::remove(file);
    }

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
        from_file = data.file.is_some(),
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
