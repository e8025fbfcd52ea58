//! A three-member `metastore-pd` cluster as real processes: the revision
//! oracle stays in real-time order across kill -9 of the leader, clients
//! fail over within seconds, and a restarted member catches up.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pd::{PdClient, RpcPdClient, RpcPdClientConfig};
use proto::metapb;
use test_support::process::pd_leader;
use test_support::{client, Node, Pd};

fn config() -> RpcPdClientConfig {
    RpcPdClientConfig {
        connect_timeout: Duration::from_secs(1),
        request_timeout: Duration::from_secs(10),
    }
}

async fn connect(endpoints: &[String]) -> RpcPdClient {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match RpcPdClient::connect(endpoints, config()).await {
            Ok(c) => return c,
            Err(e) if Instant::now() > deadline => panic!("PD cluster did not come up: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

fn node(id: u64) -> metapb::Node {
    metapb::Node {
        id,
        name: format!("n{id}"),
        peer_urls: vec![format!("http://127.0.0.1:{}", 3000 + id)],
        client_urls: vec![format!("http://127.0.0.1:{}", 4000 + id)],
        state: metapb::NodeState::Up as i32,
    }
}

type Op = (Instant, Instant, i64);

/// Every revision is greater than every revision handed out before its
/// allocation started.
fn check_real_time_order(ops: &mut [Op]) {
    ops.sort_by_key(|o| o.1);
    let mut prefix_max = Vec::with_capacity(ops.len());
    let mut m = i64::MIN;
    for o in ops.iter() {
        m = m.max(o.2);
        prefix_max.push(m);
    }
    for b in ops.iter() {
        let n = ops.partition_point(|a| a.1 < b.0);
        if n > 0 {
            assert!(
                prefix_max[n - 1] < b.2,
                "revision {} handed out after {} had been",
                b.2,
                prefix_max[n - 1]
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pd_cluster_survives_leader_kill9() {
    let mut pds = Pd::start_cluster(3);
    let endpoints: Vec<String> = pds.iter().map(|p| p.endpoint()).collect();
    let pd = connect(&endpoints).await;

    let node_id = pd.alloc_id().await.unwrap();
    let region = metapb::Region {
        id: pd.alloc_id().await.unwrap(),
        region_epoch: Some(metapb::RegionEpoch {
            conf_ver: 1,
            version: 1,
        }),
        peers: vec![metapb::Peer {
            id: pd.alloc_id().await.unwrap(),
            node_id,
            role: metapb::PeerRole::Voter as i32,
        }],
        ..Default::default()
    };
    pd.bootstrap(node(node_id), region).await.unwrap();

    // Two tasks allocate revisions all the time.
    let ops = Arc::new(Mutex::new(Vec::<Op>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = (0..2u32)
        .map(|t| {
            let (pd, ops, stop) = (pd.clone(), ops.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let start = Instant::now();
                    if let Ok(r) = pd.alloc_revisions(t + 1).await {
                        ops.lock().unwrap().push((start, Instant::now(), r));
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;

    let l = pd_leader(&pds).await;
    let killed_at = Instant::now();
    pds[l].kill9();
    let recovered = loop {
        let first_after = ops
            .lock()
            .unwrap()
            .iter()
            .filter(|o| o.0 > killed_at)
            .map(|o| o.1)
            .min();
        if let Some(t) = first_after {
            break t - killed_at;
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(10),
            "no revision within 10 s of killing the PD leader"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    eprintln!("PD failover: first alloc_revisions {recovered:?} after kill -9 of the leader");
    assert!(recovered < Duration::from_secs(5), "{recovered:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let mut all = std::mem::take(&mut *ops.lock().unwrap());
    let before = all.iter().filter(|o| o.1 < killed_at).map(|o| o.2).max();
    let after = all.iter().filter(|o| o.0 > killed_at).map(|o| o.2).min();
    assert!(before.is_some() && after.is_some());
    assert!(after > before, "{after:?} <= {before:?}");
    check_real_time_order(&mut all);

    // A write while the old leader is down, then it comes back and must
    // catch up: it should list the same nodes once it leads.
    let n2 = node(pd.alloc_id().await.unwrap());
    pd.put_node(n2.clone()).await.unwrap();
    pds[l].restart();
    let mut leads = false;
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let cur = pd_leader(&pds).await;
        if cur == l {
            leads = true;
            break;
        }
        // Kill the current leader and bring it back, so the restarted
        // member gets more chances to win an election.
        pds[cur].kill9();
        let next = pd_leader(&pds).await;
        pds[cur].restart();
        if next == l {
            leads = true;
            break;
        }
    }
    assert!(leads, "the restarted member never became leader");
    let mut nodes = pd.get_all_nodes().await.unwrap();
    nodes.sort_by_key(|n| n.id);
    assert_eq!(
        nodes.iter().map(|n| n.id).collect::<Vec<_>>(),
        vec![node_id, n2.id],
        "log of the restarted leader: {}",
        pds[l].log()
    );
    assert!(pd.alloc_revisions(1).await.unwrap() > all.iter().map(|o| o.2).max().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_keeps_writing_across_pd_leader_kill9() {
    let mut pds = Pd::start_cluster(3);
    let endpoints: Vec<String> = pds.iter().map(|p| p.endpoint()).collect();
    // The PD cluster serves before the node starts.
    connect(&endpoints).await;
    let node = Node::start_dev_with(&["--pd-endpoints", &endpoints.join(",")]);
    let mut c = client(&node.endpoint()).await;
    let mut last = 0;
    for i in 0..10 {
        let r = c.put(format!("k{i}"), "v", None).await.unwrap();
        let rev = r.header().unwrap().revision();
        assert!(rev > last);
        last = rev;
    }
    let l = pd_leader(&pds).await;
    pds[l].kill9();
    // Writes take their revisions from the new PD leader, above every
    // earlier one.
    let deadline = Instant::now() + Duration::from_secs(20);
    for i in 0..10 {
        let rev = loop {
            match c.put(format!("after{i}"), "v", None).await {
                Ok(r) => break r.header().unwrap().revision(),
                Err(e) => {
                    assert!(Instant::now() < deadline, "writes do not resume: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        assert!(rev > last, "revision went back: {rev} <= {last}");
        last = rev;
    }
    let r = c
        .get("", Some(etcd_client::GetOptions::new().with_all_keys()))
        .await
        .unwrap();
    assert_eq!(r.count(), 20, "node log: {}", node.log());
}
