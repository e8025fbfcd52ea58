//! Durable PD state, all in one RocksDB instance: the member list fixed at
//! creation, the raft log and hard state of PD's raft group, and the
//! replicated state machine (bootstrap flag, nodes, regions, allocator
//! high-water marks) together with the index of the last applied entry.
//!
//! Keeping the log and the state machine in one DB lets one `WriteBatch`
//! carry a Ready's log appends, hard state and applied changes, so the
//! applied index and the state it describes never disagree after a crash.

use std::path::{Path, PathBuf};

use prost::Message as _;
use proto::{metapb, pd_raftpb, pdpb};
use raft::eraftpb::{ConfState, Entry, HardState};
use rocksdb::{Direction, IteratorMode, Options, ReadOptions, WriteBatch, WriteOptions, DB};

use crate::client::{PdError, Result};

/// Written by the single-member PD before it was replicated; read once to
/// carry such a data dir over.
const LEGACY_CLUSTER_ID_KEY: &[u8] = b"meta/cluster_id";
const MEMBERS_KEY: &[u8] = b"meta/members";
const BOOTSTRAPPED_KEY: &[u8] = b"meta/bootstrapped";
const ID_HIGH_WATER_KEY: &[u8] = b"meta/id_high_water";
const REVISION_HIGH_WATER_KEY: &[u8] = b"meta/revision_high_water";
const COMPACTION_REVISION_KEY: &[u8] = b"meta/compaction_revision";
/// The active alarms, one `pd_raftpb::AlarmList`.
const ALARMS_KEY: &[u8] = b"meta/alarms";
const NODE_PREFIX: &[u8] = b"node/";
const NODE_END: &[u8] = b"node0";
const REGION_PREFIX: &[u8] = b"region/";
const REGION_END: &[u8] = b"region0";
const HARD_STATE_KEY: &[u8] = b"raft/hard_state";
const CONF_STATE_KEY: &[u8] = b"raft/conf_state";
/// Index and term of the last applied entry.
const APPLY_KEY: &[u8] = b"raft/apply";
/// Index and term of the last entry dropped from the log (by compaction or a
/// snapshot); the log continues right after it.
const TRUNCATED_KEY: &[u8] = b"raft/truncated";
const LOG_PREFIX: &[u8] = b"raft/log/";

/// The replicated state machine as persisted.
#[derive(Debug, Default, Clone)]
pub struct PersistedState {
    pub bootstrapped: bool,
    /// No id above this was ever handed out (0 on a fresh store).
    pub id_high_water: u64,
    /// No revision above this was ever handed out (`None` on a fresh store).
    pub revision_high_water: Option<i64>,
    /// The cluster's compaction revision (0: never compacted).
    pub compaction_revision: i64,
    /// etcd's active alarms.
    pub alarms: Vec<pdpb::AlarmMember>,
    pub nodes: Vec<metapb::Node>,
    pub regions: Vec<metapb::Region>,
}

/// Raft's own durable state.
#[derive(Debug, Default, Clone)]
pub struct RaftPersisted {
    pub hard_state: HardState,
    pub conf_state: ConfState,
    pub applied: (u64, u64),
    pub truncated: (u64, u64),
    /// Index of the last log entry (the truncated index if the log is empty).
    pub last_index: u64,
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

fn decode_alarms(raw: Option<Vec<u8>>) -> Result<Vec<pdpb::AlarmMember>> {
    let Some(raw) = raw else {
        return Ok(Vec::new());
    };
    pd_raftpb::AlarmList::decode(raw.as_slice())
        .map(|l| l.alarms)
        .map_err(|e| storage_err("corrupted alarm list", e))
}

fn node_key(id: u64) -> Vec<u8> {
    [NODE_PREFIX, &id.to_be_bytes()].concat()
}

fn region_key(id: u64) -> Vec<u8> {
    [REGION_PREFIX, &id.to_be_bytes()].concat()
}

fn log_key(index: u64) -> Vec<u8> {
    [LOG_PREFIX, &index.to_be_bytes()].concat()
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

fn encode_pair(a: u64, b: u64) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&a.to_be_bytes());
    out[8..].copy_from_slice(&b.to_be_bytes());
    out
}

fn decode_pair(key: &[u8], v: &[u8]) -> Result<(u64, u64)> {
    if v.len() != 16 {
        return Err(storage_err(
            "corrupted value",
            format!("{} has {} bytes", String::from_utf8_lossy(key), v.len()),
        ));
    }
    Ok((decode_u64(key, &v[..8])?, decode_u64(key, &v[8..])?))
}

fn pb_bytes(m: &impl protobuf::Message) -> Result<Vec<u8>> {
    m.write_to_bytes()
        .map_err(|e| storage_err("cannot encode raft state", e))
}

/// Changes to the PD state written atomically by [`Storage::write`].
#[derive(Default)]
pub struct Batch {
    wb: WriteBatch,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.wb.is_empty()
    }

    pub fn put_hard_state(&mut self, hs: &HardState) -> Result<()> {
        self.wb.put(HARD_STATE_KEY, pb_bytes(hs)?);
        Ok(())
    }

    pub fn put_conf_state(&mut self, cs: &ConfState) -> Result<()> {
        self.wb.put(CONF_STATE_KEY, pb_bytes(cs)?);
        Ok(())
    }

    pub fn put_applied(&mut self, index: u64, term: u64) {
        self.wb.put(APPLY_KEY, encode_pair(index, term));
    }

    pub fn put_truncated(&mut self, index: u64, term: u64) {
        self.wb.put(TRUNCATED_KEY, encode_pair(index, term));
    }

    /// Appends entries; any old entries from the first new index on are
    /// replaced (raft's log truncation on conflict).
    pub fn append(&mut self, entries: &[Entry]) -> Result<()> {
        let Some(first) = entries.first() else {
            return Ok(());
        };
        self.wb
            .delete_range(log_key(first.index), log_key(u64::MAX));
        for e in entries {
            self.wb.put(log_key(e.index), pb_bytes(e)?);
        }
        Ok(())
    }

    /// Drops log entries with index < `end`.
    pub fn delete_log_before(&mut self, end: u64) {
        self.wb.delete_range(log_key(0), log_key(end));
    }

    pub fn clear_log(&mut self) {
        self.wb.delete_range(log_key(0), log_key(u64::MAX));
        self.wb.delete(log_key(u64::MAX));
    }

    pub fn set_bootstrapped(&mut self) {
        self.wb.put(BOOTSTRAPPED_KEY, [1u8]);
    }

    pub fn put_node(&mut self, node: &metapb::Node) {
        self.wb.put(node_key(node.id), node.encode_to_vec());
    }

    pub fn put_region(&mut self, region: &metapb::Region) {
        self.wb.put(region_key(region.id), region.encode_to_vec());
    }

    pub fn delete_region(&mut self, id: u64) {
        self.wb.delete(region_key(id));
    }

    pub fn put_id_high_water(&mut self, v: u64) {
        self.wb.put(ID_HIGH_WATER_KEY, v.to_be_bytes());
    }

    pub fn put_revision_high_water(&mut self, v: i64) {
        // Stored as the i64's bit pattern; the core rejects nonsense values.
        self.wb
            .put(REVISION_HIGH_WATER_KEY, (v as u64).to_be_bytes());
    }

    pub fn put_compaction_revision(&mut self, v: i64) {
        self.wb
            .put(COMPACTION_REVISION_KEY, (v as u64).to_be_bytes());
    }

    pub fn put_alarms(&mut self, alarms: &[pdpb::AlarmMember]) {
        let list = pd_raftpb::AlarmList {
            alarms: alarms.to_vec(),
        };
        self.wb.put(ALARMS_KEY, list.encode_to_vec());
    }

    /// Replaces the whole state machine (a raft snapshot being installed).
    pub fn replace_state(&mut self, s: &pd_raftpb::StateSnapshot) {
        self.wb.delete_range(NODE_PREFIX, NODE_END);
        self.wb.delete_range(REGION_PREFIX, REGION_END);
        if s.bootstrapped {
            self.set_bootstrapped();
        } else {
            self.wb.delete(BOOTSTRAPPED_KEY);
        }
        for n in &s.nodes {
            self.put_node(n);
        }
        for r in &s.regions {
            self.put_region(r);
        }
        self.put_id_high_water(s.id_high_water);
        self.put_revision_high_water(s.revision_high_water);
        self.put_compaction_revision(s.compaction_revision);
        self.put_alarms(&s.alarms);
    }
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

    /// Writes `batch`; with `sync` it survives a machine crash once this
    /// returns.
    pub fn write(&self, batch: Batch, sync: bool) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(sync);
        self.db
            .write_opt(batch.wb, &wo)
            .map_err(|e| storage_err("write failed", e))
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.db.get(key).map_err(|e| storage_err("read failed", e))
    }

    fn get_u64(&self, key: &[u8]) -> Result<Option<u64>> {
        match self.get(key)? {
            Some(v) => Ok(Some(decode_u64(key, &v)?)),
            None => Ok(None),
        }
    }

    fn get_pair(&self, key: &[u8]) -> Result<(u64, u64)> {
        match self.get(key)? {
            Some(v) => decode_pair(key, &v),
            None => Ok((0, 0)),
        }
    }

    fn get_pb<M: protobuf::Message>(&self, key: &[u8]) -> Result<M> {
        match self.get(key)? {
            Some(v) => protobuf::Message::parse_from_bytes(&v).map_err(|e| {
                storage_err(
                    &format!("corrupted record {}", String::from_utf8_lossy(key)),
                    e,
                )
            }),
            None => Ok(M::new()),
        }
    }

    fn scan_prefix<M: prost::Message + Default>(&self, prefix: &[u8]) -> Result<Vec<M>> {
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

    /// The member list recorded when this data dir was created.
    pub fn members(&self) -> Result<Option<pd_raftpb::MemberList>> {
        match self.get(MEMBERS_KEY)? {
            Some(v) => pd_raftpb::MemberList::decode(&*v)
                .map(Some)
                .map_err(|e| storage_err("corrupted member list", e)),
            None => Ok(None),
        }
    }

    /// A data dir of the single-member PD that predates replication: its
    /// cluster id, if this is one.
    pub fn legacy_cluster_id(&self) -> Result<Option<u64>> {
        self.get_u64(LEGACY_CLUSTER_ID_KEY)
    }

    /// Records the identity and initial raft configuration of a fresh data
    /// dir, synchronously.
    pub fn init(&self, members: &pd_raftpb::MemberList, voters: &[u64]) -> Result<()> {
        let mut b = Batch::default();
        b.wb.put(MEMBERS_KEY, members.encode_to_vec());
        let cs = ConfState {
            voters: voters.to_vec(),
            ..Default::default()
        };
        b.put_conf_state(&cs)?;
        self.write(b, true)
    }

    pub fn load(&self) -> Result<PersistedState> {
        let revision_high_water = self.get_u64(REVISION_HIGH_WATER_KEY)?.map(|v| v as i64);
        Ok(PersistedState {
            bootstrapped: self.get(BOOTSTRAPPED_KEY)?.is_some(),
            id_high_water: self.get_u64(ID_HIGH_WATER_KEY)?.unwrap_or(0),
            revision_high_water,
            compaction_revision: self
                .get_u64(COMPACTION_REVISION_KEY)?
                .map_or(0, |v| v as i64),
            alarms: decode_alarms(self.get(ALARMS_KEY)?)?,
            nodes: self.scan_prefix(NODE_PREFIX)?,
            regions: self.scan_prefix(REGION_PREFIX)?,
        })
    }

    pub fn load_raft(&self) -> Result<RaftPersisted> {
        let truncated = self.get_pair(TRUNCATED_KEY)?;
        let mut last_index = truncated.0;
        let mut it = self.db.raw_iterator();
        it.seek_for_prev(log_key(u64::MAX));
        if let Some(k) = it.key() {
            if let Some(idx) = k.strip_prefix(LOG_PREFIX) {
                last_index = last_index.max(decode_u64(k, idx)?);
            }
        }
        Ok(RaftPersisted {
            hard_state: self.get_pb(HARD_STATE_KEY)?,
            conf_state: self.get_pb(CONF_STATE_KEY)?,
            applied: self.get_pair(APPLY_KEY)?,
            truncated,
            last_index,
        })
    }

    /// Log entries in `[low, high)`, stopping once `max_size` bytes are
    /// collected (but returning at least one entry).
    pub fn entries(&self, low: u64, high: u64, max_size: Option<u64>) -> Result<Vec<Entry>> {
        let mut out = Vec::with_capacity(high.saturating_sub(low).min(1024) as usize);
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(log_key(high));
        let mut it = self.db.raw_iterator_opt(ro);
        it.seek(log_key(low));
        let mut size = 0u64;
        let mut expect = low;
        while it.valid() {
            let (Some(k), Some(v)) = (it.key(), it.value()) else {
                break;
            };
            let e: Entry = protobuf::Message::parse_from_bytes(v)
                .map_err(|e| storage_err("corrupted raft log entry", e))?;
            if e.index != expect {
                return Err(storage_err(
                    "raft log has a hole",
                    format!("expected {expect}, found {}", String::from_utf8_lossy(k)),
                ));
            }
            size += u64::from(protobuf::Message::compute_size(&e));
            if !out.is_empty() && max_size.is_some_and(|m| size > m) {
                break;
            }
            out.push(e);
            expect += 1;
            it.next();
        }
        it.status()
            .map_err(|e| storage_err("raft log scan failed", e))?;
        if out.is_empty() || (expect < high && max_size.is_none()) {
            return Err(storage_err(
                "raft log entries missing",
                format!("[{low}, {high}) has only {}", out.len()),
            ));
        }
        Ok(out)
    }

    /// The state machine, the applied index/term and the conf state as of
    /// one consistent moment: a raft snapshot.
    pub fn snapshot_state(&self) -> Result<(pd_raftpb::StateSnapshot, (u64, u64), ConfState)> {
        let snap = self.db.snapshot();
        let get = |k: &[u8]| snap.get(k).map_err(|e| storage_err("read failed", e));
        let u =
            |k: &[u8]| -> Result<Option<u64>> { get(k)?.map(|v| decode_u64(k, &v)).transpose() };
        let scan = |prefix: &[u8]| -> Result<Vec<Vec<u8>>> {
            let mut out = Vec::new();
            for item in snap.iterator(IteratorMode::From(prefix, Direction::Forward)) {
                let (k, v) = item.map_err(|e| storage_err("scan failed", e))?;
                if !k.starts_with(prefix) {
                    break;
                }
                out.push(v.to_vec());
            }
            Ok(out)
        };
        let decode_err = |e: prost::DecodeError| storage_err("corrupted record", e);
        let state = pd_raftpb::StateSnapshot {
            bootstrapped: get(BOOTSTRAPPED_KEY)?.is_some(),
            nodes: scan(NODE_PREFIX)?
                .iter()
                .map(|v| metapb::Node::decode(&v[..]))
                .collect::<std::result::Result<_, _>>()
                .map_err(decode_err)?,
            regions: scan(REGION_PREFIX)?
                .iter()
                .map(|v| metapb::Region::decode(&v[..]))
                .collect::<std::result::Result<_, _>>()
                .map_err(decode_err)?,
            id_high_water: u(ID_HIGH_WATER_KEY)?.unwrap_or(0),
            revision_high_water: u(REVISION_HIGH_WATER_KEY)?
                .map(|v| v as i64)
                .unwrap_or(crate::client::INITIAL_REVISION),
            compaction_revision: u(COMPACTION_REVISION_KEY)?.map_or(0, |v| v as i64),
            alarms: decode_alarms(get(ALARMS_KEY)?)?,
        };
        let applied = match get(APPLY_KEY)? {
            Some(v) => decode_pair(APPLY_KEY, &v)?,
            None => (0, 0),
        };
        let cs = match get(CONF_STATE_KEY)? {
            Some(v) => protobuf::Message::parse_from_bytes(&v)
                .map_err(|e| storage_err("corrupted conf state", e))?,
            None => ConfState::default(),
        };
        Ok((state, applied, cs))
    }
}
