//! Merges asked for by an operator (`metastore-ctl region merge`, the
//! `MergeRegions` RPC): validated against PD's map, kept in memory on the
//! PD leader by source region id and handed to the source region's leader
//! with its heartbeat responses (with PD's latest meta of the target) until
//! the source's range changed or it is gone (merged), the target is no
//! longer its right neighbour, or the request is older than
//! [`crate::schedule::ScheduleConfig::merge_timeout`].
//!
//! Nothing here is replicated: a new PD leader starts without requests. A
//! heartbeat of a region without a request costs one map look-up; one with
//! a request adds a look-up of its right neighbour in the region tree.
//! Requesting, listing and [`MergeRequests::involves`] sweep the requests
//! alone.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use proto::metapb;
use tracing::{debug, info};

use crate::client::{PdError, RegionOperator, RegionWithLeader, Result};
use crate::operators::{PendingOperator, SOURCE_MERGE_REQUEST};
use crate::state::ClusterState;

/// The region starting at `region`'s end key, if PD knows one (none for a
/// region reaching the end of the keyspace, or while PD has not heard of
/// the neighbour yet). One tree look-up.
pub(crate) fn right_neighbour(
    c: &ClusterState,
    region: &metapb::Region,
) -> Option<RegionWithLeader> {
    if region.end_key.is_empty() {
        return None;
    }
    let id = c.region_containing(&region.end_key)?;
    c.entry_with_leader(id)
        .filter(|r| r.region.start_key == region.end_key)
}

/// The node ids of `region`'s replicas, sorted.
fn nodes_of(region: &metapb::Region) -> Vec<u64> {
    let mut nodes: Vec<u64> = region.peers.iter().map(|p| p.node_id).collect();
    nodes.sort_unstable();
    nodes
}

/// Whether the replicas of `a` and `b` are on the same set of nodes (one
/// replica per node each, as placement keeps them).
pub(crate) fn same_nodes(a: &metapb::Region, b: &metapb::Region) -> bool {
    nodes_of(a) == nodes_of(b)
}

/// Checks that two distinct regions can merge and orders them: `(source,
/// target)`, the source being the left one (`source.end_key ==
/// target.start_key`); `a` and `b` are swapped when `b` is `a`'s LEFT
/// neighbour. `Err(InvalidArgument)` when they are not adjacent or their
/// replicas are not on the same nodes.
pub(crate) fn order_for_merge(
    a: RegionWithLeader,
    b: RegionWithLeader,
) -> Result<(RegionWithLeader, RegionWithLeader)> {
    let adjacent =
        |l: &metapb::Region, r: &metapb::Region| !l.end_key.is_empty() && l.end_key == r.start_key;
    let (source, target) = if adjacent(&a.region, &b.region) {
        (a, b)
    } else if adjacent(&b.region, &a.region) {
        (b, a)
    } else {
        return Err(PdError::InvalidArgument(format!(
            "regions {} and {} are not adjacent",
            a.region.id, b.region.id
        )));
    };
    if !same_nodes(&source.region, &target.region) {
        let list = |r: &metapb::Region| {
            let nodes: Vec<String> = nodes_of(r).iter().map(u64::to_string).collect();
            format!("[{}]", nodes.join(", "))
        };
        return Err(PdError::InvalidArgument(format!(
            "the replicas of regions {} and {} are not on the same nodes; region {} is on \
             nodes {}, region {} on nodes {} (move replicas first; PD's merge checker \
             moves them itself for regions small enough to merge on their own)",
            source.region.id,
            target.region.id,
            source.region.id,
            list(&source.region),
            target.region.id,
            list(&target.region)
        )));
    }
    Ok((source, target))
}

struct Request {
    target_id: u64,
    /// The source's range when requested: a different range means it
    /// split or merged meanwhile, and the request no longer applies.
    start_key: Vec<u8>,
    end_key: Vec<u8>,
    at: Instant,
}

impl Request {
    fn same_range(&self, region: &metapb::Region) -> bool {
        self.start_key == region.start_key && self.end_key == region.end_key
    }
}

pub(crate) struct MergeRequests {
    timeout: Duration,
    pending: Mutex<HashMap<u64, Request>>,
}

impl MergeRequests {
    pub fn new(timeout: Duration) -> Self {
        MergeRequests {
            timeout,
            pending: Mutex::new(HashMap::new()),
        }
    }

    /// Records a request to merge `source` into region `target_id`,
    /// replacing an earlier one for the source. The caller checked them
    /// with [`order_for_merge`].
    pub fn request(&self, source: &metapb::Region, target_id: u64) {
        let mut pending = self.pending.lock();
        pending.retain(|_, r| r.at.elapsed() < self.timeout);
        info!(source_id = source.id, target_id, "merge requested");
        pending.insert(
            source.id,
            Request {
                target_id,
                start_key: source.start_key.clone(),
                end_key: source.end_key.clone(),
                at: Instant::now(),
            },
        );
    }

    /// The merge to hand to the leader of `region`, which just reported its
    /// meta; `right` looks up the region's right neighbour in PD's map
    /// (asked only when the region has a request). Drops the region's
    /// request once expired, once the region's range changed, or once the
    /// requested target is no longer its right neighbour.
    pub fn on_heartbeat(
        &self,
        region: &metapb::Region,
        right: impl FnOnce() -> Option<metapb::Region>,
    ) -> Option<RegionOperator> {
        // `right` reads PD's state: not under the lock, which `pending`
        // takes after the state's.
        let (target_id, at, same_range) = {
            let pending = self.pending.lock();
            let r = pending.get(&region.id)?;
            (r.target_id, r.at, r.same_range(region))
        };
        if at.elapsed() >= self.timeout {
            info!(source_id = region.id, target_id, "merge request expired");
        } else if !same_range {
            debug!(
                source_id = region.id,
                target_id, "merge request settled: the source's range changed"
            );
        } else {
            match right() {
                Some(target) if target.id == target_id => {
                    return Some(RegionOperator::Merge { target });
                }
                _ => debug!(
                    source_id = region.id,
                    target_id, "merge request settled: the target is no longer the right neighbour"
                ),
            }
        }
        let mut pending = self.pending.lock();
        // Unless a new request replaced it meanwhile.
        if pending.get(&region.id).is_some_and(|r| r.at == at) {
            pending.remove(&region.id);
        }
        None
    }

    /// Whether a request not expired yet names region `id` as its source or
    /// its target. O(requests).
    pub fn involves(&self, id: u64) -> bool {
        self.pending.lock().iter().any(|(source, r)| {
            (*source == id || r.target_id == id) && r.at.elapsed() < self.timeout
        })
    }

    /// The requests still to be handed out, by source region id, with PD's
    /// current meta of their targets; drops those expired or settled (the
    /// source gone from `c` or its range changed, the target no longer its
    /// right neighbour). O(requests) tree look-ups.
    pub fn pending(&self, c: &ClusterState) -> Vec<PendingOperator> {
        let mut pending = self.pending.lock();
        let mut out = Vec::new();
        pending.retain(|source_id, r| {
            if r.at.elapsed() >= self.timeout {
                return false;
            }
            let Some(source) = c.entry_with_leader(*source_id) else {
                return false;
            };
            if !r.same_range(&source.region) {
                return false;
            }
            match right_neighbour(c, &source.region) {
                Some(target) if target.region.id == r.target_id => {
                    out.push(PendingOperator {
                        region_id: *source_id,
                        source: SOURCE_MERGE_REQUEST.to_owned(),
                        op: RegionOperator::Merge {
                            target: target.region,
                        },
                        age: r.at.elapsed(),
                    });
                    true
                }
                _ => false,
            }
        });
        out.sort_by_key(|o| o.region_id);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(id: u64, node_id: u64) -> metapb::Peer {
        metapb::Peer {
            id,
            node_id,
            role: metapb::PeerRole::Voter as i32,
        }
    }

    fn region(id: u64, start: &[u8], end: &[u8], nodes: &[u64]) -> metapb::Region {
        metapb::Region {
            id,
            start_key: start.to_vec(),
            end_key: end.to_vec(),
            region_epoch: Some(metapb::RegionEpoch {
                conf_ver: 1,
                version: 1,
            }),
            peers: nodes.iter().map(|n| peer(id * 10 + n, *n)).collect(),
        }
    }

    fn with_leader(r: metapb::Region) -> RegionWithLeader {
        RegionWithLeader::new(r)
    }

    fn ids(
        r: Result<(RegionWithLeader, RegionWithLeader)>,
    ) -> std::result::Result<(u64, u64), String> {
        r.map(|(s, t)| (s.region.id, t.region.id))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn ordered_left_into_right_whatever_the_order_given() {
        let left = region(1, b"a", b"m", &[1, 2, 3]);
        let right = region(2, b"m", b"", &[3, 2, 1]);
        assert_eq!(
            ids(order_for_merge(
                with_leader(left.clone()),
                with_leader(right.clone())
            )),
            Ok((1, 2))
        );
        assert_eq!(
            ids(order_for_merge(with_leader(right), with_leader(left))),
            Ok((1, 2))
        );
    }

    #[test]
    fn not_adjacent_or_not_colocated_is_refused() {
        let a = region(1, b"", b"g", &[1, 2]);
        let c = region(3, b"p", b"", &[1, 2]);
        assert_eq!(
            ids(order_for_merge(
                with_leader(a.clone()),
                with_leader(c.clone())
            )),
            Err("invalid argument: regions 1 and 3 are not adjacent".into())
        );
        assert_eq!(
            ids(order_for_merge(with_leader(c), with_leader(a.clone()))),
            Err("invalid argument: regions 3 and 1 are not adjacent".into())
        );
        // Both reach the end of the keyspace: empty keys are not adjacent.
        let whole_end = region(4, b"g", b"", &[1, 2]);
        let other_end = region(5, b"", b"", &[1, 2]);
        assert!(ids(order_for_merge(
            with_leader(whole_end),
            with_leader(other_end)
        ))
        .is_err());

        let b = region(2, b"g", b"p", &[1, 3]);
        let e = ids(order_for_merge(with_leader(b), with_leader(a))).unwrap_err();
        assert!(
            e.starts_with(
                "invalid argument: the replicas of regions 1 and 2 are not on the same nodes; \
                 region 1 is on nodes [1, 2], region 2 on nodes [1, 3]"
            ),
            "{e}"
        );
        // One replica more is not the same set either.
        assert!(!same_nodes(
            &region(1, b"", b"g", &[1, 2]),
            &region(2, b"g", b"", &[1, 2, 3])
        ));
    }

    fn state(regions: &[metapb::Region]) -> ClusterState {
        let mut c = ClusterState::default();
        for r in regions {
            c.insert_region(r.clone(), Default::default());
        }
        c
    }

    #[test]
    fn handed_out_with_the_current_target_until_settled() {
        let m = MergeRequests::new(Duration::from_secs(60));
        let source = region(1, b"", b"g", &[1, 2]);
        let target = region(2, b"g", b"", &[1, 2]);
        m.request(&source, 2);
        assert!(m.involves(1) && m.involves(2) && !m.involves(3));
        let merge = |t: &metapb::Region| Some(RegionOperator::Merge { target: t.clone() });
        // Not for the target, nor for another region.
        assert_eq!(m.on_heartbeat(&target, || None), None);
        assert_eq!(m.on_heartbeat(&region(3, b"x", b"", &[1]), || None), None);
        // The target's meta as PD knows it now.
        let mut newer = target.clone();
        newer.region_epoch = Some(metapb::RegionEpoch {
            conf_ver: 2,
            version: 1,
        });
        assert_eq!(
            m.on_heartbeat(&source, || Some(newer.clone())),
            merge(&newer)
        );
        let c = state(&[source.clone(), newer.clone()]);
        let listed = m.pending(&c);
        assert_eq!(listed.len(), 1);
        assert_eq!(
            (
                listed[0].region_id,
                listed[0].source.as_str(),
                &listed[0].op
            ),
            (1, SOURCE_MERGE_REQUEST, &merge(&newer).unwrap())
        );
        // Another region is the right neighbour now (the target was merged
        // into its own right neighbour, which starts at g now): dropped.
        assert_eq!(
            m.on_heartbeat(&source, || Some(region(7, b"g", b"k", &[1, 2]))),
            None
        );
        assert!(!m.involves(1));
        assert!(m.pending(&c).is_empty());
    }

    #[test]
    fn dropped_when_the_source_changed_or_went_or_expired() {
        let m = MergeRequests::new(Duration::from_secs(60));
        let source = region(1, b"", b"g", &[1, 2]);
        let target = region(2, b"g", b"", &[1, 2]);
        m.request(&source, 2);
        // The source split: its range changed.
        let shrunk = region(1, b"", b"c", &[1, 2]);
        assert_eq!(m.on_heartbeat(&shrunk, || Some(target.clone())), None);
        assert!(!m.involves(1));

        // Merged: the source is gone from PD's map.
        m.request(&source, 2);
        let merged = region(2, b"", b"", &[1, 2]);
        assert!(m.pending(&state(&[merged])).is_empty());
        assert!(!m.involves(1));

        let m = MergeRequests::new(Duration::ZERO);
        m.request(&source, 2);
        assert!(!m.involves(1));
        assert_eq!(m.on_heartbeat(&source, || Some(target.clone())), None);
        m.request(&source, 2);
        assert!(m
            .pending(&state(&[source.clone(), target.clone()]))
            .is_empty());
    }

    #[test]
    fn right_neighbour_is_the_region_starting_at_the_end_key() {
        let a = region(1, b"", b"g", &[1]);
        let b = region(2, b"g", b"p", &[1]);
        let c = state(&[a.clone(), b.clone()]);
        assert_eq!(right_neighbour(&c, &a).map(|r| r.region.id), Some(2));
        // [p, ) is a hole: PD has not heard of it.
        assert_eq!(right_neighbour(&c, &b), None);
        let whole = region(3, b"", b"", &[1]);
        assert_eq!(right_neighbour(&c, &whole), None);
        // A region containing the end key but starting before it is not
        // adjacent.
        let inner = region(4, b"", b"c", &[1]);
        assert_eq!(right_neighbour(&c, &inner), None);
    }
}
