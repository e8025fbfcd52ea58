//! etcd's Lease on real processes:
//! * differential: the same grants (chosen and server-chosen ids, a TTL
//!   below the minimum, one too large, an id in use), keep-alives,
//!   time-to-lives (with keys), lists, puts with leases (known, unknown,
//!   in a Txn, kept with `ignore_lease`, a key moved off its lease) and
//!   revokes (of known and unknown leases, with keys) get the same
//!   answers from a real etcd and a MetaStore dev node, and leave the
//!   same keys at the same revisions;
//! * etcdctl `lease grant|list|timetolive --keys|keep-alive --once|
//!   revoke` and `put --lease` print what they print against etcd, and a
//!   lease expires with its key;
//! * leases split over two regions are all listed, and each is still
//!   served (and expires) after the split; a revoke deletes keys of both
//!   regions at one revision, seen by a watch in one response, and an
//!   expired lease's keys in another region go with it;
//! * on 3 nodes, a lease kept alive survives kill -9 of its region's
//!   leader while one left alone expires, once, and its key is deleted
//!   exactly once.

use std::time::{Duration, Instant};

use etcd_client::{
    Client, Compare, CompareOp, EventType, GetOptions, LeaseGrantOptions, LeaseTimeToLiveOptions,
    PutOptions, Txn, TxnOp, WatchOptions,
};
use test_support::{client, etcdctl, metastore_ctl, Etcd, Node, ProcessCluster};

/// An answer, with what differs between servers (TTLs counting down by
/// the second) left out.
#[derive(Debug, PartialEq)]
enum Answer {
    Granted {
        id: i64,
        ttl: i64,
    },
    GrantedSomeId {
        ttl: i64,
    },
    Ok,
    KeptAlive {
        id: i64,
        ttl: i64,
    },
    TimeToLive {
        id: i64,
        granted: i64,
        alive: bool,
    },
    Keys(Vec<String>),
    Leases(Vec<i64>),
    /// Every key: (key, value, lease, version, mod revision), and the
    /// header's revision.
    Kvs(Vec<(String, String, i64, i64, i64)>, i64),
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
        Ok(r) => Answer::TimeToLive {
            id: r.id(),
            granted: r.granted_ttl(),
            alive: r.ttl() > 0,
        },
        Err(e) => error(e),
    }
}

/// The keys carrying lease `id`, sorted (etcd lists them in no order).
async fn lease_keys(c: &mut Client, id: i64) -> Answer {
    let opts = LeaseTimeToLiveOptions::new().with_keys();
    match c.lease_time_to_live(id, Some(opts)).await {
        Ok(r) => {
            let mut keys: Vec<String> = r
                .keys()
                .iter()
                .map(|k| String::from_utf8_lossy(k).into_owned())
                .collect();
            keys.sort();
            Answer::Keys(keys)
        }
        Err(e) => error(e),
    }
}

async fn put(c: &mut Client, key: &str, lease: i64) -> Answer {
    let opts = PutOptions::new().with_lease(lease);
    match c.put(key, format!("{key}@{lease}"), Some(opts)).await {
        Ok(_) => Answer::Ok,
        Err(e) => error(e),
    }
}

async fn kvs(c: &mut Client) -> Answer {
    match c.get("", Some(GetOptions::new().with_all_keys())).await {
        Ok(r) => Answer::Kvs(
            r.kvs()
                .iter()
                .map(|kv| {
                    (
                        String::from_utf8_lossy(kv.key()).into_owned(),
                        String::from_utf8_lossy(kv.value()).into_owned(),
                        kv.lease(),
                        kv.version(),
                        kv.mod_revision(),
                    )
                })
                .collect(),
            r.header().map_or(0, |h| h.revision()),
        ),
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
    let mut answers = vec![
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
    ];
    // Keys on leases.
    answers.extend([
        grant(&mut c, 60, 50).await,
        put(&mut c, "a", 50).await,
        put(&mut c, "b", 50).await,
        put(&mut c, "c", 50).await,
        put(&mut c, "d", 999).await,
        // b leaves the lease, c is deleted.
        put(&mut c, "b", 0).await,
        lease_keys(&mut c, 42).await,
    ]);
    c.delete("c", None).await.expect("delete c");
    // Kept on its lease, and a Txn's put with a lease.
    c.put("a", "again", Some(PutOptions::new().with_ignore_lease()))
        .await
        .expect("put a keeping its lease");
    let txn = Txn::new()
        .when([Compare::version("e", CompareOp::Equal, 0)])
        .and_then([TxnOp::put(
            "e",
            "e@50",
            Some(PutOptions::new().with_lease(50)),
        )]);
    answers.push(match c.txn(txn).await {
        Ok(r) => Answer::Leases(vec![i64::from(r.succeeded())]),
        Err(e) => error(e),
    });
    answers.extend([
        lease_keys(&mut c, 50).await,
        kvs(&mut c).await,
        revoke(&mut c, 50).await,
        kvs(&mut c).await,
        lease_keys(&mut c, 50).await,
        put(&mut c, "f", 50).await,
    ]);
    answers
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
    out.push(mask(ok(ep, &["put", "k", "v", &format!("--lease={id}")])));
    out.push(mask(ok(ep, &["lease", "timetolive", "--keys", &id])));
    out.push(mask(ok(ep, &["get", "k"])));
    out.push(mask(ok(ep, &["lease", "keep-alive", "--once", &id])));
    out.push(mask(ok(ep, &["lease", "revoke", &id])));
    out.push(mask(ok(ep, &["get", "k"])));
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

    // A lease nobody keeps alive expires (minimum TTL 2 s), with its key.
    let ep = node.endpoint();
    let short = ok(&ep, &["lease", "grant", "1"]);
    assert!(short.contains("granted with TTL(2s)"), "{short}");
    let short_id = short.split_whitespace().nth(1).expect("id").to_owned();
    ok(&ep, &["put", "short", "v", &format!("--lease={short_id}")]);
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
    assert_eq!(ok(&ep, &["get", "short"]), "", "the expired lease's key");
}

/// The owner key of lease `id` (raftstore::lease), in hex.
fn owner_key_hex(id: i64) -> String {
    let mut key = b"\xff\xfemetastore/lease/".to_vec();
    key.extend_from_slice(&id.to_be_bytes());
    key.iter().map(|b| format!("{b:02x}")).collect()
}

/// A split in the middle of the leases' key range: the records go with
/// their keys, every lease is still listed and served, and the short one
/// on the new region's side expires there, with its key in the other
/// region. A revoke deletes keys of both regions at one revision, which a
/// watch delivers in one response.
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

    // Granted in the new region, with a key in the first.
    assert_eq!(grant(&mut c, 2, 5).await, Answer::Granted { id: 5, ttl: 2 });
    assert_eq!(put(&mut c, "c", 5).await, Answer::Ok);
    assert_eq!(leases(&mut c).await, Answer::Leases(vec![1, 2, 3, 4, 5, 6]));
    // Lease 6 (second region) with a key in each region, lease 1 (first)
    // with one in the first.
    // Above every owner key: in the second region.
    let high = b"\xff\xffhigh".to_vec();
    let high_text = String::from_utf8_lossy(&high).into_owned();
    let opts = PutOptions::new().with_lease(6);
    c.put(high.clone(), "v", Some(opts))
        .await
        .expect("put high");
    for (key, lease) in [("a", 6), ("b", 1)] {
        assert_eq!(put(&mut c, key, lease).await, Answer::Ok, "{key}");
    }
    assert_eq!(
        lease_keys(&mut c, 6).await,
        Answer::Keys(vec!["a".into(), high_text.clone()])
    );
    assert_eq!(lease_keys(&mut c, 1).await, Answer::Keys(vec!["b".into()]));
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
    let got = c.get("c", None).await.expect("get c");
    assert!(got.kvs().is_empty(), "the expired lease's key: {got:?}");

    let mut watch = c
        .watch("", Some(WatchOptions::new().with_all_keys()))
        .await
        .expect("watch");
    let created = watch.message().await.expect("watch stream").expect("open");
    assert!(created.created());
    assert_eq!(revoke(&mut c, 6).await, Answer::Ok);
    let resp = tokio::time::timeout(Duration::from_secs(10), watch.message())
        .await
        .expect("events in time")
        .expect("watch stream")
        .expect("open");
    let events: Vec<_> = resp
        .events()
        .iter()
        .map(|e| {
            let kv = e.kv().expect("kv");
            (
                e.event_type(),
                String::from_utf8_lossy(kv.key()).into_owned(),
                kv.mod_revision(),
            )
        })
        .collect();
    let rev = events.first().map_or(0, |e| e.2);
    assert_eq!(
        events,
        vec![
            (EventType::Delete, "a".to_owned(), rev),
            (EventType::Delete, high_text, rev)
        ],
        "one revision, one response"
    );
    assert_eq!(kvs(&mut c).await, kvs_of(&mut c, &["b"]).await);
    assert_eq!(revoke(&mut c, 4).await, Answer::Ok);
    assert_eq!(revoke(&mut c, 3).await, Answer::Ok);
    assert_eq!(leases(&mut c).await, Answer::Leases(vec![1, 2]));
}

/// [`kvs`] as it should be holding exactly `keys`.
async fn kvs_of(c: &mut Client, keys: &[&str]) -> Answer {
    let Answer::Kvs(all, rev) = kvs(c).await else {
        panic!("no keys");
    };
    let kept = all
        .into_iter()
        .filter(|kv| keys.contains(&kv.0.as_str()))
        .collect();
    Answer::Kvs(kept, rev)
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
/// lives on with its key, and the one nobody keeps alive expires exactly
/// once: its key is deleted once, as the history replayed by a watch
/// shows.
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
    assert_eq!(put(&mut c, "kept", 1001).await, Answer::Ok);
    assert_eq!(put(&mut c, "gone", 1002).await, Answer::Ok);

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
    assert_eq!(
        lease_keys(&mut c, 1001).await,
        Answer::Keys(vec!["kept".into()])
    );
    let Answer::Kvs(all, _) = kvs(&mut c).await else {
        panic!("no keys");
    };
    let keys: Vec<_> = all.iter().map(|kv| kv.0.as_str()).collect();
    assert_eq!(keys, vec!["kept"]);
    // The whole history of "gone": one put, one delete.
    let opts = WatchOptions::new().with_start_revision(1);
    let mut watch = c.watch("gone", Some(opts)).await.expect("watch");
    let mut history = Vec::new();
    // Until two events came, then whatever comes within a second more.
    loop {
        let wait = if history.len() < 2 { 10 } else { 1 };
        let Ok(resp) = tokio::time::timeout(Duration::from_secs(wait), watch.message()).await
        else {
            assert!(history.len() >= 2, "history: {history:?}");
            break;
        };
        let resp = resp.expect("watch stream").expect("open");
        history.extend(resp.events().iter().map(|e| e.event_type()));
    }
    assert_eq!(history, vec![EventType::Put, EventType::Delete]);
}
