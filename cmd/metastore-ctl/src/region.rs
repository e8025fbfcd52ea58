//! `region list|show|split|merge`: regions as PD knows them, and a split or
//! a merge asked of PD (which hands it to the region's leader, the source
//! region's for a merge, with a heartbeat response).

use std::time::{Duration, Instant};

use pd::{PdClient, RegionWithLeader};
use proto::metapb;
use serde::Serialize;

use crate::error::{CtlError, Result};
use crate::output::{json, Output};
use crate::table::Table;

/// How often `region split` asks PD whether the split happened.
const SPLIT_POLL: Duration = Duration::from_millis(200);

#[derive(Serialize, Debug, PartialEq)]
pub struct RegionsJson {
    pub count: usize,
    pub regions: Vec<RegionJson>,
}

/// What `region merge -w json` prints: the request and both regions,
/// source first.
#[derive(Serialize, Debug, PartialEq)]
pub struct MergeJson {
    pub source_id: u64,
    pub target_id: u64,
    pub message: String,
    pub count: usize,
    pub regions: Vec<RegionJson>,
}

#[derive(Serialize, Debug, PartialEq)]
pub struct RegionJson {
    pub id: u64,
    pub start_key: String,
    pub end_key: String,
    pub epoch: EpochJson,
    pub peers: Vec<PeerJson>,
    pub leader: Option<LeaderJson>,
    pub approximate_size: u64,
    pub approximate_keys: u64,
}

#[derive(Serialize, Debug, PartialEq)]
pub struct EpochJson {
    pub conf_ver: u64,
    pub version: u64,
}

#[derive(Serialize, Debug, PartialEq)]
pub struct PeerJson {
    pub id: u64,
    pub node_id: u64,
    pub role: &'static str,
}

#[derive(Serialize, Debug, PartialEq)]
pub struct LeaderJson {
    pub id: u64,
    pub node_id: u64,
}

pub fn role_name(role: metapb::PeerRole) -> &'static str {
    match role {
        metapb::PeerRole::Voter => "voter",
        metapb::PeerRole::Learner => "learner",
        metapb::PeerRole::IncomingVoter => "incoming-voter",
        metapb::PeerRole::DemotingVoter => "demoting-voter",
    }
}

fn region_json(r: &RegionWithLeader, out: &Output) -> RegionJson {
    let epoch = r.region.region_epoch.unwrap_or_default();
    RegionJson {
        id: r.region.id,
        start_key: out.key(&r.region.start_key),
        end_key: out.key(&r.region.end_key),
        epoch: EpochJson {
            conf_ver: epoch.conf_ver,
            version: epoch.version,
        },
        peers: r
            .region
            .peers
            .iter()
            .map(|p| PeerJson {
                id: p.id,
                node_id: p.node_id,
                role: role_name(p.role()),
            })
            .collect(),
        leader: r.leader.map(|l| LeaderJson {
            id: l.id,
            node_id: l.node_id,
        }),
        approximate_size: r.approximate_size,
        approximate_keys: r.approximate_keys,
    }
}

/// Regions as a JSON object `{"count", "regions"}` or a table.
pub fn render(regions: &[RegionWithLeader], out: &Output) -> Result<String> {
    if out.is_json() {
        return json(&RegionsJson {
            count: regions.len(),
            regions: regions.iter().map(|r| region_json(r, out)).collect(),
        });
    }
    let mut t = Table::new(&[
        "ID",
        "START_KEY",
        "END_KEY",
        "CONF_VER/VERSION",
        "PEERS",
        "LEADER",
        "APPROX_SIZE",
        "APPROX_KEYS",
    ]);
    for r in regions {
        let epoch = r.region.region_epoch.unwrap_or_default();
        let peers: Vec<String> = r
            .region
            .peers
            .iter()
            .map(|p| format!("{}@{}({})", p.id, p.node_id, role_name(p.role())))
            .collect();
        t.push(vec![
            r.region.id.to_string(),
            out.key_cell(&r.region.start_key),
            out.key_cell(&r.region.end_key),
            format!("{}/{}", epoch.conf_ver, epoch.version),
            peers.join(" "),
            r.leader
                .map_or_else(|| "-".to_owned(), |l| format!("{}@{}", l.id, l.node_id)),
            r.approximate_size.to_string(),
            r.approximate_keys.to_string(),
        ]);
    }
    Ok(t.render())
}

/// Every region, in key order.
pub async fn list(pd: &dyn PdClient) -> Result<Vec<RegionWithLeader>> {
    Ok(pd.scan_regions(&[], &[], 0).await?)
}

/// The region containing `key`.
pub async fn show(pd: &dyn PdClient, key: &[u8], out: &Output) -> Result<RegionWithLeader> {
    pd.get_region(key).await?.ok_or_else(|| {
        CtlError::Failed(format!(
            "no region contains key {:?} (PD may not have heard from it yet)",
            out.key(key)
        ))
    })
}

/// Asks PD to split the region containing `key` at `key`, then waits until
/// PD reports a region starting at `key` and its left neighbour; returns
/// both, left first.
pub async fn split(
    pd: &dyn PdClient,
    key: &[u8],
    timeout: Duration,
    out: &Output,
) -> Result<Vec<RegionWithLeader>> {
    let asked = pd.split_region(key).await?;
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(done) = split_result(pd, &asked.region, key).await? {
            return Ok(done);
        }
        if Instant::now() >= deadline {
            return Err(CtlError::Failed(format!(
                "region {} was not split at {:?} within {}s (PD hands the split to the \
                 region's leader with its next heartbeat response and keeps asking for a \
                 while; see `metastore-ctl scheduler`)",
                asked.region.id,
                out.key(key),
                timeout.as_secs_f64()
            )));
        }
        tokio::time::sleep(SPLIT_POLL).await;
    }
}

/// The two regions on either side of `key` once PD knows both: the right
/// one starting at `key`, the left one ending there.
async fn split_result(
    pd: &dyn PdClient,
    before: &metapb::Region,
    key: &[u8],
) -> Result<Option<Vec<RegionWithLeader>>> {
    let Some(right) = pd.get_region(key).await? else {
        return Ok(None);
    };
    if right.region.start_key != key {
        return Ok(None);
    }
    let left = pd
        .scan_regions(&before.start_key, key, 0)
        .await?
        .into_iter()
        .rev()
        .find(|r| r.region.end_key == key);
    Ok(left.map(|left| vec![left, right]))
}

/// Asks PD to merge regions `first` and `second`, which must be adjacent
/// and on the same nodes; returns them as PD ordered them, (source, target):
/// the left one merges into the right one.
pub async fn merge(
    pd: &dyn PdClient,
    first: u64,
    second: u64,
) -> Result<(RegionWithLeader, RegionWithLeader)> {
    Ok(pd.merge_regions(first, second).await?)
}

/// The sentence saying what was asked of whom.
fn merge_message(source: &RegionWithLeader, target: &RegionWithLeader) -> String {
    format!(
        "merge requested: region {} (source) into region {} (target); the source region's \
         leader carries it out when PD hands it the request with a heartbeat answer (see \
         `metastore-ctl scheduler`)",
        source.region.id, target.region.id
    )
}

/// A requested merge: the message, then both regions (source first) as a
/// table, or one JSON object [`MergeJson`].
pub fn render_merge(
    source: &RegionWithLeader,
    target: &RegionWithLeader,
    out: &Output,
) -> Result<String> {
    let message = merge_message(source, target);
    if out.is_json() {
        return json(&MergeJson {
            source_id: source.region.id,
            target_id: target.region.id,
            message,
            count: 2,
            regions: vec![region_json(source, out), region_json(target, out)],
        });
    }
    let table = render(&[source.clone(), target.clone()], out)?;
    Ok(format!("{message}\n\n{table}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::Format;

    fn peer(id: u64, node_id: u64, role: metapb::PeerRole) -> metapb::Peer {
        metapb::Peer {
            id,
            node_id,
            role: role as i32,
        }
    }

    fn region(
        id: u64,
        range: (&[u8], &[u8]),
        epoch: (u64, u64),
        peers: Vec<metapb::Peer>,
    ) -> metapb::Region {
        metapb::Region {
            id,
            start_key: range.0.to_vec(),
            end_key: range.1.to_vec(),
            region_epoch: Some(metapb::RegionEpoch {
                conf_ver: epoch.0,
                version: epoch.1,
            }),
            peers,
        }
    }

    fn sample() -> Vec<RegionWithLeader> {
        let voter = metapb::PeerRole::Voter;
        let left = region(
            2,
            (b"", b"m\x00"),
            (3, 2),
            vec![peer(21, 1, voter), peer(22, 2, metapb::PeerRole::Learner)],
        );
        let right = region(7, (b"m\x00", b""), (1, 2), vec![peer(71, 1, voter)]);
        vec![
            RegionWithLeader {
                region: left.clone(),
                leader: Some(left.peers[0]),
                approximate_size: 4096,
                approximate_keys: 10,
            },
            RegionWithLeader::new(right),
        ]
    }

    #[test]
    fn json_shape() {
        let out = Output::new(Format::Json, false);
        let text = render(&sample(), &out).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let want = serde_json::json!({
            "count": 2,
            "regions": [
                {
                    "id": 2, "start_key": "", "end_key": "0x6d00",
                    "epoch": {"conf_ver": 3, "version": 2},
                    "peers": [
                        {"id": 21, "node_id": 1, "role": "voter"},
                        {"id": 22, "node_id": 2, "role": "learner"}
                    ],
                    "leader": {"id": 21, "node_id": 1},
                    "approximate_size": 4096, "approximate_keys": 10
                },
                {
                    "id": 7, "start_key": "0x6d00", "end_key": "",
                    "epoch": {"conf_ver": 1, "version": 2},
                    "peers": [{"id": 71, "node_id": 1, "role": "voter"}],
                    "leader": null,
                    "approximate_size": 0, "approximate_keys": 0
                }
            ]
        });
        assert_eq!(v, want);
    }

    #[test]
    fn table_shape() {
        let out = Output::new(Format::Table, false);
        assert_eq!(
            render(&sample(), &out).unwrap(),
            "ID  START_KEY  END_KEY  CONF_VER/VERSION  PEERS                      LEADER  APPROX_SIZE  APPROX_KEYS\n\
             2   \"\"         0x6d00   3/2               21@1(voter) 22@2(learner)  21@1    4096         10\n\
             7   0x6d00     \"\"       1/2               71@1(voter)                -       0            0\n"
        );
    }

    /// A bootstrapped single-member PD with one region over the whole
    /// keyspace on node 1, and that region.
    async fn local_pd(dir: &std::path::Path) -> (pd::LocalPdClient, metapb::Region) {
        let core = pd::PdCore::open(pd::PdConfig::new(dir)).unwrap();
        let region = region(
            2,
            (b"", b""),
            (1, 1),
            vec![peer(3, 1, metapb::PeerRole::Voter)],
        );
        let node = metapb::Node {
            id: 1,
            ..Default::default()
        };
        core.bootstrap(node, region.clone()).await.unwrap();
        (pd::LocalPdClient::new(core), region)
    }

    fn hb(region: &metapb::Region) -> pd::RegionHeartbeat {
        pd::RegionHeartbeat {
            region: region.clone(),
            leader: region.peers[0],
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn split_waits_until_pd_knows_both_sides() {
        let dir = tempfile::tempdir().unwrap();
        let (pd, whole) = local_pd(dir.path()).await;
        let out = Output::new(Format::Json, false);
        // The region's leader, as a node would act on PD's answer.
        let leader = pd.clone();
        let node = tokio::spawn(async move {
            loop {
                let op = leader.region_heartbeat(hb(&whole)).await.unwrap();
                if let Some(pd::RegionOperator::Split { key }) = op {
                    let left = region(2, (b"", &key), (1, 2), whole.peers.clone());
                    let right = region(
                        9,
                        (&key, b""),
                        (1, 2),
                        vec![peer(10, 1, metapb::PeerRole::Voter)],
                    );
                    leader.region_heartbeat(hb(&right)).await.unwrap();
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    leader.region_heartbeat(hb(&left)).await.unwrap();
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        let regions = split(&pd, b"k", Duration::from_secs(20), &out)
            .await
            .unwrap();
        node.await.unwrap();
        let ranges: Vec<(u64, &[u8], &[u8])> = regions
            .iter()
            .map(|r| (r.region.id, &r.region.start_key[..], &r.region.end_key[..]))
            .collect();
        assert_eq!(ranges, vec![(2, &b""[..], &b"k"[..]), (9, b"k", b"")]);
    }

    #[tokio::test]
    async fn split_times_out_when_the_region_does_not_split() {
        let dir = tempfile::tempdir().unwrap();
        let (pd, _) = local_pd(dir.path()).await;
        let out = Output::new(Format::Table, false);
        let e = split(&pd, b"k", Duration::from_millis(300), &out)
            .await
            .unwrap_err();
        assert_eq!(e.exit_code(), 1);
        assert!(
            e.to_string()
                .starts_with("region 2 was not split at \"k\" within 0.3s"),
            "{e}"
        );
        let e = split(&pd, b"", Duration::from_millis(300), &out)
            .await
            .unwrap_err();
        assert_eq!(e.exit_code(), 2, "{e}");
    }

    /// Regions 2 [, k) and 9 [k, ) on node 1, as after a split at k.
    async fn split_at_k(pd: &pd::LocalPdClient, whole: &metapb::Region) {
        let left = region(2, (b"", b"k"), (1, 2), whole.peers.clone());
        let right = region(
            9,
            (b"k", b""),
            (1, 2),
            vec![peer(10, 1, metapb::PeerRole::Voter)],
        );
        pd.region_heartbeat(hb(&right)).await.unwrap();
        pd.region_heartbeat(hb(&left)).await.unwrap();
    }

    #[tokio::test]
    async fn merge_is_recorded_left_into_right_and_rendered() {
        let dir = tempfile::tempdir().unwrap();
        let (pd, whole) = local_pd(dir.path()).await;
        split_at_k(&pd, &whole).await;
        // Given right first: PD swaps them.
        let (source, target) = merge(&pd, 9, 2).await.unwrap();
        assert_eq!((source.region.id, target.region.id), (2, 9));

        let text = render_merge(&source, &target, &Output::new(Format::Table, false)).unwrap();
        assert!(
            text.starts_with(
                "merge requested: region 2 (source) into region 9 (target); the source \
                 region's leader carries it out"
            ),
            "{text}"
        );
        assert!(text.contains("\n\nID  START_KEY"), "{text}");
        let v: serde_json::Value = serde_json::from_str(
            &render_merge(&source, &target, &Output::new(Format::Json, false)).unwrap(),
        )
        .unwrap();
        assert_eq!(
            (&v["source_id"], &v["target_id"], &v["count"]),
            (&2.into(), &9.into(), &2.into())
        );
        assert_eq!(v["regions"][0]["end_key"], "k");
        assert_eq!(v["regions"][1]["start_key"], "k");
        assert!(v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("merge requested")));
    }

    #[tokio::test]
    async fn merge_errors_have_their_exit_codes() {
        let dir = tempfile::tempdir().unwrap();
        let (pd, whole) = local_pd(dir.path()).await;
        let e = merge(&pd, 2, 2).await.unwrap_err();
        assert_eq!(e.exit_code(), 2, "{e}");
        let e = merge(&pd, 2, 99).await.unwrap_err();
        assert_eq!(e.exit_code(), 1, "{e}");
        assert!(e.to_string().contains("region 99 not found"), "{e}");
        split_at_k(&pd, &whole).await;
        // Region 11 [x, ) is newer than 9 [k, ) and replaces it: a hole
        // [k, x) between 2 and 11.
        let far = region(
            11,
            (b"x", b""),
            (1, 3),
            vec![peer(12, 1, metapb::PeerRole::Voter)],
        );
        pd.region_heartbeat(hb(&far)).await.unwrap();
        let e = merge(&pd, 2, 11).await.unwrap_err();
        assert_eq!(e.exit_code(), 2, "{e}");
        assert_eq!(
            e.to_string(),
            "invalid argument: regions 2 and 11 are not adjacent"
        );
    }
}
