//! Generating a region's snapshot off its replica's thread.
//!
//! raft-rs asks its storage for a snapshot (`Storage::snapshot`) on the
//! replica's thread whenever a follower needs one. Reading and encoding a
//! whole region there would stall the region for as long as that takes,
//! so [`Generator::snapshot`] answers at once: with a snapshot generated
//! earlier if it is recent enough and its configuration has the follower,
//! and otherwise with raft-rs's
//! `SnapshotTemporarilyUnavailable` after starting a generator thread (one
//! at a time per region), which raft-rs answers by trying again at its
//! next attempt to reach the follower (a heartbeat response at the latest).
//!
//! The generator writes the region's state, read from one RocksDB
//! snapshot, to a file in the node's snapshot directory (see `file`); the
//! raft snapshot it yields carries the file's descriptor, the applied index
//! and term the RocksDB snapshot was at, and the conf state of the region
//! meta read from the same RocksDB snapshot (written with the apply state
//! by every membership change, so it is the conf state at that index).
//! One generated snapshot serves every follower that needs one until a
//! newer one is needed; the file of the one it replaces is deleted.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::sync::Arc;

use engine::KvEngine;
use parking_lot::Mutex;
use raft::eraftpb::Snapshot;
use raft::StorageError;
use tracing::{error, info};

use super::file::{remove, Checksummed, Descriptor, SnapDir};
use crate::membership::conf_state_from_region;
use crate::Result;

/// A region's snapshot generation (see the module docs).
pub(crate) struct Generator {
    region_id: u64,
    kv: KvEngine,
    dir: SnapDir,
    state: Arc<Mutex<GenState>>,
}

#[derive(Default)]
struct GenState {
    running: bool,
    /// The newest snapshot generated, with its file.
    ready: Option<(Snapshot, PathBuf)>,
    /// The replica stopped: a generation finishing now drops its file.
    closed: bool,
}

impl Generator {
    pub fn new(region_id: u64, kv: KvEngine, dir: SnapDir) -> Generator {
        Generator {
            region_id,
            kv,
            dir,
            state: Arc::default(),
        }
    }

    /// A snapshot for peer `to` at index `min_index` or above: the last one
    /// generated if it is that and its configuration includes `to` (one
    /// taken before `to` joined would be refused by it), otherwise
    /// `SnapshotTemporarilyUnavailable` while a newer one is generated in
    /// the background (see the module docs). Never blocks on the
    /// generation.
    pub fn snapshot(&self, min_index: u64, to: u64) -> raft::Result<Snapshot> {
        let unavailable = || raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable);
        let mut state = self.state.lock();
        if let Some((snap, _)) = &state.ready {
            let meta = snap.get_metadata();
            let cs = meta.get_conf_state();
            let member = [
                &cs.voters,
                &cs.learners,
                &cs.voters_outgoing,
                &cs.learners_next,
            ]
            .iter()
            .any(|ids| ids.contains(&to));
            if meta.index >= min_index && member {
                return Ok(snap.clone());
            }
        }
        if state.running {
            return Err(unavailable());
        }
        state.running = true;
        let (region_id, kv, dir) = (self.region_id, self.kv.clone(), self.dir.clone());
        let shared = self.state.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("snap-gen-{region_id}"))
            .spawn(move || {
                let generated = generate_file(&kv, region_id, &dir);
                let mut state = shared.lock();
                state.running = false;
                match generated {
                    Ok((snap, path)) if state.closed => {
                        drop(snap);
                        remove(&path);
                    }
                    Ok((snap, path)) => {
                        info!(
                            region_id,
                            index = snap.get_metadata().index,
                            path = %path.display(),
                            "generated region snapshot"
                        );
                        if let Some((_, old)) = state.ready.replace((snap, path)) {
                            remove(&old);
                        }
                    }
                    Err(e) => error!(region_id, "cannot generate region snapshot: {e}"),
                }
            });
        if let Err(e) = spawned {
            state.running = false;
            error!(
                region_id = self.region_id,
                "cannot start a snapshot generator: {e}"
            );
        }
        Err(unavailable())
    }
}

impl Drop for Generator {
    fn drop(&mut self) {
        let mut state = self.state.lock();
        state.closed = true;
        if let Some((_, path)) = state.ready.take() {
            remove(&path);
        }
    }
}

/// Writes region `region_id`'s snapshot to a file of `dir` and returns the
/// raft snapshot describing it, with the file's path.
fn generate_file(kv: &KvEngine, region_id: u64, dir: &SnapDir) -> Result<(Snapshot, PathBuf)> {
    let tmp = dir.generating(region_id);
    let written = (|| {
        let file = File::create(&tmp)?;
        let mut out = Checksummed::new(BufWriter::with_capacity(1 << 20, file));
        let (apply_state, region) = super::generate_into(kv, region_id, &mut out)?;
        out.flush()?;
        let desc = Descriptor {
            region_id,
            index: apply_state.applied_index,
            term: apply_state.applied_term,
            size: out.written,
            crc32: out.hasher.clone().finalize(),
        };
        Ok::<_, crate::Error>((desc, region))
    })();
    let (desc, region) = match written {
        Ok(w) => w,
        Err(e) => {
            remove(&tmp);
            return Err(e);
        }
    };
    let path = dir.publish(&tmp, &desc)?;
    let mut snap = Snapshot::default();
    snap.set_data(desc.encode().into());
    let meta = snap.mut_metadata();
    meta.index = desc.index;
    meta.term = desc.term;
    meta.set_conf_state(conf_state_from_region(&region));
    Ok((snap, path))
}
