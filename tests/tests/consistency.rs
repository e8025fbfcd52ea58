//! Hashes and the consistency check on real processes:
//! * HashKV of the whole keyspace agrees on every node, also when regions
//!   have replicas on only some nodes (PD's `--max-replicas 2` over 3
//!   nodes, many small regions): a node without a replica of a region
//!   asks its leader's node; etcdctl `endpoint hashkv` over all three
//!   endpoints prints one hash, and it is the hash a single-region dev
//!   node answers for the same writes;
//! * a replica whose RocksDB was changed behind raft's back (a version
//!   written into a stopped node's data dir) is found by the periodic
//!   consistency check: the CORRUPT alarm comes up (etcdctl `alarm
//!   list`), writes are refused with etcd's "corrupt cluster" while reads
//!   go on, and `alarm disarm` lists what it disarmed;
//! * differential: `alarm list`, the write errors under NOSPACE and
//!   CORRUPT activated through the API, and `alarm disarm` print the same
//!   on a dev node as on a real etcd.

use std::time::{Duration, Instant};

use engine::{KvEngine, WriteBatch};
use etcd_client::{AlarmAction, AlarmOptions, AlarmType, Client, Txn, TxnOp};
use mvcc::MvccStore;
use pd::{PdClient, RpcPdClient, RpcPdClientConfig};
use proto::raft_cmdpb::{mutation::Op, Mutation};
use test_support::{client, etcdctl, Etcd, Node, Pd, ProcessCluster, ProcessClusterOptions};

fn stdout(args: &[&str], endpoint: &str) -> String {
    let out = etcdctl(endpoint, args);
    assert!(
        out.status.success(),
        "etcdctl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(args: &[&str], endpoint: &str) -> String {
    let out = etcdctl(endpoint, args);
    assert!(!out.status.success(), "etcdctl {args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Writes 100 keys in one txn and deletes one: revisions 2 and 3 on a
/// fresh store (one request each, so that splits starting after them
/// cannot make a client retry and change the revisions).
async fn write_keys(c: &mut Client) -> i64 {
    let puts: Vec<TxnOp> = (0..100)
        .map(|i| TxnOp::put(format!("key/{i:03}"), format!("v{i}"), None))
        .collect();
    c.txn(Txn::new().and_then(puts)).await.expect("txn");
    let resp = c.delete("key/050", None).await.expect("delete");
    resp.header().expect("header").revision()
}

/// More writes over the keyspace (several regions once split).
async fn write_more(c: &mut Client) -> i64 {
    let mut rev = 0;
    for k in ["key/005", "key/035", "key/065", "key/095", "zzz"] {
        let resp = c.put(k, "again", None).await.expect("put");
        rev = resp.header().expect("header").revision();
    }
    let resp = c.delete("key/070", None).await.expect("delete");
    rev.max(resp.header().expect("header").revision())
}

async fn hash_of(endpoint: &str, rev: i64) -> (u32, i64) {
    let mut c = client(endpoint).await;
    let r = c.hash_kv(rev).await.expect("hashkv");
    (r.hash(), r.hash_revision())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hashkv_agrees_on_every_node_without_every_region_local() {
    let pd = Pd::start_cluster_with(1, |_, _| vec!["--max-replicas".into(), "2".into()]);
    let pd_endpoint = pd[0].endpoint();
    let nodes: Vec<Node> = ["n1", "n2", "n3"]
        .iter()
        .map(|name| {
            Node::start_dev_with(&[
                "--name",
                name,
                "--pd-endpoints",
                &pd_endpoint,
                "--region-max-keys",
                "10",
                "--split-check-interval",
                "200ms",
            ])
        })
        .collect();
    let mut c = client(&nodes[0].endpoint()).await;
    write_keys(&mut c).await;

    // Several regions, each with its two replicas: every region lacks a
    // replica on one of the three nodes.
    let pdc = RpcPdClient::connect(
        std::slice::from_ref(&pd_endpoint),
        RpcPdClientConfig::default(),
    )
    .await
    .expect("connect to PD");
    let deadline = Instant::now() + Duration::from_secs(120);
    let regions = loop {
        let regions = pdc.scan_regions(b"", b"", 0).await.expect("scan");
        let settled = regions.len() >= 3
            && regions.iter().all(|r| r.region.peers.len() == 2)
            && regions
                .windows(2)
                .all(|p| p[0].region.end_key == p[1].region.start_key);
        if settled {
            break regions;
        }
        assert!(
            Instant::now() < deadline,
            "regions did not settle: {regions:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let layout: Vec<Vec<u64>> = regions
        .iter()
        .map(|r| r.region.peers.iter().map(|p| p.node_id).collect())
        .collect();
    println!("{} regions, replicas on nodes {layout:?}", regions.len());
    let rev = write_more(&mut c).await;

    let mut answers = Vec::new();
    for n in &nodes {
        answers.push(hash_of(&n.endpoint(), rev).await);
    }
    assert!(
        answers.iter().all(|a| *a == answers[0]),
        "hashes differ: {answers:?}"
    );
    assert_eq!(answers[0].1, rev);
    // The current revision (0) too, once more on every node.
    let mut current = Vec::new();
    for n in &nodes {
        current.push(hash_of(&n.endpoint(), 0).await);
    }
    assert!(current.iter().all(|a| *a == answers[0]), "{current:?}");

    // etcdctl over all three endpoints.
    let eps = nodes
        .iter()
        .map(|n| n.endpoint().trim_start_matches("http://").to_owned())
        .collect::<Vec<_>>()
        .join(",");
    let out = stdout(
        &["endpoint", "hashkv", &format!("--rev={rev}"), "-w", "json"],
        &eps,
    );
    let list: serde_json::Value = serde_json::from_str(&out).expect("json");
    let hashes: Vec<u64> = list
        .as_array()
        .expect("array")
        .iter()
        .map(|e| e["HashKV"]["hash"].as_u64().expect("hash"))
        .collect();
    assert_eq!(hashes.len(), 3, "{out}");
    assert!(
        hashes.iter().all(|h| *h == u64::from(answers[0].0)),
        "{out}"
    );

    // The same writes on a dev node (one region) hash the same: the
    // hash does not depend on how the keyspace is cut into regions.
    let dev = Node::start_dev();
    let mut d = client(&dev.endpoint()).await;
    write_keys(&mut d).await;
    assert_eq!(write_more(&mut d).await, rev);
    assert_eq!(hash_of(&dev.endpoint(), rev).await, answers[0]);
}

/// Writes a version of `key` at `revision` that no raft entry wrote into
/// the RocksDB of a stopped node.
fn tamper(node: &Node, key: &[u8], revision: i64) {
    let kv = KvEngine::open(&node.data_dir().join("kv")).expect("open the node's RocksDB");
    let mvcc = MvccStore::new(kv.clone());
    let mut wb = WriteBatch::default();
    mvcc.stage_changes(
        &mut wb,
        revision,
        &[Mutation {
            op: Op::Put as i32,
            key: key.to_vec(),
            sub: 9,
            value: b"not written through raft".to_vec(),
            ..Default::default()
        }],
    );
    kv.write(wb).expect("tamper");
    kv.sync_wal().expect("sync");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_corrupted_replica_raises_the_corrupt_alarm() {
    let mut cluster = ProcessCluster::start_with(ProcessClusterOptions {
        node_args: vec!["--consistency-check-interval".into(), "300ms".into()],
        ..Default::default()
    })
    .await;
    let ep = cluster.node(0).endpoint();
    let mut c = client(&ep).await;
    for i in 0..20 {
        c.put(format!("k{i:02}"), "v", None).await.expect("put");
    }
    // Healthy: checks run and raise nothing.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(stdout(&["alarm", "list"], &ep), "");

    // Node 3, stopped cleanly, gets a version of its own and comes back.
    // Whether it leads the region or follows, the two healthy replicas
    // are the majority and it is the member named.
    let victim_ep = cluster.node(2).endpoint();
    let victim_id = client(&victim_ep)
        .await
        .status()
        .await
        .expect("status")
        .header()
        .expect("header")
        .member_id();
    let node = cluster.node_mut(2);
    node.stop();
    tamper(node, b"k05", 3);
    node.restart();
    // Usually the victim leads the region when the check runs: the case
    // where comparing with the leader alone would blame the healthy ones.
    let all: Vec<String> = cluster.nodes().iter().map(|n| n.endpoint()).collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let moved = etcdctl(&all.join(","), &["move-leader", &format!("{victim_id:x}")]);
        if moved.status.success() {
            break;
        }
        if Instant::now() > deadline {
            eprintln!(
                "leadership not moved to the victim: {}",
                String::from_utf8_lossy(&moved.stderr)
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let deadline = Instant::now() + Duration::from_secs(30);
    let listed = loop {
        let listed = stdout(&["alarm", "list"], &ep);
        if !listed.is_empty() {
            break listed;
        }
        assert!(
            Instant::now() < deadline,
            "no alarm raised; victim's log:\n{}",
            cluster.node(2).log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(listed, format!("memberID:{victim_id} alarm:CORRUPT \n"));

    // Writes are refused everywhere (each node's copy of the list is at
    // most a refresh behind), reads go on.
    for n in cluster.nodes() {
        let ep = n.endpoint();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let out = etcdctl(&ep, &["put", "k99", "v"]);
            if !out.status.success() {
                let err = String::from_utf8_lossy(&out.stderr).into_owned();
                assert!(err.contains("etcdserver: corrupt cluster"), "{err}");
                break;
            }
            assert!(Instant::now() < deadline, "writes still accepted on {ep}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(stderr(&["del", "k01"], &ep).contains("etcdserver: corrupt cluster"));
        assert!(stderr(&["compaction", "2"], &ep).contains("etcdserver: corrupt cluster"));
        assert_eq!(stdout(&["get", "k01"], &ep), "k01\nv\n");
    }
    let status = stdout(&["endpoint", "status", "-w", "json"], &ep);
    assert!(status.contains("alarm:CORRUPT"), "{status}");

    // Disarming lists what it disarmed (the check raises it again later).
    assert_eq!(
        stdout(&["alarm", "disarm"], &ep),
        format!("memberID:{victim_id} alarm:CORRUPT \n")
    );
}

/// A dev node and a real etcd, each with its member id.
struct Both {
    node: (String, u64),
    etcd: (String, u64),
}

impl Both {
    /// What etcdctl `args` prints on each (stdout, or the `Error:` line
    /// of stderr when `ok` is false), alarms' member ids replaced by `ID`, lines
    /// sorted (etcd lists alarms in map order).
    fn run(&self, args: &[&str], ok: bool) -> (String, String) {
        let run = |(ep, id): &(String, u64)| {
            let out = etcdctl(ep, args);
            assert_eq!(
                out.status.success(),
                ok,
                "etcdctl {args:?} on {ep}: {out:?}"
            );
            let text = if ok { out.stdout } else { out.stderr };
            let text =
                String::from_utf8_lossy(&text).replace(&format!("memberID:{id} "), "memberID:ID ");
            let mut lines: Vec<&str> = text
                .lines()
                .filter(|l| ok || l.starts_with("Error:"))
                .collect();
            lines.sort_unstable();
            lines.iter().map(|l| format!("{l}\n")).collect::<String>()
        };
        (run(&self.node), run(&self.etcd))
    }

    fn same(&self, args: &[&str], ok: bool) -> String {
        let (ours, theirs) = self.run(args, ok);
        assert_eq!(ours, theirs, "etcdctl {args:?}");
        ours
    }

    async fn activate(&self, alarm: AlarmType) {
        for (ep, id) in [&self.node, &self.etcd] {
            let mut c = client(ep).await;
            let mut options = AlarmOptions::new();
            options.with_member(*id);
            let resp = c
                .alarm(AlarmAction::Activate, alarm, Some(options))
                .await
                .expect("activate");
            assert_eq!(resp.alarms().len(), 1, "{ep}");
            assert_eq!(resp.alarms()[0].member_id(), *id);
        }
    }
}

async fn member_id(ep: &str) -> u64 {
    client(ep)
        .await
        .status()
        .await
        .expect("status")
        .header()
        .expect("header")
        .member_id()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alarm_list_and_disarm_match_etcd() {
    let node = Node::start_dev();
    let etcd = Etcd::start();
    let both = Both {
        node: (node.endpoint(), member_id(&node.endpoint()).await),
        etcd: (etcd.endpoint(), member_id(&etcd.endpoint()).await),
    };
    both.same(&["put", "a", "1"], true);
    assert_eq!(both.same(&["alarm", "list"], true), "");

    both.activate(AlarmType::Nospace).await;
    assert_eq!(
        both.same(&["alarm", "list"], true),
        "memberID:ID alarm:NOSPACE \n"
    );
    // The node refreshes its copy of the list at once after a change made
    // through it: no wait needed.
    both.same(&["put", "a", "2"], false);
    both.same(&["get", "a"], true);
    both.same(&["del", "a"], true);
    both.same(&["put", "a", "3"], false);
    assert_eq!(
        both.same(&["alarm", "disarm"], true),
        "memberID:ID alarm:NOSPACE \n"
    );
    assert_eq!(both.same(&["alarm", "list"], true), "");
    both.same(&["put", "a", "4"], true);

    both.activate(AlarmType::Corrupt).await;
    assert_eq!(
        both.same(&["alarm", "list"], true),
        "memberID:ID alarm:CORRUPT \n"
    );
    let err = both.same(&["put", "a", "5"], false);
    assert!(err.contains("etcdserver: corrupt cluster"), "{err}");
    both.same(&["del", "a"], false);
    both.same(&["get", "a"], true);
    // Two alarms are listed and disarmed together. (No writes while both
    // are active: etcd then answers as the alarm activated last says
    // until it restarts, MetaStore always with CORRUPT's error.)
    both.activate(AlarmType::Nospace).await;
    let listed = both.same(&["alarm", "list"], true);
    assert_eq!(listed.lines().count(), 2, "{listed}");
    let disarmed = both.same(&["alarm", "disarm"], true);
    assert_eq!(disarmed, listed);
    assert_eq!(both.same(&["alarm", "list"], true), "");
    both.same(&["put", "a", "6"], true);
}
