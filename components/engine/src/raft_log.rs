use std::path::Path;
use std::sync::Arc;

use raft::eraftpb::{ConfState, Entry, HardState};
use raft_engine::{Command, Config, Engine, LogBatch, MessageExt, ReadableSize};

use crate::Result;

const HARD_STATE_KEY: &[u8] = b"hard_state";
const CONF_STATE_KEY: &[u8] = b"conf_state";

struct EntryExt;

impl MessageExt for EntryExt {
    type Entry = Entry;

    fn index(e: &Entry) -> u64 {
        e.index
    }
}

/// Raft logs of every region on the node, in one raft-engine instance keyed by
/// region id. Cheap to clone.
#[derive(Clone)]
pub struct RaftLogEngine {
    engine: Arc<Engine>,
}

/// One region's log changes, written atomically by [`RaftLogEngine::write`].
#[derive(Default)]
pub struct RaftLogBatch {
    batch: LogBatch,
}

impl RaftLogBatch {
    /// Appends `entries`; entries at or after the first index already in the
    /// log replace the old ones (raft's log truncation on conflict).
    pub fn append(&mut self, region_id: u64, entries: &[Entry]) -> Result<()> {
        if !entries.is_empty() {
            self.batch.add_entries::<EntryExt>(region_id, entries)?;
        }
        Ok(())
    }

    pub fn put_hard_state(&mut self, region_id: u64, hs: &HardState) -> Result<()> {
        self.batch
            .put_message(region_id, HARD_STATE_KEY.to_vec(), hs)?;
        Ok(())
    }

    pub fn put_conf_state(&mut self, region_id: u64, cs: &ConfState) -> Result<()> {
        self.batch
            .put_message(region_id, CONF_STATE_KEY.to_vec(), cs)?;
        Ok(())
    }

    /// Drops the region's whole log, hard state and conf state. Later
    /// changes in the same batch apply after it, so a batch can replace a
    /// region's log state atomically (e.g. when installing a snapshot).
    pub fn clean(&mut self, region_id: u64) {
        self.batch.add_command(region_id, Command::Clean);
    }

    pub fn is_empty(&self) -> bool {
        self.batch.is_empty()
    }
}

impl RaftLogEngine {
    pub fn open(dir: &Path) -> Result<RaftLogEngine> {
        let cfg = Config {
            dir: dir.to_string_lossy().into_owned(),
            target_file_size: ReadableSize::mb(64),
            purge_threshold: ReadableSize::mb(256),
            ..Default::default()
        };
        Ok(RaftLogEngine {
            engine: Arc::new(Engine::open(cfg)?),
        })
    }

    /// Writes `batch`; with `sync` it is on disk when this returns.
    pub fn write(&self, batch: &mut RaftLogBatch, sync: bool) -> Result<()> {
        self.engine.write(&mut batch.batch, sync)?;
        Ok(())
    }

    pub fn hard_state(&self, region_id: u64) -> Result<Option<HardState>> {
        Ok(self.engine.get_message(region_id, HARD_STATE_KEY)?)
    }

    pub fn conf_state(&self, region_id: u64) -> Result<Option<ConfState>> {
        Ok(self.engine.get_message(region_id, CONF_STATE_KEY)?)
    }

    /// Entries in `[low, high)`, stopping early (but after at least one
    /// entry) once `max_size` bytes are collected. Errors if any index in the
    /// range is missing.
    pub fn entries(
        &self,
        region_id: u64,
        low: u64,
        high: u64,
        max_size: Option<usize>,
    ) -> Result<Vec<Entry>> {
        let mut out = Vec::with_capacity((high - low) as usize);
        self.engine
            .fetch_entries_to::<EntryExt>(region_id, low, high, max_size, &mut out)?;
        Ok(out)
    }

    pub fn entry(&self, region_id: u64, index: u64) -> Result<Option<Entry>> {
        Ok(self.engine.get_entry::<EntryExt>(region_id, index)?)
    }

    pub fn first_index(&self, region_id: u64) -> Option<u64> {
        self.engine.first_index(region_id)
    }

    pub fn last_index(&self, region_id: u64) -> Option<u64> {
        self.engine.last_index(region_id)
    }

    /// Drops the entries before `index`, then lets raft-engine delete log
    /// files nobody needs any more.
    pub fn compact_to(&self, region_id: u64, index: u64) -> Result<()> {
        self.engine.compact_to(region_id, index);
        self.engine.purge_expired_files()?;
        Ok(())
    }

    /// Bytes of log files on disk.
    pub fn size(&self) -> usize {
        self.engine.get_used_size()
    }
}
