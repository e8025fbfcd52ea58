//! A node using a separate `metastore-pd` process: bootstrap through PD,
//! and the revision oracle continuing above every handed-out revision when
//! PD is killed and restarted.

use std::time::Duration;

use pd::{PdClient, RpcPdClient, RpcPdClientConfig};
use test_support::{client, Node, Pd};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_with_remote_pd_survives_pd_kill9() {
    let mut pd = Pd::start();
    let node = Node::start_dev_with(&["--pd-endpoints", &pd.endpoint()]);
    let mut c = client(&node.endpoint()).await;
    let mut last = 0;
    for i in 0..20 {
        let r = c.put(format!("k{i}"), "v", None).await.unwrap();
        last = r.header().unwrap().revision();
    }
    assert_eq!(
        last, 21,
        "a fresh cluster's 20 writes take revisions 2..=21"
    );
    pd.kill9();
    pd.restart();
    // The node reconnects to the restarted PD.
    let mut next = None;
    for _ in 0..100 {
        match c.put("after", "v", None).await {
            Ok(r) => {
                next = Some(r.header().unwrap().revision());
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let next = next.expect("writes work again after PD restarts");
    assert!(next > last, "oracle went back: {next} <= {last}");
    let r = c
        .get("k", Some(etcd_client::GetOptions::new().with_prefix()))
        .await
        .unwrap();
    assert_eq!(r.count(), 20);
    assert!(r.header().unwrap().revision() >= next);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn region_leaders_are_reported_to_pd() {
    let pd = Pd::start();
    let node = Node::start_dev_with(&["--pd-endpoints", &pd.endpoint()]);
    let mut c = client(&node.endpoint()).await;
    let member_id = c
        .put("k", "v", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .member_id();
    let pd_client = RpcPdClient::connect(&[pd.endpoint()], RpcPdClientConfig::default())
        .await
        .unwrap();
    let mut leader = None;
    for _ in 0..50 {
        if let Some(pd::RegionWithLeader {
            leader: Some(l), ..
        }) = pd_client.get_region(b"k").await.unwrap()
        {
            leader = Some(l);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let leader = leader.expect("PD learns the region's leader from heartbeats");
    assert_eq!(leader.node_id, member_id);
}
