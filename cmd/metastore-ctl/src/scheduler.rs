//! `scheduler`: which schedulers PD runs and what they do, their settings,
//! the merge checker's merges in flight (and the alignments before them:
//! a source's replicas moving onto its target's nodes), and the operators
//! PD is handing out to region leaders (requested splits and merges, and
//! the scheduling steps being repeated until applied).

use std::time::Duration;

use pd::{CheckerMerge, PendingOperator, RegionOperator, RpcPdClient, SchedulingStatus};
use serde::Serialize;

use crate::error::Result;
use crate::output::{json, Output};
use crate::table::Table;

#[derive(Serialize, Debug)]
struct StatusJson {
    schedulers: Vec<SchedulerJson>,
    settings: SettingsJson,
    merges_in_flight: MergesJson,
    operators: OperatorsJson,
}

#[derive(Serialize, Debug)]
struct MergesJson {
    count: usize,
    merges: Vec<MergeJson>,
}

#[derive(Serialize, Debug)]
struct MergeJson {
    source_region_id: u64,
    target_region_id: u64,
    /// `aligning` (moving the source's replicas onto the target's nodes)
    /// or `merging`.
    stage: &'static str,
    replica_moves: u64,
    age_ms: u128,
}

fn stage(m: &CheckerMerge) -> &'static str {
    if m.aligning {
        "aligning"
    } else {
        "merging"
    }
}

#[derive(Serialize, Debug)]
struct SchedulerJson {
    name: String,
    description: String,
}

#[derive(Serialize, Debug)]
struct SettingsJson {
    max_replicas: u64,
    max_node_down_time_ms: u128,
    operator_timeout_ms: u128,
    split_timeout_ms: u128,
    merge_timeout_ms: u128,
    max_merge_region_keys: u64,
    max_merge_region_size: u64,
    split_merge_interval_ms: u128,
    merge_limit: u64,
}

#[derive(Serialize, Debug)]
struct OperatorsJson {
    count: usize,
    operators: Vec<OperatorJson>,
}

#[derive(Serialize, Debug)]
struct OperatorJson {
    region_id: u64,
    source: String,
    kind: &'static str,
    description: String,
    age_ms: u128,
}

/// The operator's kind and a description of the step.
fn describe(op: &RegionOperator, out: &Output) -> (&'static str, String) {
    let (kind, step, p) = match op {
        RegionOperator::AddLearner(p) => ("add-learner", "add learner", p),
        RegionOperator::PromoteLearner(p) => ("promote-learner", "promote learner", p),
        RegionOperator::RemovePeer(p) => ("remove-peer", "remove", p),
        RegionOperator::TransferLeader(p) => ("transfer-leader", "transfer leadership to", p),
        RegionOperator::Split { key } => return ("split", format!("split at {:?}", out.key(key))),
        RegionOperator::Merge { target } => {
            return ("merge", format!("merge into region {}", target.id));
        }
    };
    (kind, format!("{step} peer {} on node {}", p.id, p.node_id))
}

/// `1800s`, `60s`, `1.5s`, `250ms`.
fn human(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{}ms", d.as_millis())
    } else if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

pub async fn status(pd: &RpcPdClient, out: &Output) -> Result<String> {
    let status = pd.get_schedulers().await?;
    let operators = pd.get_operators().await?;
    render(&status, &operators, out)
}

fn render(
    status: &SchedulingStatus,
    operators: &[PendingOperator],
    out: &Output,
) -> Result<String> {
    if out.is_json() {
        return json(&StatusJson {
            schedulers: status
                .schedulers
                .iter()
                .map(|s| SchedulerJson {
                    name: s.name.clone(),
                    description: s.description.clone(),
                })
                .collect(),
            settings: SettingsJson {
                max_replicas: status.max_replicas,
                max_node_down_time_ms: status.max_node_down_time.as_millis(),
                operator_timeout_ms: status.operator_timeout.as_millis(),
                split_timeout_ms: status.split_timeout.as_millis(),
                merge_timeout_ms: status.merge_timeout.as_millis(),
                max_merge_region_keys: status.max_merge_region_keys,
                max_merge_region_size: status.max_merge_region_size,
                split_merge_interval_ms: status.split_merge_interval.as_millis(),
                merge_limit: status.merge_limit,
            },
            merges_in_flight: MergesJson {
                count: status.merges_in_flight.len(),
                merges: status
                    .merges_in_flight
                    .iter()
                    .map(|m| MergeJson {
                        source_region_id: m.source_id,
                        target_region_id: m.target_id,
                        stage: stage(m),
                        replica_moves: m.replica_moves,
                        age_ms: m.age.as_millis(),
                    })
                    .collect(),
            },
            operators: OperatorsJson {
                count: operators.len(),
                operators: operators
                    .iter()
                    .map(|o| {
                        let (kind, description) = describe(&o.op, out);
                        OperatorJson {
                            region_id: o.region_id,
                            source: o.source.clone(),
                            kind,
                            description,
                            age_ms: o.age.as_millis(),
                        }
                    })
                    .collect(),
            },
        });
    }
    let mut schedulers = Table::new(&["SCHEDULER", "WHAT IT DOES"]);
    for s in &status.schedulers {
        schedulers.push(vec![s.name.clone(), s.description.clone()]);
    }
    let mut settings = Table::new(&["SETTING", "VALUE", "MEANING"]);
    for (name, value, meaning) in [
        (
            "max-replicas",
            status.max_replicas.to_string(),
            "voters per region, on distinct nodes",
        ),
        (
            "max-node-down-time",
            human(status.max_node_down_time),
            "how long a peer may be down before it is replaced",
        ),
        (
            "operator-timeout",
            human(status.operator_timeout),
            "how long a placement step is repeated before PD decides anew",
        ),
        (
            "split-timeout",
            human(status.split_timeout),
            "how long a requested split is handed out before PD forgets it",
        ),
        (
            "merge-timeout",
            human(status.merge_timeout),
            "how long a requested merge is handed out before PD forgets it",
        ),
        (
            "max-merge-region-keys",
            status.max_merge_region_keys.to_string(),
            "regions merge automatically only with at most this many keys (0: off)",
        ),
        (
            "max-merge-region-size",
            status.max_merge_region_size.to_string(),
            "... and at most this many bytes, each and together (0: off)",
        ),
        (
            "split-merge-interval",
            human(status.split_merge_interval),
            "... and neither split nor merged for this long",
        ),
        (
            "merge-limit",
            status.merge_limit.to_string(),
            "automatic merges (and alignments before them) in flight at most",
        ),
    ] {
        settings.push(vec![name.to_owned(), value, meaning.to_owned()]);
    }
    let mut text = schedulers.render();
    text.push('\n');
    text.push_str(&settings.render());
    text.push('\n');
    if status.merges_in_flight.is_empty() {
        text.push_str("no automatic merges in flight\n");
    } else {
        let mut merges = Table::new(&["MERGE SOURCE", "TARGET", "STAGE", "REPLICA MOVES", "AGE"]);
        for m in &status.merges_in_flight {
            merges.push(vec![
                m.source_id.to_string(),
                m.target_id.to_string(),
                stage(m).to_owned(),
                m.replica_moves.to_string(),
                human(m.age),
            ]);
        }
        text.push_str(&merges.render());
    }
    text.push('\n');
    if operators.is_empty() {
        text.push_str("no pending operators\n");
    } else {
        let mut ops = Table::new(&["REGION", "SOURCE", "OPERATOR", "AGE"]);
        for o in operators {
            ops.push(vec![
                o.region_id.to_string(),
                o.source.clone(),
                describe(&o.op, out).1,
                human(o.age),
            ]);
        }
        text.push_str(&ops.render());
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::Format;
    use proto::metapb;

    fn sample() -> (SchedulingStatus, Vec<PendingOperator>) {
        let status = SchedulingStatus {
            merges_in_flight: vec![
                CheckerMerge {
                    source_id: 4,
                    target_id: 9,
                    aligning: true,
                    replica_moves: 2,
                    age: Duration::from_millis(2500),
                },
                CheckerMerge {
                    source_id: 11,
                    target_id: 12,
                    aligning: false,
                    replica_moves: 0,
                    age: Duration::from_millis(40),
                },
            ],
            ..SchedulingStatus::of(&pd::schedule::ScheduleConfig::default())
        };
        let peer = metapb::Peer {
            id: 12,
            node_id: 3,
            role: metapb::PeerRole::Learner as i32,
        };
        let ops = vec![
            PendingOperator {
                region_id: 2,
                source: pd::operators::SOURCE_SPLIT_REQUEST.to_owned(),
                op: RegionOperator::Split {
                    key: b"foo".to_vec(),
                },
                age: Duration::from_millis(1500),
            },
            PendingOperator {
                region_id: 5,
                source: pd::operators::SOURCE_PLACEMENT.to_owned(),
                op: RegionOperator::AddLearner(peer),
                age: Duration::from_millis(20),
            },
            PendingOperator {
                region_id: 6,
                source: pd::operators::SOURCE_MERGE_REQUEST.to_owned(),
                op: RegionOperator::Merge {
                    target: metapb::Region {
                        id: 8,
                        ..Default::default()
                    },
                },
                age: Duration::from_millis(100),
            },
        ];
        (status, ops)
    }

    #[test]
    fn json_lists_schedulers_settings_and_operators() {
        let (status, ops) = sample();
        let out = Output::new(Format::Json, false);
        let v: serde_json::Value =
            serde_json::from_str(&render(&status, &ops, &out).unwrap()).unwrap();
        assert_eq!(v["schedulers"][0]["name"], "replica-placement");
        assert_eq!(v["settings"]["max_replicas"], 3);
        assert_eq!(v["settings"]["split_timeout_ms"], 60_000);
        assert_eq!(v["settings"]["max_merge_region_keys"], 200_000);
        assert_eq!(v["settings"]["split_merge_interval_ms"], 600_000);
        assert_eq!(v["merges_in_flight"]["count"], 2);
        assert_eq!(
            v["merges_in_flight"]["merges"][0],
            serde_json::json!({
                "source_region_id": 4, "target_region_id": 9, "stage": "aligning",
                "replica_moves": 2, "age_ms": 2500
            })
        );
        assert_eq!(v["merges_in_flight"]["merges"][1]["stage"], "merging");
        assert_eq!(v["operators"]["count"], 3);
        assert_eq!(
            v["operators"]["operators"][0],
            serde_json::json!({
                "region_id": 2, "source": "split-request", "kind": "split",
                "description": "split at \"foo\"", "age_ms": 1500
            })
        );
        assert_eq!(
            v["operators"]["operators"][1]["description"],
            "add learner peer 12 on node 3"
        );
        assert_eq!(
            v["operators"]["operators"][2],
            serde_json::json!({
                "region_id": 6, "source": "merge-request", "kind": "merge",
                "description": "merge into region 8", "age_ms": 100
            })
        );
    }

    #[test]
    fn table_has_four_sections() {
        let (status, ops) = sample();
        let out = Output::new(Format::Table, true);
        let text = render(&status, &ops, &out).unwrap();
        assert!(text.starts_with("SCHEDULER          WHAT IT DOES\nreplica-placement  keeps"));
        assert!(
            text.contains("\nmax-replicas           3         voters per region"),
            "{text}"
        );
        assert!(text.contains("\nsplit-timeout          60s"), "{text}");
        assert!(
            text.contains("\nmax-merge-region-size  20971520  ... and at most"),
            "{text}"
        );
        assert!(
            text.contains("\n2       split-request      split at \"0x666f6f\"            1.5s\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "\nMERGE SOURCE  TARGET  STAGE     REPLICA MOVES  AGE\n\
                 4             9       aligning  2              2.5s\n\
                 11            12      merging   0              40ms\n\n"
            ),
            "{text}"
        );
        let idle = SchedulingStatus {
            merges_in_flight: Vec::new(),
            ..status
        };
        let text = render(&idle, &[], &out).unwrap();
        assert!(
            text.ends_with("\n\nno automatic merges in flight\n\nno pending operators\n"),
            "{text}"
        );
    }

    #[test]
    fn durations_for_humans() {
        assert_eq!(human(Duration::from_secs(1800)), "1800s");
        assert_eq!(human(Duration::from_millis(1500)), "1.5s");
        assert_eq!(human(Duration::from_millis(20)), "20ms");
    }
}
