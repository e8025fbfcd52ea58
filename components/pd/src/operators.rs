//! What PD tells operators' tools (`metastore-ctl`) about its scheduling:
//! the operators it is handing out to region leaders and the schedulers it
//! runs with their settings, and the wire forms of both (`GetOperators`,
//! `GetSchedulers`).

use std::time::Duration;

use proto::pdpb;

use crate::client::{OperatorFields, RegionOperator};
use crate::schedule::{self, ScheduleConfig};

/// [`PendingOperator::source`] of a replica placement step
/// ([`crate::schedule`]).
pub const SOURCE_PLACEMENT: &str = schedule::SCHEDULER_NAME;
/// [`PendingOperator::source`] of a leader transfer for leader balance.
pub const SOURCE_LEADER_BALANCE: &str = schedule::LEADER_BALANCE;
/// [`PendingOperator::source`] of the steps of a replica move for region
/// balance (the learner, its promotion, the source replica's removal).
pub const SOURCE_REGION_BALANCE: &str = schedule::REGION_BALANCE;
/// [`PendingOperator::source`] of a split asked for with
/// [`crate::PdClient::split_region`].
pub const SOURCE_SPLIT_REQUEST: &str = "split-request";
/// [`PendingOperator::source`] of a merge asked for with
/// [`crate::PdClient::merge_regions`].
pub const SOURCE_MERGE_REQUEST: &str = "merge-request";
/// [`PendingOperator::source`] of a merge decided by the merge checker
/// ([`crate::schedule`]).
pub const SOURCE_MERGE_CHECKER: &str = schedule::MERGE_CHECKER;

/// An operator PD hands to a region's leader with each heartbeat response
/// until the region applied it or it expired.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingOperator {
    pub region_id: u64,
    /// What issued it: [`SOURCE_PLACEMENT`], [`SOURCE_LEADER_BALANCE`],
    /// [`SOURCE_REGION_BALANCE`], [`SOURCE_SPLIT_REQUEST`],
    /// [`SOURCE_MERGE_REQUEST`] or [`SOURCE_MERGE_CHECKER`] (a newer PD may
    /// name others).
    pub source: String,
    pub op: RegionOperator,
    /// Since it was issued or requested.
    pub age: Duration,
}

impl PendingOperator {
    pub fn to_proto(&self) -> pdpb::Operator {
        let f = OperatorFields::from_operator(&self.op);
        pdpb::Operator {
            region_id: self.region_id,
            source: self.source.clone(),
            change_peer: f.change_peer,
            transfer_leader: f.transfer_leader,
            split_region: f.split_region,
            age_ms: millis(self.age),
            merge_region: f.merge_region,
        }
    }

    /// `None` for an operator this client does not understand.
    pub fn from_proto(o: pdpb::Operator) -> Option<Self> {
        let op = OperatorFields {
            change_peer: o.change_peer,
            transfer_leader: o.transfer_leader,
            split_region: o.split_region,
            merge_region: o.merge_region,
        }
        .into_operator()?;
        Some(PendingOperator {
            region_id: o.region_id,
            source: o.source,
            op,
            age: Duration::from_millis(o.age_ms),
        })
    }
}

/// A scheduler PD runs on every region heartbeat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchedulerInfo {
    pub name: String,
    /// What it does, in one sentence.
    pub description: String,
}

/// A merge the merge checker started, or the alignment before it (the
/// source's replicas being moved onto the target's nodes, one at a time).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckerMerge {
    pub source_id: u64,
    pub target_id: u64,
    /// Still moving replicas; `false` once merging.
    pub aligning: bool,
    /// Replica moves the alignment started so far (0: the regions were on
    /// the same nodes already).
    pub replica_moves: u64,
    /// Since the merge, or the alignment's latest replica move, started.
    pub age: Duration,
}

impl CheckerMerge {
    pub fn to_proto(&self) -> pdpb::CheckerMerge {
        pdpb::CheckerMerge {
            source_region_id: self.source_id,
            target_region_id: self.target_id,
            aligning: self.aligning,
            replica_moves: self.replica_moves,
            age_ms: millis(self.age),
        }
    }

    pub fn from_proto(m: pdpb::CheckerMerge) -> Self {
        CheckerMerge {
            source_id: m.source_region_id,
            target_id: m.target_region_id,
            aligning: m.aligning,
            replica_moves: m.replica_moves,
            age: Duration::from_millis(m.age_ms),
        }
    }
}

/// PD's schedulers and their settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchedulingStatus {
    pub schedulers: Vec<SchedulerInfo>,
    /// Voters every region is given, on distinct nodes.
    pub max_replicas: u64,
    /// How long a peer may be down before it is replaced.
    pub max_node_down_time: Duration,
    /// How long a placement step is repeated before PD decides anew.
    pub operator_timeout: Duration,
    /// How long a requested split waits to be carried out.
    pub split_timeout: Duration,
    /// How long a requested merge waits to be carried out.
    pub merge_timeout: Duration,
    /// The merge checker's size limits (each region and both together; 0
    /// turns it off).
    pub max_merge_region_keys: u64,
    pub max_merge_region_size: u64,
    /// How long both regions' versions must have stayed put.
    pub split_merge_interval: Duration,
    /// Merges (and alignments) the merge checker keeps in flight at most.
    pub merge_limit: u64,
    /// The merge checker's merges and alignments in flight, by source id
    /// (empty from [`Self::of`]).
    pub merges_in_flight: Vec<CheckerMerge>,
}

impl SchedulingStatus {
    /// The status of a PD scheduling with `config`.
    pub fn of(config: &ScheduleConfig) -> Self {
        SchedulingStatus {
            schedulers: schedule::schedulers(config)
                .into_iter()
                .map(|(name, description)| SchedulerInfo {
                    name: name.to_owned(),
                    description,
                })
                .collect(),
            max_replicas: config.max_replicas as u64,
            max_node_down_time: config.max_node_down_time,
            operator_timeout: config.operator_timeout,
            split_timeout: config.split_timeout,
            merge_timeout: config.merge_timeout,
            max_merge_region_keys: config.max_merge_region_keys,
            max_merge_region_size: config.max_merge_region_size,
            split_merge_interval: config.split_merge_interval,
            merge_limit: config.merge_limit as u64,
            merges_in_flight: Vec::new(),
        }
    }

    /// Fills the fields of a GetSchedulers response but its header.
    pub fn to_proto(&self, header: Option<pdpb::ResponseHeader>) -> pdpb::GetSchedulersResponse {
        pdpb::GetSchedulersResponse {
            header,
            schedulers: self
                .schedulers
                .iter()
                .map(|s| pdpb::Scheduler {
                    name: s.name.clone(),
                    description: s.description.clone(),
                })
                .collect(),
            max_replicas: self.max_replicas,
            max_node_down_time_ms: millis(self.max_node_down_time),
            operator_timeout_ms: millis(self.operator_timeout),
            split_timeout_ms: millis(self.split_timeout),
            merge_timeout_ms: millis(self.merge_timeout),
            max_merge_region_keys: self.max_merge_region_keys,
            max_merge_region_size: self.max_merge_region_size,
            split_merge_interval_ms: millis(self.split_merge_interval),
            merge_limit: self.merge_limit,
            merges_in_flight: self
                .merges_in_flight
                .iter()
                .map(CheckerMerge::to_proto)
                .collect(),
        }
    }

    pub fn from_proto(r: pdpb::GetSchedulersResponse) -> Self {
        SchedulingStatus {
            schedulers: r
                .schedulers
                .into_iter()
                .map(|s| SchedulerInfo {
                    name: s.name,
                    description: s.description,
                })
                .collect(),
            max_replicas: r.max_replicas,
            max_node_down_time: Duration::from_millis(r.max_node_down_time_ms),
            operator_timeout: Duration::from_millis(r.operator_timeout_ms),
            split_timeout: Duration::from_millis(r.split_timeout_ms),
            merge_timeout: Duration::from_millis(r.merge_timeout_ms),
            max_merge_region_keys: r.max_merge_region_keys,
            max_merge_region_size: r.max_merge_region_size,
            split_merge_interval: Duration::from_millis(r.split_merge_interval_ms),
            merge_limit: r.merge_limit,
            merges_in_flight: r
                .merges_in_flight
                .into_iter()
                .map(CheckerMerge::from_proto)
                .collect(),
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::metapb;

    #[test]
    fn operators_round_trip_through_the_wire() {
        let peer = metapb::Peer {
            id: 7,
            node_id: 3,
            role: metapb::PeerRole::Learner as i32,
        };
        for op in [
            RegionOperator::AddLearner(peer),
            RegionOperator::PromoteLearner(peer),
            RegionOperator::RemovePeer(peer),
            RegionOperator::TransferLeader(peer),
            RegionOperator::Split {
                key: b"k\x00".to_vec(),
            },
            RegionOperator::Merge {
                target: metapb::Region {
                    id: 9,
                    start_key: b"m".to_vec(),
                    peers: vec![peer],
                    ..Default::default()
                },
            },
        ] {
            let p = PendingOperator {
                region_id: 5,
                source: SOURCE_SPLIT_REQUEST.to_owned(),
                op,
                age: Duration::from_millis(1500),
            };
            assert_eq!(PendingOperator::from_proto(p.to_proto()), Some(p));
        }
        // Nothing set: nothing understood.
        assert_eq!(PendingOperator::from_proto(pdpb::Operator::default()), None);
    }

    #[test]
    fn scheduling_status_round_trips() {
        let s = SchedulingStatus::of(&ScheduleConfig::default());
        assert_eq!(s.max_replicas, 3);
        let names: Vec<&str> = s.schedulers.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "replica-placement",
                "leader-balance",
                "region-balance",
                "merge-checker"
            ]
        );
        assert!(s.schedulers[1].description.contains("at most 4 in flight"));
        assert!(s.schedulers[3]
            .description
            .contains("at most 4 merges and alignments in flight"));
        assert_eq!(s.max_merge_region_size, 20 << 20);
        let off = SchedulingStatus::of(&ScheduleConfig {
            max_merge_region_keys: 0,
            ..Default::default()
        });
        assert!(off.schedulers[3].description.contains("disabled"));
        assert_eq!(SchedulingStatus::from_proto(s.to_proto(None)), s);
        let busy = SchedulingStatus {
            merges_in_flight: vec![
                CheckerMerge {
                    source_id: 4,
                    target_id: 9,
                    aligning: true,
                    replica_moves: 2,
                    age: Duration::from_millis(700),
                },
                CheckerMerge {
                    source_id: 6,
                    target_id: 7,
                    aligning: false,
                    replica_moves: 0,
                    age: Duration::from_millis(30),
                },
            ],
            ..s
        };
        assert_eq!(SchedulingStatus::from_proto(busy.to_proto(None)), busy);
    }
}
