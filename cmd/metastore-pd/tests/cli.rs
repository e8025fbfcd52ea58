//! Runs the built `metastore-pd` binary.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use pd::{PdClient, RpcPdClient, RpcPdClientConfig};

const BIN: &str = env!("CARGO_BIN_EXE_metastore-pd");

fn run(args: &[&str], cwd: &Path) -> Output {
    Command::new(BIN)
        .args(args)
        .current_dir(cwd)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run metastore-pd")
}

/// The process failed with exactly one `error:` line mentioning `needle`,
/// and without a panic.
fn assert_one_line_error(out: &Output, needle: &str) {
    assert!(!out.status.success(), "unexpected success");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    assert!(!stderr.contains("backtrace"), "backtrace: {stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(errors.len(), 1, "stderr: {stderr}");
    assert!(errors[0].contains(needle), "{needle:?} not in: {stderr}");
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn occupied_port_is_a_one_line_error() {
    let dir = tempfile::tempdir().unwrap();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let url = format!("http://{addr}");
    let out = run(
        &["--listen-client-urls", &url, "--data-dir", "d"],
        dir.path(),
    );
    assert_one_line_error(&out, &format!("address already in use: {addr}"));
}

#[test]
fn flag_errors_are_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let cwd = dir.path();
    assert_one_line_error(
        &run(
            &[
                "--initial-cluster",
                "a=http://127.0.0.1:1,b=http://127.0.0.1:2",
            ],
            cwd,
        ),
        "no member named \"default\"",
    );
    let bad_clusters = [
        (
            "a=http://127.0.0.1:1,a=http://127.0.0.1:2,b=http://127.0.0.1:3",
            "appears more than once",
        ),
        ("a=http://127.0.0.1:1,b", "not of the form name=peer-url"),
        ("a=http://127.0.0.1:1,b=127.0.0.1:2", "invalid URL"),
        ("a=http://127.0.0.1:1,b=http://127.0.0.1", "no port"),
        ("a=http://127.0.0.1:1,=http://127.0.0.1:2", "has no name"),
        (",", "no member given"),
    ];
    for (ic, needle) in bad_clusters {
        let out = run(&["--name", "a", "--initial-cluster", ic], cwd);
        assert_one_line_error(&out, needle);
        assert_eq!(out.status.code(), Some(1), "{ic}");
    }
    assert_one_line_error(
        &run(&["--listen-client-urls", "127.0.0.1:2479"], cwd),
        "--listen-client-urls",
    );
    assert_one_line_error(
        &run(&["--listen-client-urls", "http://127.0.0.1:notaport"], cwd),
        "invalid URL",
    );
    assert_one_line_error(
        &run(&["--listen-peer-urls", "https://127.0.0.1:2480"], cwd),
        "TLS",
    );
    assert_one_line_error(
        &run(
            &[
                "--name",
                "x",
                "--initial-cluster",
                "y=http://127.0.0.1:2480",
            ],
            cwd,
        ),
        "no member named",
    );
    assert_one_line_error(&run(&["--no-such-flag"], cwd), "--no-such-flag");
    // Nothing was created by the failed starts.
    assert!(!cwd.join("default.metastore-pd").exists());
}

#[test]
fn unusable_data_dir_is_a_one_line_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("file"), b"not a dir").unwrap();
    let url = format!("http://127.0.0.1:{}", free_port());
    assert_one_line_error(
        &run(
            &["--listen-client-urls", &url, "--data-dir", "file"],
            dir.path(),
        ),
        "data dir",
    );
}

fn spawn(cwd: &Path, url: &str) -> Child {
    Command::new(BIN)
        .args(["--listen-client-urls", url, "--name", "pd1"])
        .current_dir(cwd)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn metastore-pd")
}

async fn connect(url: &str) -> RpcPdClient {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match RpcPdClient::connect(&[url], RpcPdClientConfig::default()).await {
            Ok(c) => return c,
            Err(e) if Instant::now() > deadline => panic!("PD did not come up: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

fn stop(child: Child, sig: &str) -> Output {
    let status = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    child.wait_with_output().expect("wait")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_shutdown_on_signals_keeps_revisions_exact() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("http://127.0.0.1:{}", free_port());

    let child = spawn(dir.path(), &url);
    let pd = connect(&url).await;
    let first = pd.alloc_revisions(5).await.unwrap();
    assert_eq!(first, 2);
    // A second instance on the same data dir is refused, not corrupting it.
    let other = format!("http://127.0.0.1:{}", free_port());
    assert_one_line_error(
        &run(
            &["--listen-client-urls", &other, "--name", "pd1"],
            dir.path(),
        ),
        "another metastore-pd",
    );
    let cluster_id = pd.cluster_id().await.unwrap();
    drop(pd);
    let out = stop(child, "-TERM");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Default data dir, named after --name.
    assert!(dir.path().join("pd1.metastore-pd").is_dir());

    let child = spawn(dir.path(), &url);
    let pd = connect(&url).await;
    assert_eq!(pd.cluster_id().await.unwrap(), cluster_id);
    assert_eq!(pd.current_revision().await.unwrap(), 6);
    assert_eq!(pd.alloc_revisions(1).await.unwrap(), 7);
    drop(pd);
    let out = stop(child, "-INT");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A crash (SIGKILL) skips ahead but never goes back.
    let child = spawn(dir.path(), &url);
    let pd = connect(&url).await;
    assert_eq!(pd.alloc_revisions(1).await.unwrap(), 8);
    drop(pd);
    let _ = stop(child, "-KILL");
    let child = spawn(dir.path(), &url);
    let pd = connect(&url).await;
    assert!(pd.alloc_revisions(1).await.unwrap() > 8);
    drop(pd);
    let out = stop(child, "-TERM");
    assert!(out.status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_member_initial_cluster_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let client = format!("http://127.0.0.1:{}", free_port());
    let peers: Vec<String> = (0..3)
        .map(|_| format!("http://127.0.0.1:{}", free_port()))
        .collect();
    let ic = format!("b={},a={},c={}", peers[1], peers[0], peers[2]);
    let child = Command::new(BIN)
        .args(["--name", "a", "--data-dir", "a"])
        .args(["--listen-client-urls", &client])
        .args(["--listen-peer-urls", &peers[0]])
        .args(["--initial-cluster", &ic])
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn metastore-pd");
    // Alone it has no quorum, but it runs and reports the members.
    let deadline = Instant::now() + Duration::from_secs(20);
    let members = loop {
        match proto::pdpb::pd_client::PdClient::connect(client.clone()).await {
            Ok(mut c) => {
                let r = c
                    .get_members(proto::pdpb::GetMembersRequest { header: None })
                    .await
                    .unwrap()
                    .into_inner();
                break r;
            }
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("member did not come up: {e}"),
        }
    };
    let mut names: Vec<String> = members.members.iter().map(|m| m.name.clone()).collect();
    names.sort();
    assert_eq!(names, ["a", "b", "c"]);
    assert_ne!(members.header.unwrap().cluster_id, 0);
    let out = stop(child, "-TERM");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
