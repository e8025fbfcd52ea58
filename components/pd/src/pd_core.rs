//! The in-process PD: cluster metadata, id allocator and revision oracle over
//! one [`Storage`].

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use proto::{metapb, pdpb};
use tracing::{debug, info};

use crate::client::{PdError, RegionHeartbeat, RegionOperator, RegionWithLeader, Result};
use crate::schedule::{ClusterView, ScheduleConfig, Scheduler};
use crate::storage::Storage;

/// How an id allocator or the oracle persists ahead of what it hands out.
pub const DEFAULT_ID_WINDOW: u64 = 1_000;
pub const DEFAULT_REVISION_WINDOW: i64 = 10_000;

/// A fresh cluster's current revision; etcd starts at 1 as well.
pub const INITIAL_REVISION: i64 = 1;

#[derive(Debug, Clone)]
pub struct PdConfig {
    pub data_dir: PathBuf,
    /// This member's name, reported by GetMembers.
    pub name: String,
    pub client_urls: Vec<String>,
    pub peer_urls: Vec<String>,
    /// Ids persisted ahead per synchronous write; a crash skips at most this
    /// many ids.
    pub id_window: u64,
    /// Revisions persisted ahead per synchronous write; a crash skips at most
    /// this many revisions.
    pub revision_window: i64,
    pub schedule: ScheduleConfig,
}

impl PdConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        PdConfig {
            data_dir: data_dir.into(),
            name: "default".to_owned(),
            client_urls: Vec::new(),
            peer_urls: Vec::new(),
            id_window: DEFAULT_ID_WINDOW,
            revision_window: DEFAULT_REVISION_WINDOW,
            schedule: ScheduleConfig::default(),
        }
    }
}

struct IdAllocator {
    last: u64,
    /// Persisted: no id above it was handed out.
    high_water: u64,
    closed: bool,
}

struct Oracle {
    current: i64,
    /// Persisted: no revision above it was handed out.
    high_water: i64,
    closed: bool,
}

struct RegionEntry {
    region: metapb::Region,
    leader: Option<metapb::Peer>,
}

#[derive(Default)]
struct ClusterState {
    bootstrapped: bool,
    nodes: BTreeMap<u64, metapb::Node>,
    regions: HashMap<u64, RegionEntry>,
    /// start_key -> region id; the regions in it never overlap.
    tree: BTreeMap<Vec<u8>, u64>,
}

fn epoch(r: &metapb::Region) -> metapb::RegionEpoch {
    r.region_epoch.unwrap_or_default()
}

impl ClusterState {
    fn entry_with_leader(&self, id: u64) -> Option<RegionWithLeader> {
        self.regions.get(&id).map(|e| (e.region.clone(), e.leader))
    }

    /// Ids of the regions overlapping [start, end), in key order.
    fn overlapping(&self, start: &[u8], end: &[u8], limit: usize) -> Vec<u64> {
        let mut out = Vec::new();
        let full = |out: &Vec<u64>| limit != 0 && out.len() >= limit;
        if !end.is_empty() && start >= end {
            return out;
        }
        if let Some((_, id)) = self
            .tree
            .range::<[u8], _>((Bound::Unbounded, Bound::Included(start)))
            .next_back()
        {
            if let Some(e) = self.regions.get(id) {
                if e.region.end_key.is_empty() || e.region.end_key.as_slice() > start {
                    out.push(*id);
                }
            }
        }
        for (k, id) in self
            .tree
            .range::<[u8], _>((Bound::Excluded(start), Bound::Unbounded))
        {
            if full(&out) || (!end.is_empty() && k.as_slice() >= end) {
                break;
            }
            out.push(*id);
        }
        out
    }

    fn insert_region(&mut self, region: metapb::Region) {
        self.tree.insert(region.start_key.clone(), region.id);
        self.regions.insert(
            region.id,
            RegionEntry {
                region,
                leader: None,
            },
        );
    }

    fn remove_region(&mut self, id: u64) -> Option<RegionEntry> {
        let e = self.regions.remove(&id)?;
        if self.tree.get(&e.region.start_key) == Some(&id) {
            self.tree.remove(&e.region.start_key);
        }
        Some(e)
    }
}

fn validate_region(region: &metapb::Region) -> Result<()> {
    if region.id == 0 {
        return Err(PdError::InvalidArgument("region id 0".into()));
    }
    if region.region_epoch.is_none() {
        return Err(PdError::InvalidArgument(format!(
            "region {} has no epoch",
            region.id
        )));
    }
    if !region.end_key.is_empty() && region.start_key >= region.end_key {
        return Err(PdError::InvalidArgument(format!(
            "region {} has an empty key range",
            region.id
        )));
    }
    Ok(())
}

/// The PD state machine. Thread-safe; share it as `Arc<PdCore>`.
///
/// Dropping it without [`PdCore::close`] behaves like a crash: the next open
/// skips the unused id and revision windows.
pub struct PdCore {
    storage: Storage,
    cluster_id: u64,
    member: pdpb::Member,
    id_window: u64,
    revision_window: i64,
    closed: AtomicBool,
    ids: Mutex<IdAllocator>,
    // Separate from `cluster` because it is on every write's path.
    oracle: Mutex<Oracle>,
    cluster: RwLock<ClusterState>,
    scheduler: Scheduler,
}

impl std::fmt::Debug for PdCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PdCore")
            .field("storage", &self.storage)
            .field("cluster_id", &self.cluster_id)
            .finish_non_exhaustive()
    }
}

fn random_nonzero() -> u64 {
    loop {
        let v = rand::random::<u64>();
        if v != 0 {
            return v;
        }
    }
}

impl PdCore {
    /// Opens the PD in `config.data_dir` (which must exist or be creatable),
    /// creating a new cluster identity on first use.
    pub fn open(config: PdConfig) -> Result<Arc<PdCore>> {
        if config.id_window == 0 || config.revision_window <= 0 {
            return Err(PdError::InvalidArgument(
                "id and revision windows must be positive".into(),
            ));
        }
        std::fs::create_dir_all(&config.data_dir).map_err(|e| {
            PdError::Storage(format!(
                "cannot create data dir {}: {e}",
                config.data_dir.display()
            ))
        })?;
        let storage = Storage::open(&config.data_dir)?;
        let persisted = storage.load()?;

        let (cluster_id, member_id) = match (persisted.cluster_id, persisted.member_id) {
            (Some(c), Some(m)) => (c, m),
            (None, None) => {
                let ids = (random_nonzero(), random_nonzero());
                storage.init_identity(ids.0, ids.1)?;
                info!(cluster_id = ids.0, "initialized new PD data dir");
                ids
            }
            _ => {
                return Err(PdError::Storage(format!(
                    "{} has a partial identity (cluster id or member id missing)",
                    config.data_dir.display()
                )))
            }
        };

        let revision = match persisted.revision_high_water {
            None => INITIAL_REVISION,
            Some(r) if r >= INITIAL_REVISION => r,
            Some(r) => {
                return Err(PdError::Storage(format!(
                    "corrupted revision high-water mark {r}"
                )))
            }
        };

        let mut cluster = ClusterState {
            bootstrapped: persisted.bootstrapped,
            ..Default::default()
        };
        for n in persisted.nodes {
            cluster.nodes.insert(n.id, n);
        }
        for r in persisted.regions {
            cluster.insert_region(r);
        }
        if cluster.tree.len() != cluster.regions.len() {
            // Two regions with one start key can only come from corruption or
            // a bug; refuse rather than route keys to a random one of them.
            return Err(PdError::Storage(
                "persisted regions overlap (duplicate start keys)".into(),
            ));
        }

        info!(
            cluster_id,
            bootstrapped = cluster.bootstrapped,
            nodes = cluster.nodes.len(),
            regions = cluster.regions.len(),
            revision,
            id = persisted.id_high_water,
            "PD opened"
        );

        Ok(Arc::new(PdCore {
            storage,
            cluster_id,
            member: pdpb::Member {
                name: config.name,
                member_id,
                peer_urls: config.peer_urls,
                client_urls: config.client_urls,
            },
            id_window: config.id_window,
            revision_window: config.revision_window,
            closed: AtomicBool::new(false),
            ids: Mutex::new(IdAllocator {
                last: persisted.id_high_water,
                high_water: persisted.id_high_water,
                closed: false,
            }),
            oracle: Mutex::new(Oracle {
                current: revision,
                high_water: revision,
                closed: false,
            }),
            cluster: RwLock::new(cluster),
            scheduler: Scheduler::new(config.schedule),
        }))
    }

    /// Persists the exact allocator positions so that a clean restart
    /// continues without a gap, then refuses further work. Idempotent.
    /// The RocksDB instance is released when the last `Arc` is dropped.
    pub fn close(&self) -> Result<()> {
        self.closed.store(true, Ordering::SeqCst);
        let rev = {
            let mut o = self.oracle.lock();
            let first_close = !o.closed;
            o.closed = true;
            if first_close {
                self.storage.save_revision_high_water(o.current)?;
                o.high_water = o.current;
            }
            o.current
        };
        let id = {
            let mut ids = self.ids.lock();
            let first_close = !ids.closed;
            ids.closed = true;
            if first_close {
                self.storage.save_id_high_water(ids.last)?;
                ids.high_water = ids.last;
            }
            ids.last
        };
        info!(revision = rev, id, "PD closed");
        Ok(())
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::SeqCst) {
            Err(PdError::Closed)
        } else {
            Ok(())
        }
    }

    pub fn cluster_id(&self) -> u64 {
        self.cluster_id
    }

    /// This member; the only one, and the leader, until PD is replicated.
    pub fn member(&self) -> &pdpb::Member {
        &self.member
    }

    pub fn members(&self) -> Vec<pdpb::Member> {
        vec![self.member.clone()]
    }

    pub fn is_bootstrapped(&self) -> bool {
        self.cluster.read().bootstrapped
    }

    pub fn bootstrap(&self, node: metapb::Node, region: metapb::Region) -> Result<()> {
        self.check_open()?;
        let mut c = self.cluster.write();
        if c.bootstrapped {
            return Err(PdError::AlreadyBootstrapped);
        }
        if node.id == 0 {
            return Err(PdError::InvalidArgument("node id 0".into()));
        }
        validate_region(&region)?;
        if !region.start_key.is_empty() || !region.end_key.is_empty() {
            return Err(PdError::InvalidArgument(
                "the first region must cover the whole keyspace".into(),
            ));
        }
        // The ids normally come from alloc_id; if a caller picked its own,
        // make sure the allocator never hands them out again.
        let max_used = region
            .peers
            .iter()
            .map(|p| p.id.max(p.node_id))
            .chain([node.id, region.id])
            .max()
            .unwrap_or(0);
        self.reserve_ids_up_to(max_used)?;

        self.storage.bootstrap(&node, &region)?;
        info!(
            node_id = node.id,
            region_id = region.id,
            "cluster bootstrapped"
        );
        c.bootstrapped = true;
        c.nodes.insert(node.id, node);
        c.insert_region(region);
        Ok(())
    }

    fn reserve_ids_up_to(&self, v: u64) -> Result<()> {
        let mut ids = self.ids.lock();
        if ids.closed {
            return Err(PdError::Closed);
        }
        if v > ids.high_water {
            self.storage.save_id_high_water(v)?;
            ids.high_water = v;
        }
        ids.last = ids.last.max(v);
        Ok(())
    }

    pub fn alloc_id(&self) -> Result<u64> {
        let mut ids = self.ids.lock();
        if ids.closed {
            return Err(PdError::Closed);
        }
        let next = ids.last.checked_add(1).ok_or(PdError::Exhausted("id"))?;
        if next > ids.high_water {
            let hw = next.saturating_add(self.id_window - 1);
            self.storage.save_id_high_water(hw)?;
            ids.high_water = hw;
        }
        ids.last = next;
        Ok(next)
    }

    /// Hands out `count` consecutive revisions and returns the first.
    pub fn alloc_revisions(&self, count: u32) -> Result<i64> {
        if count == 0 {
            return Err(PdError::InvalidArgument("revision count 0".into()));
        }
        let mut o = self.oracle.lock();
        if o.closed {
            return Err(PdError::Closed);
        }
        let last = o
            .current
            .checked_add(i64::from(count))
            .ok_or(PdError::Exhausted("revision"))?;
        if last > o.high_water {
            // Synchronous under the lock: nobody may get a revision above the
            // persisted mark, so concurrent callers have to wait anyway.
            let hw = last.saturating_add(self.revision_window);
            self.storage.save_revision_high_water(hw)?;
            o.high_water = hw;
        }
        let first = o.current + 1;
        o.current = last;
        Ok(first)
    }

    pub fn current_revision(&self) -> i64 {
        self.oracle.lock().current
    }

    fn check_bootstrapped(c: &ClusterState) -> Result<()> {
        if c.bootstrapped {
            Ok(())
        } else {
            Err(PdError::NotBootstrapped)
        }
    }

    pub fn put_node(&self, node: metapb::Node) -> Result<()> {
        self.check_open()?;
        if node.id == 0 {
            return Err(PdError::InvalidArgument("node id 0".into()));
        }
        let mut c = self.cluster.write();
        Self::check_bootstrapped(&c)?;
        if let Some(old) = c.nodes.get(&node.id) {
            if *old == node {
                return Ok(());
            }
            if old.state == metapb::NodeState::Tombstone as i32
                && node.state != metapb::NodeState::Tombstone as i32
            {
                return Err(PdError::InvalidArgument(format!(
                    "node {} is a tombstone and cannot come back",
                    node.id
                )));
            }
        }
        self.storage.put_node(&node)?;
        debug!(node_id = node.id, "node stored");
        c.nodes.insert(node.id, node);
        Ok(())
    }

    pub fn get_node(&self, id: u64) -> Result<Option<metapb::Node>> {
        let c = self.cluster.read();
        Self::check_bootstrapped(&c)?;
        Ok(c.nodes.get(&id).cloned())
    }

    pub fn get_all_nodes(&self) -> Result<Vec<metapb::Node>> {
        let c = self.cluster.read();
        Self::check_bootstrapped(&c)?;
        Ok(c.nodes.values().cloned().collect())
    }

    pub fn get_region(&self, key: &[u8]) -> Result<Option<RegionWithLeader>> {
        let c = self.cluster.read();
        Self::check_bootstrapped(&c)?;
        let Some((_, id)) = c
            .tree
            .range::<[u8], _>((Bound::Unbounded, Bound::Included(key)))
            .next_back()
        else {
            return Ok(None);
        };
        let Some(e) = c.regions.get(id) else {
            return Ok(None);
        };
        if !e.region.end_key.is_empty() && key >= e.region.end_key.as_slice() {
            return Ok(None);
        }
        Ok(Some((e.region.clone(), e.leader)))
    }

    pub fn get_region_by_id(&self, id: u64) -> Result<Option<RegionWithLeader>> {
        let c = self.cluster.read();
        Self::check_bootstrapped(&c)?;
        Ok(c.entry_with_leader(id))
    }

    pub fn scan_regions(
        &self,
        start: &[u8],
        end: &[u8],
        limit: usize,
    ) -> Result<Vec<RegionWithLeader>> {
        let c = self.cluster.read();
        Self::check_bootstrapped(&c)?;
        Ok(c.overlapping(start, end, limit)
            .into_iter()
            .filter_map(|id| c.entry_with_leader(id))
            .collect())
    }

    /// Records the heartbeat and asks the scheduler for the region's next
    /// step (see [`crate::client::PdClient::region_heartbeat`]).
    pub fn handle_region_heartbeat(&self, hb: RegionHeartbeat) -> Result<Option<RegionOperator>> {
        if !self.region_heartbeat(hb.region.clone(), hb.leader)? {
            return Ok(None);
        }
        self.scheduler.schedule(self, &hb)
    }

    /// Records a region's meta and leader; `Ok(false)` if the heartbeat was
    /// stale and ignored.
    pub fn region_heartbeat(&self, region: metapb::Region, leader: metapb::Peer) -> Result<bool> {
        self.check_open()?;
        validate_region(&region)?;
        if !region
            .peers
            .iter()
            .any(|p| p.id == leader.id && p.node_id == leader.node_id)
        {
            return Err(PdError::InvalidArgument(format!(
                "leader peer {} is not a peer of region {}",
                leader.id, region.id
            )));
        }
        let new_epoch = epoch(&region);
        let mut c = self.cluster.write();
        Self::check_bootstrapped(&c)?;

        let origin_changed = match c.regions.get(&region.id) {
            Some(origin) => {
                let old = epoch(&origin.region);
                if new_epoch.version < old.version || new_epoch.conf_ver < old.conf_ver {
                    debug!(
                        region_id = region.id,
                        ?new_epoch,
                        ?old,
                        "stale region heartbeat ignored"
                    );
                    return Ok(false);
                }
                origin.region != region
            }
            None => true,
        };

        let overlaps: Vec<u64> = c
            .overlapping(&region.start_key, &region.end_key, 0)
            .into_iter()
            .filter(|id| *id != region.id)
            .collect();
        for id in &overlaps {
            if let Some(o) = c.regions.get(id) {
                // A newer split/merge already replaced what this reporter
                // believes; it will learn that and report again.
                if epoch(&o.region).version > new_epoch.version {
                    debug!(
                        region_id = region.id,
                        overlapped = *id,
                        "region heartbeat overlaps a newer region, ignored"
                    );
                    return Ok(false);
                }
            }
        }

        if origin_changed || !overlaps.is_empty() {
            self.storage.update_region(&region, &overlaps)?;
            for id in &overlaps {
                if c.remove_region(*id).is_some() {
                    info!(region_id = *id, by = region.id, "obsolete region removed");
                }
            }
            c.remove_region(region.id);
            debug!(region_id = region.id, epoch = ?new_epoch, "region meta updated");
            c.insert_region(region.clone());
        }
        // Present: either known before or inserted just above.
        if let Some(e) = c.regions.get_mut(&region.id) {
            e.leader = Some(leader);
        }
        Ok(true)
    }
}

impl ClusterView for PdCore {
    fn nodes(&self) -> Result<Vec<metapb::Node>> {
        self.get_all_nodes()
    }

    fn regions(&self) -> Result<Vec<metapb::Region>> {
        Ok(self
            .scan_regions(&[], &[], 0)?
            .into_iter()
            .map(|(r, _)| r)
            .collect())
    }

    fn alloc_id(&self) -> Result<u64> {
        PdCore::alloc_id(self)
    }

    fn set_node_state(&self, mut node: metapb::Node, state: metapb::NodeState) -> Result<()> {
        node.state = state as i32;
        self.put_node(node)
    }
}

#[cfg(test)]
mod tests;
