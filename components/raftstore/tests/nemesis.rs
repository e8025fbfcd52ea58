//! The in-process cluster under the raft nemesis: while leaders are
//! isolated, nodes partitioned or restarted and messages lost, delayed and
//! duplicated, a writer keeps proposing; afterwards every acknowledged
//! write is on every replica, the replicas have applied the same index, and
//! the log shows every fault injected.

use std::sync::Arc;
use std::time::{Duration, Instant};

use test_support::raft_cluster::Cluster;
use test_support::{RaftNemesis, RaftNemesisConfig};

/// The workload runs at least this long, and on until every fault was
/// injected (at most 60 s).
const WORKLOAD: Duration = Duration::from_secs(12);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_the_raft_nemesis() {
    let c = Arc::new(Cluster::new(3));
    c.leader().await;
    let config = RaftNemesisConfig {
        interval: (Duration::from_millis(300), Duration::from_secs(1)),
        hold: (Duration::from_millis(500), Duration::from_millis(1500)),
        ..RaftNemesisConfig::default()
    };
    let faults = config.faults.clone();
    let epoch = Instant::now();
    let nemesis = RaftNemesis::start(c.clone(), config, epoch);
    let (mut rev, mut acked, mut failed) = (0i64, Vec::new(), 0usize);
    while epoch.elapsed() < WORKLOAD
        || (faults.iter().any(|f| nemesis.injected(*f) == 0)
            && epoch.elapsed() < Duration::from_secs(60))
    {
        // Each attempt its own revision, increasing, as the router does.
        rev += 1;
        let key = format!("k{rev:06}");
        match tokio::time::timeout(Duration::from_secs(2), c.put(rev, &key, "v")).await {
            Ok(Ok(())) => acked.push(key),
            _ => failed += 1,
        }
    }
    let log = nemesis.stop().await;
    println!("{log}");
    println!("{} writes acknowledged, {failed} failed", acked.len());
    assert_eq!(c.running(), c.nodes(), "a node left stopped");
    assert!(!acked.is_empty(), "no write acknowledged");

    let nodes = c.nodes();
    for key in &acked {
        c.must_get_on(&nodes, key, "v").await;
    }
    c.wait_same_applied(&nodes).await;
    for f in faults {
        assert!(log.injected(f) >= 1, "{f} never injected:\n{log}");
    }
}
