//! Durable PD state. Everything PD must not forget goes through [`Storage`],
//! so replicating PD later means replacing this one type.
//!
//! Every write is synchronous: PD acknowledges allocations and bootstrap only
//! after they survive a machine crash.

use std::path::{Path, PathBuf};

use prost::Message;
use proto::metapb;
use rocksdb::{Direction, IteratorMode, Options, WriteBatch, WriteOptions, DB};

use crate::client::{PdError, Result};

const CLUSTER_ID_KEY: &[u8] = b"meta/cluster_id";
const MEMBER_ID_KEY: &[u8] = b"meta/member_id";
const BOOTSTRAPPED_KEY: &[u8] = b"meta/bootstrapped";
const ID_HIGH_WATER_KEY: &[u8] = b"meta/id_high_water";
const REVISION_HIGH_WATER_KEY: &[u8] = b"meta/revision_high_water";
const NODE_PREFIX: &[u8] = b"node/";
const REGION_PREFIX: &[u8] = b"region/";

/// What [`Storage::load`] finds on disk.
#[derive(Debug, Default)]
pub struct PersistedState {
    pub cluster_id: Option<u64>,
    pub member_id: Option<u64>,
    pub bootstrapped: bool,
    /// No id above this was ever handed out (0 on a fresh store).
    pub id_high_water: u64,
    /// No revision above this was ever handed out (`None` on a fresh store).
    pub revision_high_water: Option<i64>,
    pub nodes: Vec<metapb::Node>,
    pub regions: Vec<metapb::Region>,
}

pub struct Storage {
    db: DB,
    path: PathBuf,
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Storage").field("path", &self.path).finish()
    }
}

fn storage_err(what: &str, e: impl std::fmt::Display) -> PdError {
    PdError::Storage(format!("{what}: {e}"))
}

fn node_key(id: u64) -> Vec<u8> {
    [NODE_PREFIX, &id.to_be_bytes()].concat()
}

fn region_key(id: u64) -> Vec<u8> {
    [REGION_PREFIX, &id.to_be_bytes()].concat()
}

fn decode_u64(key: &[u8], v: &[u8]) -> Result<u64> {
    let bytes: [u8; 8] = v.try_into().map_err(|_| {
        storage_err(
            "corrupted value",
            format!("{} has {} bytes", String::from_utf8_lossy(key), v.len()),
        )
    })?;
    Ok(u64::from_be_bytes(bytes))
}

impl Storage {
    /// Opens (creating if missing) the RocksDB instance in `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        // PD's data is tiny; a small memtable keeps the embedded PD light.
        opts.set_write_buffer_size(4 << 20);
        let db = DB::open(&opts, dir)
            .map_err(|e| storage_err(&format!("cannot open {}", dir.display()), e))?;
        Ok(Storage {
            db,
            path: dir.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write(&self, batch: WriteBatch) -> Result<()> {
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db
            .write_opt(batch, &wo)
            .map_err(|e| storage_err("write failed", e))
    }

    fn get_u64(&self, key: &[u8]) -> Result<Option<u64>> {
        match self
            .db
            .get_pinned(key)
            .map_err(|e| storage_err("read failed", e))?
        {
            Some(v) => Ok(Some(decode_u64(key, &v)?)),
            None => Ok(None),
        }
    }

    fn scan_prefix<M: Message + Default>(&self, prefix: &[u8]) -> Result<Vec<M>> {
        let mut out = Vec::new();
        for item in self
            .db
            .iterator(IteratorMode::From(prefix, Direction::Forward))
        {
            let (k, v) = item.map_err(|e| storage_err("scan failed", e))?;
            if !k.starts_with(prefix) {
                break;
            }
            out.push(M::decode(&*v).map_err(|e| {
                storage_err(
                    &format!("corrupted record {}", String::from_utf8_lossy(&k)),
                    e,
                )
            })?);
        }
        Ok(out)
    }

    pub fn load(&self) -> Result<PersistedState> {
        // Stored as the i64's bit pattern; the core rejects nonsense values.
        let revision_high_water = self.get_u64(REVISION_HIGH_WATER_KEY)?.map(|v| v as i64);
        Ok(PersistedState {
            cluster_id: self.get_u64(CLUSTER_ID_KEY)?,
            member_id: self.get_u64(MEMBER_ID_KEY)?,
            bootstrapped: self
                .db
                .get_pinned(BOOTSTRAPPED_KEY)
                .map_err(|e| storage_err("read failed", e))?
                .is_some(),
            id_high_water: self.get_u64(ID_HIGH_WATER_KEY)?.unwrap_or(0),
            revision_high_water,
            nodes: self.scan_prefix(NODE_PREFIX)?,
            regions: self.scan_prefix(REGION_PREFIX)?,
        })
    }

    /// Records the identity of a freshly created PD data dir.
    pub fn init_identity(&self, cluster_id: u64, member_id: u64) -> Result<()> {
        let mut b = WriteBatch::default();
        b.put(CLUSTER_ID_KEY, cluster_id.to_be_bytes());
        b.put(MEMBER_ID_KEY, member_id.to_be_bytes());
        self.write(b)
    }

    pub fn save_id_high_water(&self, v: u64) -> Result<()> {
        let mut b = WriteBatch::default();
        b.put(ID_HIGH_WATER_KEY, v.to_be_bytes());
        self.write(b)
    }

    pub fn save_revision_high_water(&self, v: i64) -> Result<()> {
        let mut b = WriteBatch::default();
        b.put(REVISION_HIGH_WATER_KEY, (v as u64).to_be_bytes());
        self.write(b)
    }

    /// Writes the bootstrap marker, the first node and the first region in
    /// one atomic batch, so a crash never leaves a half-bootstrapped cluster.
    pub fn bootstrap(&self, node: &metapb::Node, region: &metapb::Region) -> Result<()> {
        let mut b = WriteBatch::default();
        b.put(BOOTSTRAPPED_KEY, [1u8]);
        b.put(node_key(node.id), node.encode_to_vec());
        b.put(region_key(region.id), region.encode_to_vec());
        self.write(b)
    }

    pub fn put_node(&self, node: &metapb::Node) -> Result<()> {
        let mut b = WriteBatch::default();
        b.put(node_key(node.id), node.encode_to_vec());
        self.write(b)
    }

    /// Stores `region` and deletes the regions it made obsolete, atomically.
    pub fn update_region(&self, region: &metapb::Region, obsolete: &[u64]) -> Result<()> {
        let mut b = WriteBatch::default();
        for id in obsolete {
            b.delete(region_key(*id));
        }
        b.put(region_key(region.id), region.encode_to_vec());
        self.write(b)
    }
}
