//! Debian's etcdctl (v3 API) against a MetaStore dev node: every KV command
//! and the error texts it prints.

use std::io::Write;
use std::process::{Command, Stdio};

use test_support::{etcdctl, Node};

fn ok(endpoint: &str, args: &[&str]) -> String {
    let out = etcdctl(endpoint, args);
    assert!(
        out.status.success(),
        "etcdctl {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn err(endpoint: &str, args: &[&str]) -> String {
    let out = etcdctl(endpoint, args);
    assert!(!out.status.success(), "etcdctl {args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn txn(endpoint: &str, script: &str) -> String {
    let mut child = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoint}"))
        .args(["txn"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("etcdctl");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(script.as_bytes())
        .expect("write txn script");
    let out = child.wait_with_output().expect("etcdctl txn");
    assert!(
        out.status.success(),
        "txn failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn put_get_del_txn_compaction() {
    let node = Node::start_dev();
    let ep = node.endpoint();
    assert_eq!(ok(&ep, &["put", "foo", "bar"]), "OK\n");
    assert_eq!(ok(&ep, &["get", "foo"]), "foo\nbar\n");
    assert_eq!(
        ok(&ep, &["put", "foo", "baz", "--prev-kv"]),
        "OK\nfoo\nbar\n"
    );
    ok(&ep, &["put", "foo1", "v1"]);
    ok(&ep, &["put", "foo2", "v2"]);
    assert_eq!(
        ok(&ep, &["get", "foo", "--prefix", "--keys-only"]),
        "foo\n\nfoo1\n\nfoo2\n\n"
    );
    assert_eq!(
        ok(&ep, &["get", "foo", "--prefix", "--limit=1"]),
        "foo\nbaz\n"
    );
    assert_eq!(
        ok(
            &ep,
            &["get", "foo1", "foo3", "--order=DESCEND", "--sort-by=KEY"]
        ),
        "foo2\nv2\nfoo1\nv1\n"
    );
    // History: revision 2 is the first put.
    assert_eq!(ok(&ep, &["get", "foo", "--rev=2"]), "foo\nbar\n");
    let json = ok(&ep, &["get", "foo", "-w", "json"]);
    let v: serde_json::Value = serde_json::from_str(&json).expect("json output");
    assert_eq!(v["header"]["revision"], 5);
    assert_eq!(v["kvs"][0]["version"], 2);
    assert_eq!(v["kvs"][0]["create_revision"], 2);
    assert_eq!(v["kvs"][0]["mod_revision"], 3);

    let out = txn(
        &ep,
        "value(\"foo\") = \"baz\"\n\nput foo qux\nget foo1\n\nput foo never\n\n",
    );
    assert_eq!(out, "SUCCESS\n\nOK\n\nfoo1\nv1\n");
    assert_eq!(ok(&ep, &["get", "foo", "--print-value-only"]), "qux\n");
    let out = txn(
        &ep,
        "mod(\"foo\") < \"2\"\n\nput foo never\n\nput other x\n\n",
    );
    assert_eq!(out, "FAILURE\n\nOK\n");

    assert_eq!(ok(&ep, &["del", "foo", "--prefix"]), "3\n");
    assert_eq!(ok(&ep, &["del", "nothing"]), "0\n");
    assert_eq!(ok(&ep, &["get", "foo", "--prefix"]), "");

    assert_eq!(ok(&ep, &["compaction", "4"]), "compacted revision 4\n");
    assert!(err(&ep, &["get", "foo", "--rev=3"])
        .contains("etcdserver: mvcc: required revision has been compacted"));
    assert_eq!(ok(&ep, &["get", "foo", "--rev=4"]), "foo\nbaz\n");
    assert!(err(&ep, &["compaction", "4"])
        .contains("etcdserver: mvcc: required revision has been compacted"));
    assert!(err(&ep, &["compaction", "1000"])
        .contains("etcdserver: mvcc: required revision is a future revision"));
    assert!(err(&ep, &["get", "foo", "--rev=1000"])
        .contains("etcdserver: mvcc: required revision is a future revision"));
    assert_eq!(
        ok(&ep, &["compaction", "--physical", "6"]),
        "compacted revision 6\n"
    );
}

#[test]
fn error_texts() {
    let node = Node::start_dev();
    let ep = node.endpoint();
    assert!(err(&ep, &["put", "", "v"]).contains("etcdserver: key is not provided"));
    assert!(err(&ep, &["put", "k", "v", "--lease=1234"])
        .contains("etcdserver: requested lease not found"));
    assert!(err(&ep, &["put", "missing", "--ignore-value"]).contains("etcdserver: key not found"));
}

#[test]
fn endpoint_and_member_commands() {
    let node = Node::start_dev();
    let ep = node.endpoint();
    ok(&ep, &["put", "a", "1"]);
    let health = etcdctl(&ep, &["endpoint", "health"]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&health.stdout),
        String::from_utf8_lossy(&health.stderr)
    );
    assert!(
        health.status.success() && text.contains("is healthy"),
        "{text}"
    );
    let status = ok(&ep, &["endpoint", "status", "-w", "json"]);
    let v: serde_json::Value = serde_json::from_str(&status).expect("status json");
    let s = &v[0]["Status"];
    assert_eq!(s["version"], "3.5.17");
    assert!(s["raftTerm"].as_u64().unwrap_or(0) >= 1, "{status}");
    assert!(s["raftIndex"].as_u64().unwrap_or(0) > 5, "{status}");
    assert!(s["raftAppliedIndex"].as_u64().unwrap_or(0) > 5, "{status}");
    assert_eq!(s["leader"], s["header"]["member_id"], "{status}");
    let members = ok(&ep, &["member", "list"]);
    assert!(members.contains(&ep), "{members}");
    assert!(members.contains("started, default"), "{members}");
    let hash = ok(&ep, &["endpoint", "hashkv", "-w", "json"]);
    assert!(hash.contains("hash"), "{hash}");
    // Services not built yet say so honestly.
    let users = err(&ep, &["user", "list"]);
    assert!(users.to_lowercase().contains("unimplemented"), "{users}");
}
