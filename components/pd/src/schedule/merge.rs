//! The merge checker: merges a small region into its small right
//! neighbour, so that regions left small by splits (or emptied by
//! deletes and compaction) do not pile up.
//!
//! On a region's heartbeat, once placement and balance have nothing to do,
//! the region (the source) is merged into its right neighbour (the target,
//! found in PD's region tree by the source's end key) when all of these
//! hold:
//!
//! - both are small: approximate keys <= `max_merge_region_keys` and size
//!   <= `max_merge_region_size`, each and both together;
//! - both have a known leader, every peer of both is a voter, and neither
//!   has pending or down peers (the target as its latest heartbeat said);
//! - their replicas are on the same set of nodes;
//! - neither has an operator (a step being repeated, a requested split or
//!   merge) or a balance move or merge in flight;
//! - neither region's epoch version changed for `split_merge_interval`:
//!   PD remembers, in memory, when it first saw each region's current
//!   version (a new PD leader starts these clocks afresh), and the leaders
//!   that reported the sizes have led for a while ([`SIZE_SETTLE`], or the
//!   interval if shorter): a new leader reports 0 until it has measured its
//!   region;
//! - fewer than `merge_limit` merges the checker started are in flight.
//!
//! A merge counts as in flight, by source id, until the target's heartbeat
//! shows it took the source's range, the source's heartbeat shows a
//! different range (it split or merged elsewhere), or `merge_timeout`
//! passes. The answer is [`RegionOperator::Merge`] with PD's meta of the
//! target; the source's leader carries it out (or refuses, when the target
//! moved on).
//!
//! Cost per heartbeat: map look-ups and one tree look-up for the
//! neighbour, O(merges in flight) for their bookkeeping; the clocks of
//! regions PD no longer hears from are swept at most once a minute, over
//! the clocks alone.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use proto::metapb::{self, PeerRole};
use tracing::{debug, info};

use super::ScheduleConfig;
use crate::client::{RegionHeartbeat, RegionOperator, RegionWithLeader};
use crate::merge::same_nodes;

/// How long a region's leader must have led before the sizes it reports
/// are trusted (a new leader reports 0 until its first measure, 10 s by
/// default); the interval applies instead when shorter.
pub(crate) const SIZE_SETTLE: Duration = Duration::from_secs(60);
/// The clocks of regions not heard from for this long are forgotten (a
/// region heartbeats at least every 5 s; one that is gone was merged).
const FORGET_AFTER: Duration = Duration::from_secs(10 * 60);
/// How often the clocks are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// What PD saw of a region in its heartbeats.
#[derive(Debug, Clone, Copy)]
struct Seen {
    version: u64,
    /// When PD first saw `version`.
    since: Instant,
    leader: u64,
    /// When PD first saw `leader` lead it.
    leader_since: Instant,
    /// All peers voters, none pending or down.
    healthy: bool,
    heard: Instant,
}

#[derive(Debug)]
struct Clocks {
    seen: HashMap<u64, Seen>,
    swept: Instant,
}

#[derive(Debug, Clone)]
struct InFlight {
    target_id: u64,
    start_key: Vec<u8>,
    end_key: Vec<u8>,
    at: Instant,
}

pub(crate) struct MergeChecker {
    max_keys: u64,
    max_size: u64,
    interval: Duration,
    limit: usize,
    timeout: Duration,
    clocks: Mutex<Clocks>,
    /// By source region id.
    in_flight: Mutex<HashMap<u64, InFlight>>,
}

/// Every peer a voter, none pending or down.
fn healthy(hb: &RegionHeartbeat) -> bool {
    hb.pending_peers.is_empty()
        && hb.down_peers.is_empty()
        && hb.region.peers.iter().all(|p| p.role() == PeerRole::Voter)
}

fn version(r: &metapb::Region) -> u64 {
    r.region_epoch.map_or(0, |e| e.version)
}

impl MergeChecker {
    pub fn new(config: &ScheduleConfig) -> Self {
        MergeChecker {
            max_keys: config.max_merge_region_keys,
            max_size: config.max_merge_region_size,
            interval: config.split_merge_interval,
            limit: config.merge_limit,
            timeout: config.merge_timeout,
            clocks: Mutex::new(Clocks {
                seen: HashMap::new(),
                swept: Instant::now(),
            }),
            in_flight: Mutex::new(HashMap::new()),
        }
    }

    /// Whether the checker may merge at all (limits and size caps set).
    pub fn enabled(&self) -> bool {
        self.max_keys > 0 && self.max_size > 0 && self.limit > 0
    }

    /// Records what the heartbeat says (the region's version clock, its
    /// leader and health) and settles the merges in flight it concerns.
    /// Called for every heartbeat, before anything is decided.
    pub fn observe(&self, hb: &RegionHeartbeat) {
        let region = &hb.region;
        let now = Instant::now();
        {
            let mut clocks = self.clocks.lock();
            if now.duration_since(clocks.swept) >= SWEEP_EVERY {
                clocks
                    .seen
                    .retain(|_, s| now.duration_since(s.heard) < FORGET_AFTER);
                clocks.swept = now;
            }
            let v = version(region);
            let leader = hb.leader.id;
            let seen = clocks.seen.entry(region.id).or_insert(Seen {
                version: v,
                since: now,
                leader,
                leader_since: now,
                healthy: false,
                heard: now,
            });
            if seen.version != v {
                seen.version = v;
                seen.since = now;
            }
            if seen.leader != leader {
                seen.leader = leader;
                seen.leader_since = now;
            }
            seen.healthy = healthy(hb);
            seen.heard = now;
        }
        let mut in_flight = self.in_flight.lock();
        in_flight.retain(|source_id, m| {
            let done = if m.at.elapsed() >= self.timeout {
                info!(source_id, target_id = m.target_id, "merge expired");
                true
            } else if *source_id == region.id {
                let changed = m.start_key != region.start_key || m.end_key != region.end_key;
                if changed {
                    debug!(
                        source_id,
                        target_id = m.target_id,
                        "merge no longer in flight: the source's range changed"
                    );
                }
                changed
            } else if m.target_id == region.id {
                let absorbed = region.start_key <= m.start_key;
                if absorbed {
                    info!(source_id, target_id = m.target_id, "merge done");
                }
                absorbed
            } else {
                false
            };
            !done
        });
    }

    /// Whether a merge the checker started involves region `id`, as its
    /// source or its target. O(merges in flight).
    #[cfg(test)]
    pub fn in_flight_involves(&self, id: u64) -> bool {
        self.in_flight
            .lock()
            .iter()
            .any(|(source, m)| *source == id || m.target_id == id)
    }

    /// Merges in flight.
    #[cfg(test)]
    pub fn in_flight(&self) -> usize {
        self.in_flight.lock().len()
    }

    /// Whether region `id`'s clocks allow a merge: PD has seen its version
    /// `version` for the interval and its current leader for long enough,
    /// and its latest heartbeat showed it healthy.
    fn settled(&self, seen: Option<&Seen>, version: u64, now: Instant) -> bool {
        let Some(s) = seen else {
            return false;
        };
        s.healthy
            && s.version == version
            && now.duration_since(s.since) >= self.interval
            && now.duration_since(s.leader_since) >= self.interval.min(SIZE_SETTLE)
    }

    /// The merge of the heartbeating region into `target` (its right
    /// neighbour as PD's map has it), if every condition holds (see the
    /// module docs) and the limit allows; it counts in flight from here on.
    /// `busy` says whether a region has an operator or move of some other
    /// kind under way.
    pub fn decide(
        &self,
        hb: &RegionHeartbeat,
        target: Option<RegionWithLeader>,
        busy: &dyn Fn(u64) -> bool,
    ) -> Option<RegionOperator> {
        if !self.enabled() {
            return None;
        }
        let source = &hb.region;
        let target = target?;
        if source.end_key.is_empty() || target.region.start_key != source.end_key {
            return None;
        }
        let fits = |keys: u64, size: u64| keys <= self.max_keys && size <= self.max_size;
        if !fits(hb.approximate_keys, hb.approximate_size)
            || !fits(target.approximate_keys, target.approximate_size)
            || !fits(
                hb.approximate_keys.saturating_add(target.approximate_keys),
                hb.approximate_size.saturating_add(target.approximate_size),
            )
        {
            return None;
        }
        let target_leader = target.leader?;
        if !healthy(hb)
            || target
                .region
                .peers
                .iter()
                .any(|p| p.role() != PeerRole::Voter)
            || !same_nodes(source, &target.region)
        {
            return None;
        }
        let now = Instant::now();
        {
            let clocks = self.clocks.lock();
            let target_seen = clocks.seen.get(&target.region.id);
            if !self.settled(clocks.seen.get(&source.id), version(source), now)
                || !self.settled(target_seen, version(&target.region), now)
                || target_seen.is_some_and(|s| s.leader != target_leader.id)
            {
                return None;
            }
        }
        if busy(source.id) || busy(target.region.id) {
            return None;
        }
        let mut in_flight = self.in_flight.lock();
        let involved = |id: u64| in_flight.iter().any(|(s, m)| *s == id || m.target_id == id);
        if involved(source.id) || involved(target.region.id) || in_flight.len() >= self.limit {
            return None;
        }
        info!(
            source_id = source.id,
            target_id = target.region.id,
            source_keys = hb.approximate_keys,
            source_size = hb.approximate_size,
            target_keys = target.approximate_keys,
            target_size = target.approximate_size,
            "merge started"
        );
        in_flight.insert(
            source.id,
            InFlight {
                target_id: target.region.id,
                start_key: source.start_key.clone(),
                end_key: source.end_key.clone(),
                at: now,
            },
        );
        Some(RegionOperator::Merge {
            target: target.region,
        })
    }
}
