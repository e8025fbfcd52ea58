//! metastore-bench end to end: each subcommand runs briefly against a dev
//! node (and against etcd when it is installed) and its JSON report must
//! account for every request. No timing assertions: only counts.

use serde_json::Value;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use test_support::{bin_path, Etcd, Node};

const RUN_LIMIT: Duration = Duration::from_secs(120);

/// Runs the bench with `--output json` and returns its report.
fn bench(endpoint: &str, args: &[&str]) -> Value {
    let bin = bin_path("metastore-bench");
    assert!(
        bin.exists(),
        "{} is missing: build it first with `cargo build -p metastore-bench`",
        bin.display()
    );
    let mut child = Command::new(&bin)
        .arg("--endpoints")
        .arg(endpoint)
        .arg("--output")
        .arg("json")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if start.elapsed() > RUN_LIMIT => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("metastore-bench {args:?} did not finish within {RUN_LIMIT:?}");
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => panic!("waiting for metastore-bench: {e}"),
        }
    }
    let out = child.wait_with_output().expect("collect bench output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "metastore-bench {args:?} failed ({}):\n{stderr}",
        out.status
    );
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("bad JSON from {args:?} ({e}):\n{stdout}\nstderr:\n{stderr}"))
}

fn n(v: &Value, field: &str) -> u64 {
    v[field]
        .as_u64()
        .unwrap_or_else(|| panic!("no integer {field:?} in {v}"))
}

/// Asserts every request was made and succeeded, and the report's numbers
/// are present.
fn assert_all_ok(what: &str, v: &Value, total: u64) {
    assert_eq!(n(v, "total"), total, "{what}: total in {v}");
    assert_eq!(n(v, "errors"), 0, "{what}: errors in {v}");
    assert_eq!(n(v, "succeeded"), total, "{what}: succeeded in {v}");
    let hist: u64 = v["histogram"]
        .as_array()
        .unwrap_or_else(|| panic!("{what}: no histogram in {v}"))
        .iter()
        .map(|b| b["count"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(hist, total, "{what}: histogram counts in {v}");
    for k in ["avg", "p50", "p90", "p99", "p999"] {
        assert!(
            v["latency_ms"][k].is_number(),
            "{what}: latency_ms.{k} in {v}"
        );
    }
    assert!(
        v["requests_per_sec"].as_f64().is_some_and(|r| r > 0.0),
        "{what}: {v}"
    );
}

/// True (after saying so) when the server lacks the service: the bench
/// must then have counted every request as an error of that kind.
fn check_kv_subcommands(ep: &str) {
    let v = bench(
        ep,
        &[
            "--conns=2",
            "--clients=5",
            "put",
            "--total=300",
            "--key-space-size=100",
            "--sequential-keys",
            "--val-size=64",
        ],
    );
    assert_all_ok("put", &v, 300);
    assert_eq!(v["command"], "put");
    assert_eq!((n(&v, "conns"), n(&v, "clients")), (2, 5));

    let v = bench(
        ep,
        &[
            "--clients=3",
            "put",
            "--total=50",
            "--key-space-size=10",
            "--rate=1000",
        ],
    );
    assert_all_ok("put --rate", &v, 50);

    for c in ["l", "s"] {
        let v = bench(
            ep,
            &[
                "--conns=2",
                "--clients=4",
                "range",
                "a",
                "z",
                "--consistency",
                c,
                "--total=200",
                "--limit=10",
            ],
        );
        assert_all_ok(&format!("range --consistency {c}"), &v, 200);
    }
    let v = bench(ep, &["range", "no-such-key", "--total=20"]);
    assert_all_ok("range of a missing key", &v, 20);

    let v = bench(
        ep,
        &[
            "--conns=2",
            "--clients=4",
            "txn-put",
            "--txn-ops=3",
            "--key-space-size=20",
            "--total=150",
        ],
    );
    assert_all_ok("txn-put", &v, 150);

    let v = bench(
        ep,
        &[
            "--conns=2",
            "--clients=4",
            "txn-mixed",
            "--total=200",
            "--rw-ratio=3",
            "--key-space-size=30",
            "--limit=5",
        ],
    );
    assert_all_ok("txn-mixed", &v, 200);
    let (r, w) = (&v["parts"]["read"], &v["parts"]["write"]);
    assert_eq!(n(r, "total") + n(w, "total"), 200, "txn-mixed parts: {v}");
    assert_eq!(n(r, "errors") + n(w, "errors"), 0, "txn-mixed parts: {v}");

    let v = bench(
        ep,
        &[
            "--clients=2",
            "txn-mixed",
            "--total=40",
            "--consistency=s",
            "--rw-ratio=0",
        ],
    );
    assert_all_ok("txn-mixed writes only", &v, 40);
    assert_eq!(n(&v["parts"]["write"], "total"), 40, "{v}");
}

fn check_watch(ep: &str) {
    // 2 streams x 3 watchers over 2 keys: watcher g watches key g % 2, so
    // each key has 3 watchers; 20 puts give 10 per key, hence 60 events.
    let v = bench(
        ep,
        &[
            "--conns=2",
            "--clients=2",
            "watch",
            "--streams=2",
            "--watch-per-stream=3",
            "--watched-key-total=2",
            "--put-total=20",
            "--event-timeout=20s",
        ],
    );
    assert_eq!(n(&v, "events_expected"), 60, "{v}");
    assert_eq!(n(&v, "watchers"), 6, "{v}");
    assert_all_ok("watch events", &v, 60);
    assert_all_ok("watch-create", &v["parts"]["watch-create"], 6);
    assert_all_ok("watch puts", &v["parts"]["put"], 20);
}

fn check_lease(ep: &str) {
    let v = bench(
        ep,
        &["--conns=2", "--clients=3", "lease-keepalive", "--total=120"],
    );
    assert_all_ok("lease-keepalive", &v, 120);
}

#[test]
fn bench_subcommands_against_dev_node() {
    let node = Node::start_dev();
    let ep = node.endpoint();
    check_kv_subcommands(&ep);
    check_watch(&ep);
    check_lease(&ep);
}

#[test]
fn bench_subcommands_against_etcd() {
    if Command::new("etcd").arg("--version").output().is_err() {
        println!("SKIP: etcd is not installed (apt-get install etcd-server)");
        return;
    }
    let etcd = Etcd::start();
    let ep = etcd.endpoint();
    check_kv_subcommands(&ep);
    check_watch(&ep);
    check_lease(&ep);
}

#[test]
fn bench_reports_unreachable_endpoint_cleanly() {
    let bin = bin_path("metastore-bench");
    assert!(bin.exists(), "{} is missing", bin.display());
    // Port 1 on loopback: nothing listens there, so the dial fails at once.
    let out = Command::new(&bin)
        .args([
            "--endpoints",
            "127.0.0.1:1",
            "--dial-timeout",
            "2s",
            "put",
            "--total=1",
        ])
        .output()
        .expect("run metastore-bench");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("dial"), "stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "stderr: {stderr}");
}
