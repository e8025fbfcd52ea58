//! `metastore-ctl` against a dev node, which serves its embedded placement
//! driver on its client URL: stores, regions, the scheduler, and clear
//! errors with the documented exit codes.
//!
//! Splits: `region split KEY` on a dev node's data, and a node with small
//! split thresholds splitting itself as keys arrive; etcdctl sees one store
//! throughout.

use std::process::Output;
use std::time::{Duration, Instant};

use serde_json::Value;
use test_support::{etcdctl, free_port, metastore_ctl, Node};

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs a command that must succeed and print JSON.
fn json(endpoint: &str, args: &[&str]) -> Value {
    let out = metastore_ctl(endpoint, args);
    assert!(
        out.status.success(),
        "metastore-ctl {args:?}: {}{}",
        stdout(&out),
        stderr(&out)
    );
    serde_json::from_str(&stdout(&out))
        .unwrap_or_else(|e| panic!("metastore-ctl {args:?}: not JSON ({e}): {}", stdout(&out)))
}

/// `region list -w json` once the region's leader has reported to PD.
fn regions_with_leader(endpoint: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = json(endpoint, &["region", "list", "-w", "json"]);
        if !v["regions"][0]["leader"].is_null() {
            return v;
        }
        assert!(Instant::now() < deadline, "no region leader reported: {v}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Asserts a failed run: its exit code and its one line on stderr.
fn assert_fails(out: &Output, code: i32, message: &str) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(code), "stderr: {err}");
    assert_eq!(err.lines().count(), 1, "one line expected: {err}");
    assert!(err.contains(message), "{err:?} lacks {message:?}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn stores_regions_and_scheduler_of_a_dev_node() {
    let node = Node::start_dev();
    let ep = node.endpoint();

    let regions = regions_with_leader(&ep);
    assert_eq!(regions["count"], 1, "{regions}");
    let region = &regions["regions"][0];
    assert_eq!(region["start_key"], "", "whole keyspace: {region}");
    assert_eq!(region["end_key"], "", "whole keyspace: {region}");
    assert!(region["approximate_size"].is_u64(), "{region}");
    assert!(region["approximate_keys"].is_u64(), "{region}");
    assert!(region["epoch"]["conf_ver"].is_u64(), "{region}");
    let peers = region["peers"].as_array().expect("peers");
    assert_eq!(peers.len(), 1, "{region}");
    assert_eq!(peers[0]["role"], "voter");
    assert_eq!(region["leader"]["id"], peers[0]["id"]);

    let stores = json(&ep, &["store", "list", "-w", "json"]);
    assert_eq!(stores["count"], 1, "{stores}");
    let store = &stores["stores"][0];
    assert_eq!(store["id"], peers[0]["node_id"], "{stores}");
    assert_eq!(store["state"], "up");
    assert_eq!(store["client_urls"][0], ep.as_str());
    assert_eq!(store["region_count"], 1);
    assert_eq!(store["leader_count"], 1);

    let shown = json(&ep, &["region", "show", "foo", "-w", "json"]);
    assert_eq!(shown["count"], 1);
    assert_eq!(shown["regions"][0]["id"], region["id"]);
    let table = metastore_ctl(&ep, &["region", "show", "foo"]);
    assert!(table.status.success(), "{}", stderr(&table));
    let text = stdout(&table);
    let mut lines = text.lines();
    assert!(
        lines.next().is_some_and(|h| h.starts_with("ID  START_KEY")),
        "{text}"
    );
    assert!(
        lines
            .next()
            .is_some_and(|row| row.starts_with(&region["id"].to_string())),
        "{text}"
    );

    let scheduler = json(&ep, &["scheduler", "-w", "json"]);
    assert_eq!(scheduler["schedulers"][0]["name"], "replica-placement");
    assert_eq!(scheduler["settings"]["max_replicas"], 3);
    assert!(scheduler["operators"]["count"].is_u64(), "{scheduler}");

    assert_fails(
        &metastore_ctl(&ep, &["region", "split", ""]),
        2,
        "split key must not be empty",
    );
    assert_fails(
        &metastore_ctl(&ep, &["region", "show", "0xzz"]),
        2,
        "not hex after 0x",
    );
}

#[test]
fn unreachable_pd_is_one_line_and_exit_code_1() {
    let dead = format!("http://127.0.0.1:{}", free_port());
    let out = metastore_ctl(&dead, &["store", "list"]);
    assert_fails(
        &out,
        1,
        &format!("metastore-ctl: cannot reach PD at {dead}"),
    );
}

/// The count of keys under `prefix`, as one etcdctl read answers it (one
/// key returned, the count of all).
fn count_under(endpoint: &str, prefix: &str) -> u64 {
    let out = etcdctl(
        endpoint,
        &[
            "get",
            prefix,
            "--prefix",
            "--keys-only",
            "--limit",
            "1",
            "-w",
            "json",
        ],
    );
    assert!(out.status.success(), "etcdctl get: {}", stderr(&out));
    let v: Value = serde_json::from_str(&stdout(&out)).expect("etcdctl JSON");
    v["count"].as_u64().unwrap_or(0)
}

fn put_keys(endpoint: &str, n: usize) {
    for i in 0..n {
        let out = etcdctl(endpoint, &["put", &format!("k{i:03}"), &format!("v{i}")]);
        assert!(out.status.success(), "etcdctl put: {}", stderr(&out));
    }
}

#[test]
fn region_split_on_request() {
    let node = Node::start_dev();
    let ep = node.endpoint();
    regions_with_leader(&ep);
    put_keys(&ep, 30);

    let split = json(&ep, &["region", "split", "k010", "-w", "json"]);
    assert_eq!(split["count"], 2, "{split}");
    assert_eq!(split["regions"][0]["end_key"], "k010", "{split}");
    assert_eq!(split["regions"][1]["start_key"], "k010", "{split}");
    let version = |r: &Value| r["epoch"]["version"].as_u64().unwrap_or(0);
    assert!(version(&split["regions"][0]) >= 2, "{split}");

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let regions = json(&ep, &["region", "list", "-w", "json"]);
        let led = regions["regions"]
            .as_array()
            .is_some_and(|rs| rs.iter().all(|r| !r["leader"].is_null()));
        if regions["count"] == 2 && led {
            break;
        }
        assert!(Instant::now() < deadline, "{regions}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // One store for etcdctl: reads across the split, writes on both sides.
    assert_eq!(count_under(&ep, "k"), 30);
    for (k, v) in [("k005", "left"), ("k020", "right")] {
        let out = etcdctl(&ep, &["put", k, v]);
        assert!(out.status.success(), "{}", stderr(&out));
        let out = etcdctl(&ep, &["get", k, "--print-value-only"]);
        assert_eq!(stdout(&out).trim(), v);
    }
    let out = etcdctl(&ep, &["get", "k008", "k012", "--keys-only"]);
    let text = stdout(&out);
    let keys: Vec<&str> = text.split_whitespace().collect();
    assert_eq!(keys, ["k008", "k009", "k010", "k011"], "{}", stdout(&out));
    // A key that is already a boundary cannot split again.
    assert_fails(&metastore_ctl(&ep, &["region", "split", "k010"]), 2, "k010");
}

/// `region merge` against a real PD and node: refusals for unknown ids
/// (exit 1, like anything not found), the same id twice and regions that
/// are not adjacent (exit 2, invalid arguments); then an accepted merge,
/// which the node carries out: the region list shows the two regions as
/// one, and etcdctl sees every key before and after.
#[test]
fn region_merge_refusals_and_a_merge() {
    let node = Node::start_dev();
    let ep = node.endpoint();
    let id = |r: &Value| r["id"].as_u64().expect("region id");
    let whole = id(&regions_with_leader(&ep)["regions"][0]);
    assert_fails(
        &metastore_ctl(&ep, &["region", "merge", &whole.to_string(), "999999"]),
        1,
        "metastore-ctl: region not found: region 999999 not found",
    );
    assert_fails(
        &metastore_ctl(
            &ep,
            &["region", "merge", &whole.to_string(), &whole.to_string()],
        ),
        2,
        &format!("cannot merge region {whole} into itself"),
    );

    for k in ["k005", "k015", "k025"] {
        let out = etcdctl(&ep, &["put", k, "v"]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    // Three regions: a [, k010), b [k010, k020), c [k020, ).
    json(&ep, &["region", "split", "k010", "-w", "json"]);
    let split = json(&ep, &["region", "split", "k020", "-w", "json"]);
    let (b, c) = (id(&split["regions"][0]), id(&split["regions"][1]));
    let a = id(&json(&ep, &["region", "show", "k000", "-w", "json"])["regions"][0]);
    assert_fails(
        &metastore_ctl(&ep, &["region", "merge", &a.to_string(), &c.to_string()]),
        2,
        &format!("regions {a} and {c} are not adjacent"),
    );
    assert_fails(
        &metastore_ctl(&ep, &["region", "merge", &c.to_string(), &a.to_string()]),
        2,
        &format!("regions {c} and {a} are not adjacent"),
    );
    // Adjacent ones, given right first: accepted, left into right.
    let asked = json(
        &ep,
        &[
            "region",
            "merge",
            &c.to_string(),
            &b.to_string(),
            "-w",
            "json",
        ],
    );
    assert_eq!((id(&asked["regions"][0]), id(&asked["regions"][1])), (b, c));
    assert_eq!(
        (&asked["source_id"], &asked["target_id"]),
        (&b.into(), &c.into())
    );
    assert!(
        asked["message"]
            .as_str()
            .is_some_and(|m| m.contains("carries it out")),
        "{asked}"
    );
    // The node merges b into c: c takes [k010, ).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let list = json(&ep, &["region", "list", "-w", "json"]);
        let regions = list["regions"].as_array().cloned().unwrap_or_default();
        let ranges: Vec<(u64, String)> = regions
            .iter()
            .map(|r| (id(r), r["start_key"].as_str().unwrap_or("?").to_owned()))
            .collect();
        if ranges == [(a, String::new()), (c, "k010".to_owned())] {
            break;
        }
        assert!(Instant::now() < deadline, "not merged: {list}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = etcdctl(&ep, &["get", "k", "k999", "--keys-only"]);
    let keys: Vec<&str> = std::str::from_utf8(&out.stdout)
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(keys, ["k005", "k015", "k025"], "{}", stderr(&out));
    let out = etcdctl(&ep, &["put", "k012", "after"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn a_node_with_small_limits_splits_itself() {
    let node =
        Node::start_dev_with(&["--region-max-keys", "20", "--split-check-interval", "200ms"]);
    let ep = node.endpoint();
    regions_with_leader(&ep);
    put_keys(&ep, 150);
    let deadline = Instant::now() + Duration::from_secs(60);
    // PD hears of the two sides of a split from two heartbeats: wait until
    // its list is adjacent, in key order, from the start of the keyspace to
    // its end.
    loop {
        let regions = json(&ep, &["region", "list", "-w", "json"]);
        let list = regions["regions"].as_array().cloned().unwrap_or_default();
        let whole = !list.is_empty()
            && list[0]["start_key"] == ""
            && list[list.len() - 1]["end_key"] == ""
            && list
                .windows(2)
                .all(|pair| pair[0]["end_key"] == pair[1]["start_key"]);
        if list.len() >= 5 && whole {
            break;
        }
        assert!(Instant::now() < deadline, "{regions}\n{}", node.log());
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(count_under(&ep, "k"), 150);
    let out = etcdctl(
        &ep,
        &["get", "k", "--prefix", "--keys-only", "--limit", "0"],
    );
    assert_eq!(stdout(&out).split_whitespace().count(), 150);
}
