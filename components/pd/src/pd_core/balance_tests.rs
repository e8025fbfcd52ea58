//! Balance through a single-member [`PdCore`]: heartbeats keep the node
//! load counters the scheduler reads right, leader balance answers a
//! transfer, and a reopened PD counts replicas from its stored regions.

use std::path::Path;
use std::sync::Arc;

use proto::metapb;

use super::tests::{leader_of, node, region, split_three};
use super::{PdConfig, PdCore};
use crate::client::{RegionHeartbeat, RegionOperator};
use crate::load::NodeLoad;
use crate::operators::SOURCE_LEADER_BALANCE;
use crate::schedule::{ClusterView, ScheduleConfig};

fn config(dir: &Path) -> PdConfig {
    let mut cfg = PdConfig::new(dir);
    cfg.schedule = ScheduleConfig {
        max_replicas: 2,
        ..Default::default()
    };
    cfg
}

async fn loads(pd: &PdCore) -> Vec<(u64, NodeLoad)> {
    let mut nodes: Vec<(u64, NodeLoad)> = ClusterView::nodes(pd)
        .await
        .expect("nodes")
        .into_iter()
        .map(|n| (n.id, n.load))
        .collect();
    nodes.sort_by_key(|(id, _)| *id);
    nodes
}

fn load(replicas: u64, leaders: u64, size: u64) -> NodeLoad {
    NodeLoad {
        replicas,
        leaders,
        size,
    }
}

fn hb(r: &metapb::Region, leader: metapb::Peer, size: u64) -> RegionHeartbeat {
    RegionHeartbeat {
        region: r.clone(),
        leader,
        approximate_size: size,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaders_even_out_through_heartbeats_and_counts_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let pd: Arc<PdCore> = PdCore::open(config(dir.path())).expect("open PD");
    pd.bootstrap(node(1), region(1, b"", b"", 1, 1))
        .await
        .expect("bootstrap");
    pd.put_node(node(2)).await.expect("put node");
    split_three(&pd).await; // 3 regions on nodes 1 and 2, led from node 1
    assert_eq!(loads(&pd).await, [(1, load(3, 3, 0)), (2, load(3, 0, 0))]);

    let r1 = region(1, b"", b"g", 1, 3);
    let r2 = region(2, b"g", b"p", 1, 3);
    let to = r1.peers[1];
    assert_eq!(
        pd.handle_region_heartbeat(hb(&r1, leader_of(&r1), 100))
            .await
            .unwrap(),
        Some(RegionOperator::TransferLeader(to))
    );
    let ops = pd.operators().await.unwrap();
    assert_eq!(ops.len(), 1, "{ops:?}");
    assert_eq!(ops[0].source, SOURCE_LEADER_BALANCE);
    // The transfer in flight counts already: 2 against 1 is even enough.
    assert_eq!(
        pd.handle_region_heartbeat(hb(&r2, leader_of(&r2), 50))
            .await
            .unwrap(),
        None
    );
    // Region 1's new leader reports.
    assert_eq!(
        pd.handle_region_heartbeat(hb(&r1, to, 100)).await.unwrap(),
        None
    );
    assert_eq!(
        loads(&pd).await,
        [(1, load(3, 2, 150)), (2, load(3, 1, 150))]
    );
    let names: Vec<String> = pd
        .scheduling_status()
        .await
        .unwrap()
        .schedulers
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(
        names,
        [
            "replica-placement",
            "leader-balance",
            "region-balance",
            "merge-checker"
        ]
    );

    // Leaders and sizes live on the PD leader only; replicas are counted
    // from the stored regions.
    pd.close().await.unwrap();
    drop(pd);
    let pd = PdCore::open(config(dir.path())).expect("reopen PD");
    assert_eq!(loads(&pd).await, [(1, load(3, 0, 0)), (2, load(3, 0, 0))]);
    pd.close().await.unwrap();
}
