use std::path::Path;
use std::sync::Arc;

use rocksdb::{
    ColumnFamily, DBRawIteratorWithThreadMode, Options, ReadOptions, SnapshotWithThreadMode,
    WriteOptions, DB,
};

use crate::Result;

pub use rocksdb::WriteBatch;

/// Column families of the KV engine.
pub mod cf {
    /// MVCC versions: `encode_bytes(user_key) ++ !revision` → version record.
    pub const MVCC: &str = "mvcc";
    /// Revision index: `revision ++ sub` → user key; drives watch replay,
    /// compaction and hashing in revision order.
    pub const REVISION: &str = "revision";
    /// Per-region and node-wide metadata (region state, apply state, ...).
    pub const META: &str = "meta";
    /// Key index: every key of the MVCC CF → the kind of its version (put
    /// or tombstone), no value; counting reads it instead of the versions.
    pub const MVCC_KEYS: &str = "mvcc_keys";
    pub const ALL: [&str; 4] = [MVCC, REVISION, META, MVCC_KEYS];
}

/// The node's RocksDB instance. Cheap to clone.
#[derive(Clone)]
pub struct KvEngine {
    db: Arc<DB>,
}

pub type RawIter<'a> = DBRawIteratorWithThreadMode<'a, DB>;

impl KvEngine {
    /// Opens (creating if missing) the engine at `path`.
    pub fn open(path: &Path) -> Result<KvEngine> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
        opts.increase_parallelism(2);
        // Compaction deletes versions region by region and leaves giving
        // the space of their revision CF entries back to RocksDB (they are
        // spread over the whole revision order): files in which deletions
        // pile up (64 of a window of 1,000 entries, or half the file) are
        // compacted by themselves, so scans do not wade through them.
        opts.add_compact_on_deletion_collector_factory(1000, 64, 0.5);
        let db = DB::open_cf(&opts, path, cf::ALL)?;
        Ok(KvEngine { db: Arc::new(db) })
    }

    fn handle(&self, name: &str) -> &ColumnFamily {
        // The column families are created in `open`; a missing one is a bug.
        self.db
            .cf_handle(name)
            .unwrap_or_else(|| panic!("column family {name} not opened"))
    }

    pub fn get(&self, cf: &str, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.db.get_cf(self.handle(cf), key)?)
    }

    pub fn put_to(&self, batch: &mut WriteBatch, cf: &str, key: &[u8], value: &[u8]) {
        batch.put_cf(self.handle(cf), key, value);
    }

    pub fn delete_from(&self, batch: &mut WriteBatch, cf: &str, key: &[u8]) {
        batch.delete_cf(self.handle(cf), key);
    }

    /// Applies `batch` atomically. Not fsynced (see the crate docs).
    pub fn write(&self, batch: WriteBatch) -> Result<()> {
        let mut opts = WriteOptions::default();
        opts.set_sync(false);
        Ok(self.db.write_opt(batch, &opts)?)
    }

    /// A raw iterator over `cf` bounded to `[lower, upper)` (`upper` empty =
    /// unbounded). Call `seek`/`seek_for_prev` before reading.
    pub fn iter(&self, cf: &str, lower: &[u8], upper: &[u8]) -> RawIter<'_> {
        let mut opts = ReadOptions::default();
        opts.set_iterate_lower_bound(lower.to_vec());
        if !upper.is_empty() {
            opts.set_iterate_upper_bound(upper.to_vec());
        }
        self.db.raw_iterator_cf_opt(self.handle(cf), opts)
    }

    /// A consistent point-in-time view of every column family, for readers
    /// that must see several keys as of one write (e.g. region snapshots).
    pub fn snapshot(&self) -> KvSnapshot<'_> {
        KvSnapshot {
            engine: self,
            snap: self.db.snapshot(),
        }
    }

    /// Stages the deletion of every key in `[start, end)` of `cf`.
    pub fn delete_range_to(&self, batch: &mut WriteBatch, cf: &str, start: &[u8], end: &[u8]) {
        batch.delete_range_cf(self.handle(cf), start, end);
    }

    /// Applies `batch` and makes it durable before returning, for writes
    /// that later raft-engine writes depend on.
    pub fn write_sync(&self, batch: WriteBatch) -> Result<()> {
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        Ok(self.db.write_opt(batch, &opts)?)
    }

    /// Reclaims the space of deleted keys in `[start, end)` of `cf` now,
    /// rather than whenever RocksDB gets to it.
    pub fn compact_range(&self, cf: &str, start: Option<&[u8]>, end: Option<&[u8]>) {
        self.db.compact_range_cf(self.handle(cf), start, end);
    }

    /// Makes every write so far durable.
    pub fn sync_wal(&self) -> Result<()> {
        Ok(self.db.flush_wal(true)?)
    }

    /// Bytes of live SST files over all column families.
    pub fn live_data_size(&self) -> u64 {
        cf::ALL
            .iter()
            .filter_map(|name| {
                self.db
                    .property_int_value_cf(self.handle(name), "rocksdb.live-sst-files-size")
                    .ok()
                    .flatten()
            })
            .sum()
    }
}

/// A point-in-time view of a [`KvEngine`]; see [`KvEngine::snapshot`].
pub struct KvSnapshot<'a> {
    engine: &'a KvEngine,
    snap: SnapshotWithThreadMode<'a, DB>,
}

impl KvSnapshot<'_> {
    pub fn get(&self, cf: &str, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.snap.get_cf(self.engine.handle(cf), key)?)
    }

    /// Like [`KvEngine::iter`], reading this snapshot.
    pub fn iter(&self, cf: &str, lower: &[u8], upper: &[u8]) -> RawIter<'_> {
        let mut opts = ReadOptions::default();
        opts.set_iterate_lower_bound(lower.to_vec());
        if !upper.is_empty() {
            opts.set_iterate_upper_bound(upper.to_vec());
        }
        self.snap.raw_iterator_cf_opt(self.engine.handle(cf), opts)
    }
}
