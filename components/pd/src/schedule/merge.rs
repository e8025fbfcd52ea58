//! The merge checker: merges a small region into its small right
//! neighbour, so that regions left small by splits (or emptied by
//! deletes and compaction) do not pile up, first moving the region's
//! replicas onto its neighbour's nodes when they are elsewhere.
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
//! - their replicas are on the same set of nodes (else see *alignment*);
//! - neither has an operator (a step being repeated, a requested split or
//!   merge) or a balance move or merge in flight;
//! - neither region's epoch version changed for `split_merge_interval`:
//!   PD remembers, in memory, when it first saw each region's current
//!   version (a new PD leader starts these clocks afresh), and the leaders
//!   that reported the sizes have led for a while ([`SIZE_SETTLE`], or the
//!   interval if shorter): a new leader reports 0 until it has measured its
//!   region;
//! - fewer than `merge_limit` merges and alignments the checker started are
//!   in flight.
//!
//! **Alignment.** When all of that holds but the node sets differ, the
//! answer is one replica move instead ([`Verdict::Align`]): a replica of
//! the source on a node the target does not use (a follower's if there is
//! one) moves to the least loaded up node the target uses and the source
//! does not (`schedule::align` picks them). The move is the balance one
//! (`schedule::balance`, purpose `Align`): a learner, promoted once caught
//! up, then the source replica removed, leadership handed over first when
//! it is the leader; the voters never drop below what the region had. The
//! next move starts on a heartbeat after this one finished, and once the
//! node sets match, the merge starts as above. Replica moves change the
//! epoch's `conf_ver`, not its `version`, so they do not restart the
//! settle clocks; a leader handover restarts the leader's ([`SIZE_SETTLE`]
//! or the interval if shorter), delaying the merge that long. An alignment
//! counts against `merge_limit` like a merge, from its first move until its
//! merge starts (then the merge counts); a source aligns with one target at
//! a time. While an alignment or merge is in flight the balance schedulers
//! leave both regions alone (the caller checks [`MergeChecker::involves`]),
//! so balance never moves an aligned replica back.
//!
//! An alignment stops (its record is dropped; a replica move under way
//! finishes as placement carries it on, leaving the source with its voters
//! on a mix of nodes, which placement is content with) when:
//! - the target is no longer the source's right neighbour (merged
//!   elsewhere) or its epoch version changed (split or merged);
//! - either region, or both together, stops being small, as their
//!   heartbeats say (checked on every heartbeat of either);
//! - the source's range changed;
//! - no replica move started for `balance_move_timeout` (a condition that
//!   merely waits, e.g. a pending peer or a step on the target, keeps it
//!   until then).
//!
//! A merge counts as in flight, by source id, until the target's heartbeat
//! shows it took the source's range, the source's heartbeat shows a
//! different range (it split or merged elsewhere), or `merge_timeout`
//! passes. The answer is [`RegionOperator::Merge`] with PD's meta of the
//! target; the source's leader carries it out (or refuses, when the target
//! moved on).
//!
//! Cost per heartbeat: map look-ups and one tree look-up for the
//! neighbour, O(merges and alignments in flight) for their bookkeeping,
//! O(nodes) to pick an alignment move; the clocks of regions PD no longer
//! hears from are swept at most once a minute, over the clocks alone.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use proto::metapb::{self, PeerRole};
use tracing::{debug, info};

use super::ScheduleConfig;
use crate::client::{RegionHeartbeat, RegionOperator, RegionWithLeader};
use crate::merge::same_nodes;
use crate::operators::CheckerMerge;

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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Moving the source's replicas onto the target's nodes.
    Aligning {
        /// The target's epoch version when the alignment started: another
        /// one means it split or merged, and the alignment stops.
        target_version: u64,
        /// The source's (keys, bytes) as its latest heartbeat said, to
        /// check both together on the target's heartbeats.
        source_sizes: (u64, u64),
    },
    Merging,
}

#[derive(Debug, Clone)]
struct InFlight {
    target_id: u64,
    /// The source's range when the merge or alignment started.
    start_key: Vec<u8>,
    end_key: Vec<u8>,
    /// When the merge started, or the alignment's latest replica move.
    at: Instant,
    /// Replica moves the alignment started.
    moves: u64,
    stage: Stage,
}

/// The merge checker's answer for a source region.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Verdict {
    /// Merge into the target now (counted in flight from here on).
    Merge(RegionOperator),
    /// Move the source's replica on node `from` to node `to` first (the
    /// alignment is counted in flight from here on; the caller starts the
    /// move, or calls [`MergeChecker::undo_align`] if it cannot).
    Align { from: u64, to: u64 },
}

pub(crate) struct MergeChecker {
    max_keys: u64,
    max_size: u64,
    interval: Duration,
    limit: usize,
    timeout: Duration,
    align_timeout: Duration,
    clocks: Mutex<Clocks>,
    /// Merges and alignments, by source region id.
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
            align_timeout: config.balance_move_timeout,
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

    /// Whether `keys` and `size` are small enough to merge (saturating
    /// sums may be given).
    fn fits(&self, keys: u64, size: u64) -> bool {
        keys <= self.max_keys && size <= self.max_size
    }

    /// Whether the heartbeating region and `target` are small enough to
    /// merge, each and both together (the first condition [`Self::decide`]
    /// checks; cheap, so callers may ask it before gathering more).
    pub fn small_enough(&self, hb: &RegionHeartbeat, target: &RegionWithLeader) -> bool {
        self.fits(hb.approximate_keys, hb.approximate_size)
            && self.fits(target.approximate_keys, target.approximate_size)
            && self.fits(
                hb.approximate_keys.saturating_add(target.approximate_keys),
                hb.approximate_size.saturating_add(target.approximate_size),
            )
    }

    /// Records what the heartbeat says (the region's version clock, its
    /// leader and health) and settles the merges and alignments in flight
    /// it concerns. Called for every heartbeat, before anything is decided.
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
        in_flight.retain(|source_id, m| match self.settles(*source_id, m, hb) {
            Some(why) => {
                info!(source_id, target_id = m.target_id, stage = ?m.stage, why, "merge checker: no longer in flight");
                false
            }
            None => true,
        });
    }

    /// Why `m` (by source `source_id`) is no longer in flight after heartbeat
    /// `hb`, if it is not; updates an alignment's source sizes.
    fn settles(
        &self,
        source_id: u64,
        m: &mut InFlight,
        hb: &RegionHeartbeat,
    ) -> Option<&'static str> {
        let region = &hb.region;
        let (keys, size) = (hb.approximate_keys, hb.approximate_size);
        match &mut m.stage {
            Stage::Merging => {
                if m.at.elapsed() >= self.timeout {
                    Some("merge expired")
                } else if source_id == region.id
                    && (m.start_key != region.start_key || m.end_key != region.end_key)
                {
                    Some("the source's range changed")
                } else if m.target_id == region.id && region.start_key <= m.start_key {
                    Some("merge done")
                } else {
                    None
                }
            }
            Stage::Aligning {
                target_version,
                source_sizes,
            } => {
                if m.at.elapsed() >= self.align_timeout {
                    Some("alignment expired")
                } else if source_id == region.id {
                    *source_sizes = (keys, size);
                    if m.start_key != region.start_key || m.end_key != region.end_key {
                        Some("alignment stopped: the source's range changed")
                    } else if !self.fits(keys, size) {
                        Some("alignment stopped: the source is no longer small")
                    } else {
                        None
                    }
                } else if m.target_id == region.id {
                    let (sk, ss) = *source_sizes;
                    if version(region) != *target_version {
                        Some("alignment stopped: the target split or merged")
                    } else if !self.fits(keys, size)
                        || !self.fits(keys.saturating_add(sk), size.saturating_add(ss))
                    {
                        Some("alignment stopped: the target is no longer small")
                    } else {
                        None
                    }
                } else {
                    None
                }
            }
        }
    }

    /// Whether a merge or alignment the checker started involves region
    /// `id`, as its source or its target. O(merges in flight).
    pub fn involves(&self, id: u64) -> bool {
        self.in_flight
            .lock()
            .iter()
            .any(|(source, m)| *source == id || m.target_id == id)
    }

    /// Merges and alignments in flight.
    #[cfg(test)]
    pub fn in_flight(&self) -> usize {
        self.in_flight.lock().len()
    }

    /// The target of region `source_id`'s alignment in flight, if any.
    #[cfg(test)]
    pub fn aligning(&self, source_id: u64) -> Option<u64> {
        self.in_flight
            .lock()
            .get(&source_id)
            .filter(|m| matches!(m.stage, Stage::Aligning { .. }))
            .map(|m| m.target_id)
    }

    /// The merges and alignments in flight, by source id, as operators'
    /// tools show them. O(merges in flight).
    pub fn list(&self) -> Vec<CheckerMerge> {
        let mut out: Vec<CheckerMerge> = self
            .in_flight
            .lock()
            .iter()
            .map(|(source_id, m)| CheckerMerge {
                source_id: *source_id,
                target_id: m.target_id,
                aligning: matches!(m.stage, Stage::Aligning { .. }),
                replica_moves: m.moves,
                age: m.at.elapsed(),
            })
            .collect();
        out.sort_by_key(|m| m.source_id);
        out
    }

    /// Forgets the replica move [`Self::decide`] just counted for
    /// `source_id`'s alignment, when it could not be started; the alignment
    /// goes too if that was its first.
    pub fn undo_align(&self, source_id: u64) {
        let mut in_flight = self.in_flight.lock();
        if let Some(m) = in_flight.get_mut(&source_id) {
            m.moves = m.moves.saturating_sub(1);
            if m.moves == 0 {
                in_flight.remove(&source_id);
            }
        }
    }

    /// Drops `source_id`'s alignment, if it has one.
    fn stop_alignment(&self, source_id: u64, why: &'static str) {
        let mut in_flight = self.in_flight.lock();
        if let Some(m) = in_flight.get(&source_id) {
            if matches!(m.stage, Stage::Aligning { .. }) {
                info!(source_id, target_id = m.target_id, why, "alignment stopped");
                in_flight.remove(&source_id);
            }
        }
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
    /// neighbour as PD's map has it), or the next replica move aligning
    /// it with `target`'s nodes, if every condition holds (see the module
    /// docs) and the limit allows; either counts in flight from here on.
    /// `busy` says whether a region has an operator or move of some other
    /// kind under way. `pick` chooses an alignment move (source node, target
    /// node) towards a target's nodes; it is asked only when the nodes
    /// differ, and `None` from it means no move is possible now (the
    /// target's nodes not up, or the source on fewer nodes: wait).
    pub fn decide(
        &self,
        hb: &RegionHeartbeat,
        target: Option<RegionWithLeader>,
        busy: &dyn Fn(u64) -> bool,
        pick: &dyn Fn(&metapb::Region) -> Option<(u64, u64)>,
    ) -> Option<Verdict> {
        if !self.enabled() {
            return None;
        }
        let source = &hb.region;
        // The source's own alignment: (target id, target version).
        let aligning = match self.in_flight.lock().get(&source.id) {
            None => None,
            Some(InFlight {
                target_id,
                stage: Stage::Aligning { target_version, .. },
                ..
            }) => Some((*target_id, *target_version)),
            Some(_) => return None,
        };
        let target =
            target.filter(|t| !source.end_key.is_empty() && t.region.start_key == source.end_key);
        let Some(target) = target else {
            self.stop_alignment(source.id, "the source has no right neighbour");
            return None;
        };
        if aligning.is_some_and(|a| a != (target.region.id, version(&target.region))) {
            self.stop_alignment(source.id, "the target split or merged");
            return None;
        }
        if !self.small_enough(hb, &target) {
            self.stop_alignment(source.id, "no longer small");
            return None;
        }
        // From here on, a condition that fails makes an alignment wait.
        let target_leader = target.leader?;
        if !healthy(hb)
            || target
                .region
                .peers
                .iter()
                .any(|p| p.role() != PeerRole::Voter)
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
        let step = if same_nodes(source, &target.region) {
            None
        } else {
            Some(pick(&target.region)?)
        };
        let mut in_flight = self.in_flight.lock();
        let involved = |id: u64| in_flight.iter().any(|(s, m)| *s == id || m.target_id == id);
        let moves = match in_flight.get(&source.id) {
            // Still this alignment (nothing changed it meanwhile).
            Some(m) if m.target_id == target.region.id && m.stage != Stage::Merging => m.moves,
            Some(_) => return None,
            None => {
                if involved(source.id)
                    || involved(target.region.id)
                    || in_flight.len() >= self.limit
                {
                    return None;
                }
                0
            }
        };
        let (stage, moves, verdict) = match step {
            None => {
                info!(
                    source_id = source.id,
                    target_id = target.region.id,
                    source_keys = hb.approximate_keys,
                    source_size = hb.approximate_size,
                    target_keys = target.approximate_keys,
                    target_size = target.approximate_size,
                    replica_moves = moves,
                    "merge started"
                );
                let op = RegionOperator::Merge {
                    target: target.region.clone(),
                };
                (Stage::Merging, moves, Verdict::Merge(op))
            }
            Some((from, to)) => {
                debug!(
                    source_id = source.id,
                    target_id = target.region.id,
                    from,
                    to,
                    "alignment: replica move"
                );
                let stage = Stage::Aligning {
                    target_version: version(&target.region),
                    source_sizes: (hb.approximate_keys, hb.approximate_size),
                };
                (stage, moves + 1, Verdict::Align { from, to })
            }
        };
        in_flight.insert(
            source.id,
            InFlight {
                target_id: target.region.id,
                start_key: source.start_key.clone(),
                end_key: source.end_key.clone(),
                at: now,
                moves,
                stage,
            },
        );
        Some(verdict)
    }
}
