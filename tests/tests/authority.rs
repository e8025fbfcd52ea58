//! Endpoints given with their scheme: Go's etcd clientv3 3.4 (Debian's
//! etcdctl 3.4) sends `http://127.0.0.1:2379` verbatim as the HTTP/2
//! `:authority` of Maintenance calls (Status, HashKV, Defragment,
//! MoveLeader, Snapshot). etcd accepts those streams; MetaStore's HTTP/2
//! layer (h2, patched in third_party/h2) must too, and must still reject
//! every other malformed authority.
//!
//! The etcdctl commands run against a MetaStore dev node and, as the
//! reference, against a real etcd; a raw HTTP/2 client then sends chosen
//! `:authority` values to the node and checks which streams are answered and
//! which are reset as malformed.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Output;
use std::time::Duration;

use test_support::{etcdctl, Etcd, Node};

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn ok(endpoint: &str, args: &[&str]) -> String {
    assert!(endpoint.starts_with("http://"), "{endpoint}");
    let out = etcdctl(endpoint, args);
    assert!(
        out.status.success(),
        "etcdctl --endpoints={endpoint} {args:?} failed: {}",
        text(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The Maintenance commands of etcdctl 3.4 with `--endpoints=http://…`,
/// which every server must answer. Returns the member id.
fn maintenance_commands_succeed(endpoint: &str) -> u64 {
    ok(endpoint, &["put", "a", "1"]);
    let health = etcdctl(endpoint, &["endpoint", "health"]);
    assert!(
        health.status.success() && text(&health).contains("is healthy"),
        "{}",
        text(&health)
    );

    let status = ok(endpoint, &["endpoint", "status", "-w", "json"]);
    let v: serde_json::Value = serde_json::from_str(&status).expect("status json");
    assert_eq!(v[0]["Endpoint"], endpoint, "{status}");
    let s = &v[0]["Status"];
    assert!(s["raftTerm"].as_u64().unwrap_or(0) >= 1, "{status}");
    let member_id = s["header"]["member_id"].as_u64().expect("member id");
    assert_eq!(s["leader"].as_u64(), Some(member_id), "{status}");

    let hash = ok(endpoint, &["endpoint", "hashkv", "-w", "json"]);
    let v: serde_json::Value = serde_json::from_str(&hash).expect("hashkv json");
    assert!(v[0]["HashKV"]["hash"].as_u64().is_some(), "{hash}");

    let defrag = ok(endpoint, &["defrag"]);
    assert!(defrag.contains("Finished defragmenting"), "{defrag}");

    // The only member leads already: the transfer is a no-op that succeeds.
    let moved = ok(endpoint, &["move-leader", &format!("{member_id:x}")]);
    assert!(moved.contains("Leadership transferred"), "{moved}");
    member_id
}

#[test]
fn etcdctl_maintenance_with_scheme_endpoint() {
    let node = Node::start_dev();
    let ep = node.endpoint();
    maintenance_commands_succeed(&ep);
    // Snapshot is not implemented: the stream reaches the service and gets
    // its answer (not a reset of the stream as malformed).
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("snap.db");
    let out = etcdctl(&ep, &["snapshot", "save", file.to_str().expect("path")]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("snapshot is not supported yet"),
        "{}",
        text(&out)
    );
    assert!(node.is_running(), "{}", node.log());
}

/// The reference: a real etcd answers the same commands.
#[test]
fn etcd_answers_the_same_commands() {
    let etcd = Etcd::start();
    let ep = etcd.endpoint();
    maintenance_commands_succeed(&ep);
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("snap.db");
    let out = etcdctl(&ep, &["snapshot", "save", file.to_str().expect("path")]);
    assert!(out.status.success(), "{}", text(&out));
}

/// How a server answered one request stream.
#[derive(Debug, PartialEq)]
enum Outcome {
    /// Ended normally; the bytes of DATA received (a gRPC message when the
    /// call succeeded, none for a trailers-only error).
    Answered { data: usize },
    /// Reset with this HTTP/2 error code (1 is PROTOCOL_ERROR).
    Reset(u32),
}

/// HPACK integer with an `n`-bit prefix whose upper bits are `first`.
fn hpack_int(out: &mut Vec<u8>, first: u8, n: u32, mut value: usize) {
    let max = (1usize << n) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128) as u8 | 0x80);
        value /= 128;
    }
    out.push(value as u8);
}

/// Literal header field without indexing, new name, no Huffman coding: the
/// encoding leaves no state in the decoder.
fn hpack_literal(out: &mut Vec<u8>, name: &str, value: &str) {
    out.push(0);
    hpack_int(out, 0, 7, name.len());
    out.extend_from_slice(name.as_bytes());
    hpack_int(out, 0, 7, value.len());
    out.extend_from_slice(value.as_bytes());
}

fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

const DATA: u8 = 0;
const HEADERS: u8 = 1;
const RST_STREAM: u8 = 3;
const SETTINGS: u8 = 4;
const GOAWAY: u8 = 7;
const END_STREAM: u8 = 1;
const END_HEADERS: u8 = 4;
const ACK: u8 = 1;

/// Calls `/etcdserverpb.Maintenance/Status` on `addr` over a new HTTP/2
/// connection with `authority` as the `:authority`.
fn status_call(addr: &str, authority: &str) -> Outcome {
    let mut conn = TcpStream::connect(addr).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    frame(&mut out, SETTINGS, 0, 0, &[]);
    let mut block = Vec::new();
    hpack_literal(&mut block, ":method", "POST");
    hpack_literal(&mut block, ":scheme", "http");
    hpack_literal(&mut block, ":path", "/etcdserverpb.Maintenance/Status");
    hpack_literal(&mut block, ":authority", authority);
    hpack_literal(&mut block, "content-type", "application/grpc");
    hpack_literal(&mut block, "te", "trailers");
    frame(&mut out, HEADERS, END_HEADERS, 1, &block);
    // An empty StatusRequest: uncompressed, length 0.
    frame(&mut out, DATA, END_STREAM, 1, &[0, 0, 0, 0, 0]);
    conn.write_all(&out).expect("send request");

    let mut data = 0;
    loop {
        let mut head = [0u8; 9];
        conn.read_exact(&mut head)
            .unwrap_or_else(|e| panic!("read frame ({authority:?}): {e}"));
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let (kind, flags) = (head[3], head[4]);
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let mut payload = vec![0u8; len];
        conn.read_exact(&mut payload).expect("read payload");
        match (kind, stream) {
            (SETTINGS, 0) if flags & ACK == 0 => {
                let mut ack = Vec::new();
                frame(&mut ack, SETTINGS, ACK, 0, &[]);
                conn.write_all(&ack).expect("settings ack");
            }
            (GOAWAY, 0) => panic!("connection closed ({authority:?}): {payload:?}"),
            (RST_STREAM, 1) => {
                return Outcome::Reset(u32::from_be_bytes(
                    payload[..4].try_into().expect("error code"),
                ))
            }
            (DATA, 1) => {
                data += len;
                if flags & END_STREAM != 0 {
                    return Outcome::Answered { data };
                }
            }
            (HEADERS, 1) if flags & END_STREAM != 0 => return Outcome::Answered { data },
            _ => {}
        }
    }
}

#[test]
fn raw_http2_authority_forms() {
    let node = Node::start_dev();
    let addr = node.endpoint().trim_start_matches("http://").to_owned();
    let port = addr.rsplit(':').next().expect("port").to_owned();

    // Answered with a StatusResponse: the plain authority, as always, and
    // the scheme form Go's clientv3 3.4 sends (with or without a final `/`).
    for authority in [
        addr.clone(),
        format!("localhost:{port}"),
        format!("http://{addr}"),
        format!("https://{addr}"),
        format!("http://{addr}/"),
        format!("http://localhost:{port}"),
    ] {
        match status_call(&addr, &authority) {
            Outcome::Answered { data } if data > 5 => {}
            other => panic!("{authority:?}: {other:?}\n{}", node.log()),
        }
    }

    // Still malformed: anything else that is not a valid authority.
    for authority in [
        format!("http://{addr}/etcdserverpb"),
        format!("http://{addr}?x=1"),
        format!("http://{addr}#x"),
        format!("http://user@{addr}"),
        format!("ftp://{addr}"),
        format!("HTTP://{addr}"),
        format!("http:/{addr}"),
        format!("http://http://{addr}"),
        "http://".to_owned(),
        "http:///".to_owned(),
        format!("{addr}/"),
        format!("{addr} x"),
    ] {
        assert_eq!(
            status_call(&addr, &authority),
            Outcome::Reset(1),
            "{authority:?} must be reset as malformed (PROTOCOL_ERROR)"
        );
    }
    assert!(node.is_running(), "{}", node.log());
}
