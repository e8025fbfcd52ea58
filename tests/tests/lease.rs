//! etcd's Lease on real processes:
//! * differential: the same grants (chosen and server-chosen ids, a TTL
//!   below the minimum, one too large, an id in use), keep-alives,
//!   time-to-lives, lists and revokes (of known and unknown leases) get
//!   the same answers from a real etcd and a MetaStore dev node;
//! * etcdctl `lease grant|list|timetolive --keys|keep-alive --once|
//!   revoke` print what they print against etcd, and a lease expires;
//! * leases split over two regions are all listed, and each is still
//!   served (and expires) after the split;
//! * on 3 nodes, a lease kept alive survives kill -9 of its region's
//!   leader while one left alone expires, once.

use std::time::{Duration, Instant};

use etcd_client::{Client, LeaseGrantOptions, LeaseTimeToLiveOptions};
use test_support::{client, etcdctl, metastore_ctl, Etcd, Node, ProcessCluster};

/// An answer, with what differs between servers (TTLs counting down by
/// the second) left out.
#[derive(Debug, PartialEq)]
enum Answer {
    Granted { id: i64, ttl: i64 },
    GrantedSomeId { ttl: i64 },
    Ok,
    KeptAlive { id: i64, ttl: i64 },
    TimeToLive { id: i64, granted: i64, alive: bool },
    Leases(Vec<i64>),
    Error(String),
}

fn error(e: etcd_client::Error) -> Answer {
    match e {
        etcd_client::Error::GRpcStatus(s) => {
            Answer::Error(format!("{:?}: {}", s.code(), s.message()))
        }
        other => Answer::Error(other.to_string()),
    }
}

async fn grant(c: &mut Client, ttl: i64, id: i64) -> Answer {
    let opts = (id != 0).then(|| LeaseGrantOptions::new().with_id(id));
    match c.lease_grant(ttl, opts).await {
        Ok(r) if id == 0 => {
            assert_ne!(r.id(), 0);
            Answer::GrantedSomeId { ttl: r.ttl() }
        }
        Ok(r) => Answer::Granted {
            id: r.id(),
            ttl: r.ttl(),
        },
        Err(e) => error(e),
    }
}

async fn keep_alive(c: &mut Client, id: i64) -> Answer {
    // The crate's keep-alive asks once when it opens the stream, and
    // reports TTL 0 (the lease is unknown) as an error.
    let (mut keeper, mut stream) = match c.lease_keep_alive(id).await {
        Ok(s) => s,
        Err(e) => return error(e),
    };
    keeper.keep_alive().await.expect("keep-alive request");
    match stream.message().await {
        Ok(Some(r)) => Answer::KeptAlive {
            id: r.id(),
            ttl: r.ttl(),
        },
        Ok(None) => Answer::Error("keep-alive stream ended".into()),
        Err(e) => error(e),
    }
}

async fn time_to_live(c: &mut Client, id: i64) -> Answer {
    let opts = LeaseTimeToLiveOptions::new().with_keys();
    match c.lease_time_to_live(id, Some(opts)).await {
        Ok(r) => {
            assert!(r.keys().is_empty(), "no key attached");
            Answer::TimeToLive {
                id: r.id(),
                granted: r.granted_ttl(),
                alive: r.ttl() > 0,
            }
        }
        Err(e) => error(e),
    }
}

async fn leases(c: &mut Client) -> Answer {
    match c.leases().await {
        Ok(r) => {
            let mut ids: Vec<i64> = r.leases().iter().map(|l| l.id()).collect();
            ids.sort_unstable();
            Answer::Leases(ids)
        }
        Err(e) => error(e),
    }
}

async fn revoke(c: &mut Client, id: i64) -> Answer {
    match c.lease_revoke(id).await {
        Ok(_) => Answer::Ok,
        Err(e) => error(e),
    }
}

async fn session(endpoint: &str) -> Vec<Answer> {
    let mut c = client(endpoint).await;
    vec![
        grant(&mut c, 60, 42).await,
        grant(&mut c, 60, 42).await,
        grant(&mut c, 1, 43).await,
        grant(&mut c, 9_000_000_001, 44).await,
        grant(&mut c, 30, 0).await,
        time_to_live(&mut c, 42).await,
        time_to_live(&mut c, 999).await,
        keep_alive(&mut c, 42).await,
        keep_alive(&mut c, 999).await,
        revoke(&mut c, 43).await,
        revoke(&mut c, 43).await,
        time_to_live(&mut c, 43).await,
        revoke(&mut c, 999).await,
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_answers_as_etcd() {
    let etcd = Etcd::start();
    let node = Node::start_dev();
    let want = session(&etcd.endpoint()).await;
    let got = session(&node.endpoint()).await;
    assert_eq!(got, want);
    // Both hold 42 and the server-chosen one.
    for ep in [etcd.endpoint(), node.endpoint()] {
        let mut c = client(&ep).await;
        let Answer::Leases(ids) = leases(&mut c).await else {
            panic!("no lease list from {ep}");
        };
        assert_eq!(ids.len(), 2, "{ep}: {ids:?}");
        assert!(ids.contains(&42), "{ep}: {ids:?}");
    }
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn ok(ep: &str, args: &[&str]) -> String {
    let out = etcdctl(ep, args);
    assert!(out.status.success(), "etcdctl {args:?}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What etcdctl prints for a lease session, with the lease's id and the
/// remaining TTL (which counts down) masked.
fn etcdctl_session(ep: &str) -> Vec<String> {
    let granted = ok(ep, &["lease", "grant", "100"]);
    let id = granted
        .split_whitespace()
        .nth(1)
        .expect("lease id in the grant's output")
        .to_owned();
    let mask = |s: String| {
        let s = s.replace(&id, "<id>");
        match s.find("remaining(") {
            Some(i) => {
                let end = s[i..].find(')').map_or(s.len(), |j| i + j + 1);
                format!("{}remaining(…){}", &s[..i], &s[end..])
            }
            None => s,
        }
    };
    let mut out = vec![mask(granted)];
    out.push(mask(ok(ep, &["lease", "list"])));
    out.push(mask(ok(ep, &["lease", "timetolive", &id])));
    out.push(mask(ok(ep, &["lease", "timetolive", "--keys", &id])));
    out.push(mask(ok(ep, &["lease", "keep-alive", "--once", &id])));
    out.push(mask(ok(ep, &["lease", "revoke", &id])));
    out.push(mask(ok(ep, &["lease", "timetolive", &id])));
    out.push(mask(ok(ep, &["lease", "list"])));
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_lease_commands_print_what_etcd_prints() {
    let etcd = Etcd::start();
    let node = Node::start_dev();
    let want = etcdctl_session(&etcd.endpoint());
    let got = etcdctl_session(&node.endpoint());
    assert_eq!(got, want);

    // A granted lease cannot carry keys yet: refused honestly.
    let ep = node.endpoint();
    let granted = ok(&ep, &["lease", "grant", "100"]);
    let id = granted.split_whitespace().nth(1).expect("id").to_owned();
    let put = etcdctl(&ep, &["put", "k", "v", &format!("--lease={id}")]);
    assert!(!put.status.success());
    assert!(
        text(&put).contains("attaching keys to leases is not supported yet"),
        "{}",
        text(&put)
    );

    // A lease nobody keeps alive expires (minimum TTL 2 s).
    let short = ok(&ep, &["lease", "grant", "1"]);
    assert!(short.contains("granted with TTL(2s)"), "{short}");
    let short_id = short.split_whitespace().nth(1).expect("id").to_owned();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ttl = ok(&ep, &["lease", "timetolive", &short_id]);
        if ttl.contains("already expired") {
            break;
        }
        assert!(Instant::now() < deadline, "not expired: {ttl}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(!ok(&ep, &["lease", "list"]).contains(&short_id));
}

/// The owner key of lease `id` (raftstore::lease), in hex.
fn owner_key_hex(id: i64) -> String {
    let mut key = b"\xff\xfemetastore/lease/".to_vec();
    key.extend_from_slice(&id.to_be_bytes());
    key.iter().map(|b| format!("{b:02x}")).collect()
}

/// A split in the middle of the leases' key range: the records go with
/// their keys, every lease is still listed and served, and the short one
/// on the new region's side expires there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_split_over_regions_are_all_served() {
    let node = Node::start_dev();
    let ep = node.endpoint();
    let mut c = client(&ep).await;
    for id in [1, 2, 3, 4, 6] {
        assert_eq!(
            grant(&mut c, 600, id).await,
            Answer::Granted { id, ttl: 600 }
        );
    }
    let split = metastore_ctl(&ep, &["--hex", "region", "split", &owner_key_hex(4)]);
    assert!(split.status.success(), "{split:?}");
    let regions = metastore_ctl(&ep, &["region", "list", "-w", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&regions.stdout).expect("json");
    assert_eq!(v["regions"].as_array().map_or(0, Vec::len), 2, "{v}");

    // Granted in the new region.
    assert_eq!(grant(&mut c, 2, 5).await, Answer::Granted { id: 5, ttl: 2 });
    assert_eq!(leases(&mut c).await, Answer::Leases(vec![1, 2, 3, 4, 5, 6]));
    for id in [1, 6] {
        assert_eq!(
            keep_alive(&mut c, id).await,
            Answer::KeptAlive { id, ttl: 600 }
        );
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while leases(&mut c).await != Answer::Leases(vec![1, 2, 3, 4, 6]) {
        assert!(Instant::now() < deadline, "lease 5 did not expire");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(revoke(&mut c, 4).await, Answer::Ok);
    assert_eq!(revoke(&mut c, 3).await, Answer::Ok);
    assert_eq!(leases(&mut c).await, Answer::Leases(vec![1, 2, 6]));
}

/// The index of the node leading the cluster's (only) region.
async fn leader_index(cluster: &ProcessCluster) -> usize {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        for (i, n) in cluster.nodes().iter().enumerate() {
            if let Ok(mut c) = Client::connect([n.endpoint()], None).await {
                if let Ok(s) = c.status().await {
                    if s.header().map(|h| h.member_id()) == Some(s.leader()) {
                        return i;
                    }
                }
            }
        }
        assert!(Instant::now() < deadline, "no leader");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Kill -9 of the leader running the leases' clock: the new leader
/// promotes the leases, so the one kept alive (every second, TTL 4 s)
/// lives on, and the one nobody keeps alive expires exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_kept_alive_lease_survives_a_leader_kill() {
    let mut cluster = ProcessCluster::start().await;
    let leader = leader_index(&cluster).await;
    let other = (leader + 1) % 3;
    let ep = cluster.node(other).endpoint();
    let mut c = client(&ep).await;
    assert_eq!(
        grant(&mut c, 4, 1001).await,
        Answer::Granted { id: 1001, ttl: 4 }
    );
    assert_eq!(
        grant(&mut c, 4, 1002).await,
        Answer::Granted { id: 1002, ttl: 4 }
    );

    let keeper_ep = ep.clone();
    let keeper = tokio::spawn(async move {
        let mut c = client(&keeper_ep).await;
        let started = Instant::now();
        let mut answers = Vec::new();
        while started.elapsed() < Duration::from_secs(12) {
            // A new stream each time: a stream to a node that is being
            // restarted ends with it.
            answers.push(keep_alive(&mut c, 1001).await);
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        answers
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    cluster.node_mut(leader).kill9();
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.node_mut(leader).restart();

    let answers = keeper.await.expect("keeper");
    let renewed = answers
        .iter()
        .filter(|a| **a == Answer::KeptAlive { id: 1001, ttl: 4 })
        .count();
    assert!(
        answers
            .iter()
            .all(|a| !matches!(a, Answer::KeptAlive { ttl: 0, .. })),
        "the kept-alive lease expired: {answers:?}"
    );
    assert!(renewed >= 6, "{answers:?}");
    let mut c = client(&ep).await;
    assert_eq!(
        time_to_live(&mut c, 1001).await,
        Answer::TimeToLive {
            id: 1001,
            granted: 4,
            alive: true
        }
    );
    assert_eq!(
        time_to_live(&mut c, 1002).await,
        Answer::TimeToLive {
            id: 1002,
            granted: 0,
            alive: false
        },
        "the lease left alone expired"
    );
    assert_eq!(leases(&mut c).await, Answer::Leases(vec![1001]));
}
