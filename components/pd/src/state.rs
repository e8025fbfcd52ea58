//! PD's replicated state machine: what every member holds after applying
//! the same raft log, and the one deterministic `apply` that changes it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Bound;

use proto::pd_raftpb::command::Cmd;
use proto::{metapb, pd_raftpb, pdpb};
use tracing::{debug, info};

use crate::client::INITIAL_REVISION;
use crate::client::{PdError, RegionWithLeader, Result};
use crate::load::{NodeInfo, NodeLoads, RegionLoad};
use crate::storage::{Batch, PersistedState};

pub(crate) struct RegionEntry {
    pub region: metapb::Region,
    /// Learned from heartbeats by the leader only; not replicated.
    pub reported: Reported,
}

impl RegionEntry {
    fn load(&self) -> RegionLoad<'_> {
        RegionLoad {
            region: &self.region,
            leader: self.reported.leader,
            size: self.reported.approximate_size,
        }
    }
}

/// What the latest heartbeat of a region said besides its meta. Kept in
/// memory on the PD leader only: the next heartbeat refreshes it.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Reported {
    pub leader: Option<metapb::Peer>,
    pub approximate_size: u64,
    pub approximate_keys: u64,
}

#[derive(Default)]
pub(crate) struct ClusterState {
    pub bootstrapped: bool,
    pub nodes: BTreeMap<u64, metapb::Node>,
    /// Changed only through [`Self::insert_region`], [`Self::remove_region`]
    /// and [`Self::report`], which keep `loads` in step.
    regions: HashMap<u64, RegionEntry>,
    /// Per-node replica, leader and size counters over `regions`.
    loads: NodeLoads,
    /// start_key -> region id; the regions in it never overlap.
    pub tree: BTreeMap<Vec<u8>, u64>,
    /// Committed: no id above it was handed out by any leader.
    pub id_high_water: u64,
    /// Committed: no revision above it was handed out by any leader.
    pub revision_high_water: i64,
    /// The cluster's compaction revision: every region is to compact at
    /// least this far (0: never compacted). Only ever raised.
    pub compaction_revision: i64,
    /// etcd's active alarms: (member id, `pdpb::AlarmType` value).
    pub alarms: BTreeSet<(u64, i32)>,
}

/// What a region heartbeat would change.
pub(crate) enum HeartbeatEffect {
    /// Older than what PD knows; ignore it.
    Stale,
    Unchanged,
    /// The region's meta is new or changed; the listed regions overlap it
    /// and become obsolete.
    Changed(Vec<u64>),
}

pub(crate) fn epoch(r: &metapb::Region) -> metapb::RegionEpoch {
    r.region_epoch.unwrap_or_default()
}

impl ClusterState {
    pub fn from_persisted(p: PersistedState) -> Result<ClusterState> {
        let revision_high_water = match p.revision_high_water {
            None => INITIAL_REVISION,
            Some(r) if r >= INITIAL_REVISION => r,
            Some(r) => {
                return Err(PdError::Storage(format!(
                    "corrupted revision high-water mark {r}"
                )))
            }
        };
        if p.compaction_revision < 0 || p.compaction_revision > revision_high_water {
            return Err(PdError::Storage(format!(
                "corrupted compaction revision {}",
                p.compaction_revision
            )));
        }
        let mut c = ClusterState {
            bootstrapped: p.bootstrapped,
            id_high_water: p.id_high_water,
            revision_high_water,
            compaction_revision: p.compaction_revision,
            alarms: p.alarms.iter().map(|a| (a.member_id, a.alarm)).collect(),
            ..Default::default()
        };
        for n in p.nodes {
            c.nodes.insert(n.id, n);
        }
        for r in p.regions {
            c.insert_region(r, Reported::default());
        }
        if c.tree.len() != c.regions.len() {
            // Two regions with one start key can only come from corruption or
            // a bug; refuse rather than route keys to a random one of them.
            return Err(PdError::Storage(
                "persisted regions overlap (duplicate start keys)".into(),
            ));
        }
        Ok(c)
    }

    pub fn from_snapshot(s: pd_raftpb::StateSnapshot) -> Result<ClusterState> {
        Self::from_persisted(PersistedState {
            bootstrapped: s.bootstrapped,
            id_high_water: s.id_high_water,
            revision_high_water: Some(s.revision_high_water),
            compaction_revision: s.compaction_revision,
            alarms: s.alarms,
            nodes: s.nodes,
            regions: s.regions,
        })
    }

    /// The active alarms of type `alarm` (all of them for `NONE`), by
    /// member id.
    pub fn alarms_of(&self, alarm: pdpb::AlarmType) -> Vec<pdpb::AlarmMember> {
        self.alarms
            .iter()
            .filter(|(_, a)| alarm == pdpb::AlarmType::None || *a == alarm as i32)
            .map(|&(member_id, alarm)| pdpb::AlarmMember { member_id, alarm })
            .collect()
    }

    pub fn entry_with_leader(&self, id: u64) -> Option<RegionWithLeader> {
        self.regions.get(&id).map(|e| RegionWithLeader {
            region: e.region.clone(),
            leader: e.reported.leader,
            approximate_size: e.reported.approximate_size,
            approximate_keys: e.reported.approximate_keys,
        })
    }

    /// The id of the region containing `key` (start <= key < end, an empty
    /// end is +inf), if any.
    pub fn region_containing(&self, key: &[u8]) -> Option<u64> {
        let (_, id) = self
            .tree
            .range::<[u8], _>((Bound::Unbounded, Bound::Included(key)))
            .next_back()?;
        let e = self.regions.get(id)?;
        (e.region.end_key.is_empty() || key < e.region.end_key.as_slice()).then_some(*id)
    }

    /// Ids of the regions overlapping [start, end), in key order.
    pub fn overlapping(&self, start: &[u8], end: &[u8], limit: usize) -> Vec<u64> {
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

    pub fn region_count(&self) -> usize {
        self.regions.len()
    }

    /// The per-node load counters.
    #[cfg(test)]
    pub fn loads(&self) -> &NodeLoads {
        &self.loads
    }

    /// Every node with its state and load, as the schedulers see them.
    pub fn node_infos(&self) -> Vec<NodeInfo> {
        self.nodes
            .values()
            .map(|n| NodeInfo {
                id: n.id,
                state: n.state(),
                started: !n.client_urls.is_empty(),
                load: self.loads.get(n.id),
            })
            .collect()
    }

    /// The counters as a walk over every region finds them: what `loads`
    /// must always equal.
    #[cfg(test)]
    pub fn recount_loads(&self) -> NodeLoads {
        let mut loads = NodeLoads::default();
        for e in self.regions.values() {
            loads.add(e.load());
        }
        loads
    }

    /// Every region's id, in key order.
    #[cfg(test)]
    pub fn region_ids(&self) -> Vec<u64> {
        self.tree.values().copied().collect()
    }

    /// Inserts (or replaces) a region; the caller removed whatever it
    /// overlaps.
    pub fn insert_region(&mut self, region: metapb::Region, reported: Reported) {
        self.remove_region(region.id);
        self.tree.insert(region.start_key.clone(), region.id);
        let e = RegionEntry { region, reported };
        self.loads.add(e.load());
        self.regions.insert(e.region.id, e);
    }

    pub fn remove_region(&mut self, id: u64) -> Option<RegionEntry> {
        let e = self.regions.remove(&id)?;
        self.loads.remove(e.load());
        if self.tree.get(&e.region.start_key) == Some(&id) {
            self.tree.remove(&e.region.start_key);
        }
        Some(e)
    }

    /// Records what the leader of region `region.id` reported besides the
    /// meta, if PD's meta of the region is still `region` (a report for an
    /// outdated meta is dropped). `false` if dropped.
    pub fn report(&mut self, region: &metapb::Region, reported: Reported) -> bool {
        let Some(e) = self.regions.get_mut(&region.id) else {
            return false;
        };
        if e.region != *region {
            return false;
        }
        self.loads.remove(e.load());
        e.reported = reported;
        self.loads.add(e.load());
        true
    }

    pub fn heartbeat_effect(&self, region: &metapb::Region) -> HeartbeatEffect {
        let new_epoch = epoch(region);
        let origin_changed = match self.regions.get(&region.id) {
            Some(origin) => {
                let old = epoch(&origin.region);
                if new_epoch.version < old.version || new_epoch.conf_ver < old.conf_ver {
                    debug!(
                        region_id = region.id,
                        ?new_epoch,
                        ?old,
                        "stale region heartbeat ignored"
                    );
                    return HeartbeatEffect::Stale;
                }
                origin.region != *region
            }
            None => true,
        };
        let overlaps: Vec<u64> = self
            .overlapping(&region.start_key, &region.end_key, 0)
            .into_iter()
            .filter(|id| *id != region.id)
            .collect();
        for id in &overlaps {
            if let Some(o) = self.regions.get(id) {
                // A newer split/merge already replaced what this reporter
                // believes; it will learn that and report again.
                if epoch(&o.region).version > new_epoch.version {
                    debug!(
                        region_id = region.id,
                        overlapped = *id,
                        "region heartbeat overlaps a newer region, ignored"
                    );
                    return HeartbeatEffect::Stale;
                }
            }
        }
        if origin_changed || !overlaps.is_empty() {
            HeartbeatEffect::Changed(overlaps)
        } else {
            HeartbeatEffect::Unchanged
        }
    }

    /// Stores `region` if it is news (see [`Self::heartbeat_effect`]),
    /// dropping the regions it makes obsolete; `false` if it changed
    /// nothing (stale or unchanged by now).
    fn update_region(&mut self, region: metapb::Region, batch: &mut Batch) -> bool {
        let HeartbeatEffect::Changed(overlaps) = self.heartbeat_effect(&region) else {
            return false;
        };
        for id in &overlaps {
            batch.delete_region(*id);
            if self.remove_region(*id).is_some() {
                info!(region_id = *id, by = region.id, "obsolete region removed");
            }
        }
        batch.put_region(&region);
        // What the leader reported stays until its next heartbeat.
        let reported = self
            .remove_region(region.id)
            .map(|e| e.reported)
            .unwrap_or_default();
        debug!(region_id = region.id, epoch = ?epoch(&region), "region meta updated");
        self.insert_region(region, reported);
        true
    }

    /// Applies one committed command. Every member runs this on the same
    /// state in the same order, so it must depend on nothing but `self` and
    /// `cmd`; the checks the proposer made are repeated because the state
    /// may have changed between proposing and applying. `Ok(false)`: the
    /// command changed nothing.
    pub fn apply(&mut self, cmd: Cmd, batch: &mut Batch) -> Result<bool> {
        match cmd {
            Cmd::Bootstrap(b) => {
                if self.bootstrapped {
                    return Err(PdError::AlreadyBootstrapped);
                }
                let (Some(node), Some(region)) = (b.node, b.region) else {
                    return Err(PdError::InvalidArgument(
                        "bootstrap without node or region".into(),
                    ));
                };
                // Ids picked by the caller must never come from the
                // allocator later.
                let max_used = region
                    .peers
                    .iter()
                    .map(|p| p.id.max(p.node_id))
                    .chain([node.id, region.id])
                    .max()
                    .unwrap_or(0);
                if max_used > self.id_high_water {
                    self.id_high_water = max_used;
                    batch.put_id_high_water(max_used);
                }
                batch.set_bootstrapped();
                batch.put_node(&node);
                batch.put_region(&region);
                info!(
                    node_id = node.id,
                    region_id = region.id,
                    "cluster bootstrapped"
                );
                self.bootstrapped = true;
                self.nodes.insert(node.id, node);
                self.insert_region(region, Reported::default());
                Ok(true)
            }
            Cmd::PutNode(node) => {
                if !self.bootstrapped {
                    return Err(PdError::NotBootstrapped);
                }
                if let Some(old) = self.nodes.get(&node.id) {
                    if *old == node {
                        return Ok(false);
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
                batch.put_node(&node);
                debug!(node_id = node.id, "node stored");
                self.nodes.insert(node.id, node);
                Ok(true)
            }
            Cmd::UpdateRegion(u) => {
                let Some(region) = u.region else {
                    return Err(PdError::InvalidArgument(
                        "region update without region".into(),
                    ));
                };
                if !self.bootstrapped {
                    return Err(PdError::NotBootstrapped);
                }
                Ok(self.update_region(region, batch))
            }
            Cmd::UpdateRegions(u) => {
                if !self.bootstrapped {
                    return Err(PdError::NotBootstrapped);
                }
                // Each on the state the ones before it left; `|` so that
                // every one is applied.
                Ok(u.regions
                    .into_iter()
                    .fold(false, |changed, r| self.update_region(r, batch) | changed))
            }
            Cmd::IdHighWater(h) => {
                let v = if h.exact {
                    h.value
                } else {
                    h.value.max(self.id_high_water)
                };
                self.id_high_water = v;
                batch.put_id_high_water(v);
                Ok(true)
            }
            Cmd::RevisionHighWater(h) => {
                let value = (h.value as i64).max(INITIAL_REVISION);
                let v = if h.exact {
                    value
                } else {
                    value.max(self.revision_high_water)
                };
                self.revision_high_water = v;
                batch.put_revision_high_water(v);
                Ok(true)
            }
            Cmd::CompactionRevision(rev) => {
                // The proposer checked it against the oracle; raising only
                // keeps a late or repeated entry from undoing a later one.
                if rev <= self.compaction_revision {
                    return Ok(false);
                }
                self.compaction_revision = rev;
                batch.put_compaction_revision(rev);
                info!(revision = rev, "cluster compaction revision raised");
                Ok(true)
            }
            Cmd::Alarm(change) => {
                let Some(m) = change.member else {
                    return Err(PdError::InvalidArgument(
                        "alarm change without alarm".into(),
                    ));
                };
                let key = (m.member_id, m.alarm);
                let changed = if change.deactivate {
                    self.alarms.remove(&key)
                } else {
                    self.alarms.insert(key)
                };
                if changed {
                    batch.put_alarms(&self.alarms_of(pdpb::AlarmType::None));
                    info!(
                        member_id = m.member_id,
                        alarm = m.alarm,
                        deactivated = change.deactivate,
                        "alarm changed"
                    );
                }
                Ok(changed)
            }
        }
    }
}

#[cfg(test)]
mod load_tests;
