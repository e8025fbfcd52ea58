//! `store list`: every node PD knows (tombstones included) with how many
//! regions and region leaders it holds, counted from one region scan.

use std::collections::HashMap;

use pd::{PdClient, RegionWithLeader};
use proto::metapb;
use serde::Serialize;

use crate::error::Result;
use crate::output::{json, Output};
use crate::table::Table;

#[derive(Serialize, Debug, PartialEq)]
pub struct StoresJson {
    pub count: usize,
    pub stores: Vec<StoreJson>,
}

#[derive(Serialize, Debug, PartialEq)]
pub struct StoreJson {
    pub id: u64,
    pub name: String,
    pub state: &'static str,
    pub peer_urls: Vec<String>,
    pub client_urls: Vec<String>,
    pub region_count: usize,
    pub leader_count: usize,
}

fn state_name(state: metapb::NodeState) -> &'static str {
    match state {
        metapb::NodeState::Up => "up",
        metapb::NodeState::Offline => "offline",
        metapb::NodeState::Tombstone => "tombstone",
    }
}

/// Every node with its counts, by node id.
pub fn stores(nodes: Vec<metapb::Node>, regions: &[RegionWithLeader]) -> Vec<StoreJson> {
    // node id -> (regions, leaders)
    let mut counts: HashMap<u64, (usize, usize)> = HashMap::new();
    for r in regions {
        let mut on: Vec<u64> = r.region.peers.iter().map(|p| p.node_id).collect();
        on.sort_unstable();
        on.dedup();
        for node_id in on {
            counts.entry(node_id).or_default().0 += 1;
        }
        if let Some(l) = r.leader {
            counts.entry(l.node_id).or_default().1 += 1;
        }
    }
    let mut out: Vec<StoreJson> = nodes
        .into_iter()
        .map(|n| {
            let (region_count, leader_count) = counts.get(&n.id).copied().unwrap_or_default();
            StoreJson {
                id: n.id,
                state: state_name(n.state()),
                name: n.name,
                peer_urls: n.peer_urls,
                client_urls: n.client_urls,
                region_count,
                leader_count,
            }
        })
        .collect();
    out.sort_by_key(|s| s.id);
    out
}

pub async fn list(pd: &dyn PdClient, out: &Output) -> Result<String> {
    let nodes = pd.get_all_nodes().await?;
    let regions = pd.scan_regions(&[], &[], 0).await?;
    render(stores(nodes, &regions), out)
}

fn render(stores: Vec<StoreJson>, out: &Output) -> Result<String> {
    if out.is_json() {
        return json(&StoresJson {
            count: stores.len(),
            stores,
        });
    }
    let mut t = Table::new(&[
        "ID",
        "NAME",
        "STATE",
        "PEER_URLS",
        "CLIENT_URLS",
        "REGIONS",
        "LEADERS",
    ]);
    for s in stores {
        t.push(vec![
            s.id.to_string(),
            s.name,
            s.state.to_owned(),
            s.peer_urls.join(","),
            s.client_urls.join(","),
            s.region_count.to_string(),
            s.leader_count.to_string(),
        ]);
    }
    Ok(t.render())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::Format;

    fn node(id: u64, state: metapb::NodeState) -> metapb::Node {
        metapb::Node {
            id,
            name: format!("n{id}"),
            peer_urls: vec![format!("http://127.0.0.1:{}", 2380 + id)],
            client_urls: vec![format!("http://127.0.0.1:{}", 2379 + id)],
            state: state as i32,
        }
    }

    fn region(id: u64, on: &[u64], leader_on: Option<u64>) -> RegionWithLeader {
        let peers: Vec<metapb::Peer> = on
            .iter()
            .map(|n| metapb::Peer {
                id: id * 10 + n,
                node_id: *n,
                role: 0,
            })
            .collect();
        let leader = leader_on.and_then(|n| peers.iter().find(|p| p.node_id == n).copied());
        RegionWithLeader {
            region: metapb::Region {
                id,
                peers,
                ..Default::default()
            },
            leader,
            ..Default::default()
        }
    }

    #[test]
    fn counts_regions_and_leaders_per_node() {
        let regions = [
            region(1, &[1, 2, 3], Some(1)),
            region(2, &[1, 2], Some(2)),
            region(3, &[1], None),
        ];
        let nodes = vec![
            node(3, metapb::NodeState::Offline),
            node(1, metapb::NodeState::Up),
            node(2, metapb::NodeState::Up),
            node(4, metapb::NodeState::Tombstone),
        ];
        let got: Vec<(u64, &str, usize, usize)> = stores(nodes, &regions)
            .iter()
            .map(|s| (s.id, s.state, s.region_count, s.leader_count))
            .collect();
        assert_eq!(
            got,
            vec![
                (1, "up", 3, 1),
                (2, "up", 2, 1),
                (3, "offline", 1, 0),
                (4, "tombstone", 0, 0)
            ]
        );
    }

    #[test]
    fn json_and_table() {
        let s = stores(
            vec![node(1, metapb::NodeState::Up)],
            &[region(1, &[1], Some(1))],
        );
        let json_out = Output::new(Format::Json, false);
        let v: serde_json::Value = serde_json::from_str(&render(s, &json_out).unwrap()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"count": 1, "stores": [{
                "id": 1, "name": "n1", "state": "up",
                "peer_urls": ["http://127.0.0.1:2381"],
                "client_urls": ["http://127.0.0.1:2380"],
                "region_count": 1, "leader_count": 1
            }]})
        );
        let table_out = Output::new(Format::Table, false);
        let s = stores(vec![node(1, metapb::NodeState::Up)], &[]);
        assert_eq!(
            render(s, &table_out).unwrap(),
            "ID  NAME  STATE  PEER_URLS              CLIENT_URLS            REGIONS  LEADERS\n\
             1   n1    up     http://127.0.0.1:2381  http://127.0.0.1:2380  0        0\n"
        );
    }
}
