//! Multi-node clusters of real processes: nodes join through PD, PD gives
//! every region three replicas, and the etcd Cluster API reflects the nodes.

use std::time::{Duration, Instant};

use pd::{PdClient, RpcPdClient, RpcPdClientConfig};
use test_support::process::wait_for_voters;
use test_support::{client, etcdctl, Node, Pd};

fn start_node(name: &str, pd: &Pd) -> Node {
    Node::start_dev_with(&["--name", name, "--pd-endpoints", &pd.endpoint()])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joining_nodes_get_replicas_and_become_members() {
    let pd = Pd::start();
    let n1 = start_node("n1", &pd);
    let mut c1 = client(&n1.endpoint()).await;
    for i in 0..50 {
        c1.put(format!("k{i:02}"), format!("v{i}"), None)
            .await
            .unwrap();
    }
    let n2 = start_node("n2", &pd);
    let n3 = start_node("n3", &pd);
    let pd_client = RpcPdClient::connect(&[pd.endpoint()], RpcPdClientConfig::default())
        .await
        .unwrap();
    let region = wait_for_voters(&pd_client, 3).await;
    let mut nodes: Vec<u64> = region.peers.iter().map(|p| p.node_id).collect();
    nodes.sort_unstable();
    nodes.dedup();
    assert_eq!(nodes.len(), 3, "replicas on distinct nodes: {region:?}");

    // The new replicas caught up (by snapshot or log) with the data
    // written before they existed: serializable reads are local.
    for node in [&n2, &n3] {
        let mut c = client(&node.endpoint()).await;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let r = c
                .get(
                    "k",
                    Some(
                        etcd_client::GetOptions::new()
                            .with_prefix()
                            .with_serializable(),
                    ),
                )
                .await
                .unwrap();
            if r.count() == 50 {
                break;
            }
            assert!(Instant::now() < deadline, "replica did not catch up");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // MemberList names every node with its URLs.
    let out = etcdctl(&n2.endpoint(), &["member", "list", "-w", "json"]);
    assert!(out.status.success(), "{out:?}");
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let members = list["members"].as_array().unwrap();
    let mut names: Vec<&str> = members
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    names.sort_unstable();
    assert_eq!(names, ["n1", "n2", "n3"]);
    for m in members {
        assert_eq!(m["clientURLs"].as_array().unwrap().len(), 1);
    }
    drop((n1, n2, n3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_remove_drains_a_node_and_move_leader_hands_over() {
    let pd = Pd::start();
    let n1 = start_node("n1", &pd);
    let mut c1 = client(&n1.endpoint()).await;
    c1.put("a", "1", None).await.unwrap();
    let n2 = start_node("n2", &pd);
    let n3 = start_node("n3", &pd);
    let pd_client = RpcPdClient::connect(&[pd.endpoint()], RpcPdClientConfig::default())
        .await
        .unwrap();
    wait_for_voters(&pd_client, 3).await;

    // MoveLeader to n2's member id, asked of the current leader (n1).
    let n2_id = client(&n2.endpoint())
        .await
        .status()
        .await
        .unwrap()
        .header()
        .unwrap()
        .member_id();
    let mut m1 = client(&n1.endpoint()).await;
    m1.move_leader(n2_id).await.unwrap();
    let status = m1.status().await.unwrap();
    assert_eq!(status.leader(), n2_id);
    // Not the leader any more: etcd's error.
    let err = m1.move_leader(n2_id).await.unwrap_err().to_string();
    assert!(err.contains("etcdserver: not leader"), "{err}");

    // Remove n3: it leaves the member list at once and its replica goes.
    let n3_id = client(&n3.endpoint())
        .await
        .status()
        .await
        .unwrap()
        .header()
        .unwrap()
        .member_id();
    let mut c2 = client(&n2.endpoint()).await;
    let resp = c2.member_remove(n3_id).await.unwrap();
    assert!(resp.members().iter().all(|m| m.id() != n3_id));
    assert_eq!(resp.members().len(), 2);
    let region = wait_for_voters(&pd_client, 2).await;
    assert!(region.peers.iter().all(|p| p.node_id != n3_id));
    let err = c2.member_remove(n3_id).await.unwrap_err().to_string();
    assert!(err.contains("etcdserver: member not found"), "{err}");
    // Like a removed etcd member, the node stops once drained, and does not
    // come back.
    let mut n3 = n3;
    let exit = n3.wait_exit(Duration::from_secs(20));
    assert!(exit.is_some(), "removed node still running");
    assert!(
        n3.log().contains("removed from the cluster"),
        "{}",
        n3.log()
    );
    drop((n1, n2, n3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_started_together_form_one_cluster() {
    let pd = Pd::start();
    // All three find PD not bootstrapped; exactly one bootstrap wins and
    // the others join it.
    let nodes: Vec<Node> = std::thread::scope(|s| {
        let handles: Vec<_> = ["n1", "n2", "n3"]
            .into_iter()
            .map(|name| {
                let pd = &pd;
                s.spawn(move || start_node(name, pd))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let pd_client = RpcPdClient::connect(&[pd.endpoint()], RpcPdClientConfig::default())
        .await
        .unwrap();
    wait_for_voters(&pd_client, 3).await;
    let regions = pd_client.scan_regions(b"", b"", 0).await.unwrap();
    assert_eq!(regions.len(), 1, "one cluster, one region: {regions:?}");
    drop(nodes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_add_reserves_the_id_a_starting_node_takes() {
    let pd = Pd::start();
    let n1 = start_node("n1", &pd);
    let mut c1 = client(&n1.endpoint()).await;
    let peer_port = test_support::free_port();
    let peer_url = format!("http://127.0.0.1:{peer_port}");

    let added = c1.member_add([peer_url.clone()], None).await.unwrap();
    let member = added.member().unwrap().clone();
    assert!(member.name().is_empty(), "not started yet: no name");
    assert!(member.client_urls().is_empty());
    assert_eq!(added.member_list().len(), 2);
    // The same peer URL twice, or a bad one: etcd's errors.
    let err = c1
        .member_add([peer_url.clone()], None)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("etcdserver: Peer URLs already exists"),
        "{err}"
    );
    let err = c1
        .member_add(["127.0.0.1".to_string()], None)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("etcdserver: given member URLs are invalid"),
        "{err}"
    );
    // No learner members in MetaStore.
    let err = c1
        .member_promote(member.id())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("etcdserver: can only promote a learner member"),
        "{err}"
    );

    // A node advertising that peer URL takes the reserved id and gets a
    // replica like any joining node.
    let n2 = Node::start_with_peer_port(
        peer_port,
        &["--name", "n2", "--pd-endpoints", &pd.endpoint()],
    );
    let id2 = client(&n2.endpoint())
        .await
        .status()
        .await
        .unwrap()
        .header()
        .unwrap()
        .member_id();
    assert_eq!(id2, member.id());
    let pd_client = RpcPdClient::connect(&[pd.endpoint()], RpcPdClientConfig::default())
        .await
        .unwrap();
    let region = wait_for_voters(&pd_client, 2).await;
    assert!(region.peers.iter().any(|p| p.node_id == id2));
    let list = c1.member_list().await.unwrap();
    let m2 = list.members().iter().find(|m| m.id() == id2).unwrap();
    assert_eq!(m2.name(), "n2");
    assert_eq!(m2.peer_urls(), [peer_url]);
    drop((n1, n2));
}
