//! Command line of `metastore-node`: clear one-line errors, config files,
//! HTTP endpoints.

use std::io::Read;
use std::net::TcpListener;
use std::process::{Command, Stdio};

use test_support::{bin_path, free_port, Node};

fn run_node(args: &[&str]) -> (bool, String) {
    let out = Command::new(bin_path("metastore-node"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run metastore-node");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn last_line(s: &str) -> &str {
    s.lines().last().unwrap_or_default()
}

#[test]
fn bad_flags_ports_and_data_dirs_fail_with_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d");
    let data = data.to_str().unwrap();

    let (ok, err) = run_node(&["--no-such-flag"]);
    assert!(!ok);
    assert!(err.contains("--no-such-flag"), "{err}");

    let (ok, err) = run_node(&["--data-dir", data, "--listen-client-urls", "localhost2379"]);
    assert!(!ok);
    assert!(
        last_line(&err).contains("invalid URL \"localhost2379\""),
        "{err}"
    );

    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_url = format!("http://{}", busy.local_addr().unwrap());
    let (ok, err) = run_node(&["--data-dir", data, "--listen-client-urls", &busy_url]);
    assert!(!ok);
    assert!(
        last_line(&err).contains("address already in use")
            || last_line(&err).contains("Address already in use"),
        "{err}"
    );

    let file = dir.path().join("plain-file");
    std::fs::write(&file, b"x").unwrap();
    let free = format!("http://127.0.0.1:{}", free_port());
    let free_peer = format!("http://127.0.0.1:{}", free_port());
    let (ok, err) = run_node(&[
        "--data-dir",
        file.to_str().unwrap(),
        "--listen-client-urls",
        &free,
        "--listen-peer-urls",
        &free_peer,
    ]);
    assert!(!ok);
    assert!(
        last_line(&err).starts_with("metastore-node: cannot use data dir"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");

    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "nmae = \"typo\"\n").unwrap();
    let (ok, err) = run_node(&["--config", cfg.to_str().unwrap()]);
    assert!(!ok);
    assert!(last_line(&err).contains("invalid config file"), "{err}");
}

#[test]
fn second_node_on_same_data_dir_is_refused() {
    let node = Node::start_dev();
    let free = format!("http://127.0.0.1:{}", free_port());
    let free_peer = format!("http://127.0.0.1:{}", free_port());
    let (ok, err) = run_node(&[
        "--data-dir",
        node.data_dir().to_str().unwrap(),
        "--listen-client-urls",
        &free,
        "--listen-peer-urls",
        &free_peer,
    ]);
    assert!(!ok);
    assert!(last_line(&err).contains("cannot use data dir"), "{err}");
}

#[test]
fn config_file_with_flag_names() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg = dir.path().join("node.toml");
    std::fs::write(
        &cfg,
        format!(
            "name = \"cfg-node\"\ndata-dir = \"{}\"\nlisten-client-urls = [\"http://127.0.0.1:{port}\"]\nlisten-peer-urls = [\"http://127.0.0.1:{}\"]\n",
            dir.path().join("data").display(),
            free_port()
        ),
    )
    .unwrap();
    let mut child = Command::new(bin_path("metastore-node"))
        .args(["--config", cfg.to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let endpoint = format!("http://127.0.0.1:{port}");
    let mut listed = String::new();
    for _ in 0..100 {
        let out = test_support::etcdctl(&endpoint, &["member", "list"]);
        if out.status.success() {
            listed = String::from_utf8_lossy(&out.stdout).into_owned();
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let status = child.wait().unwrap();
    let mut log = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut log);
    }
    assert!(listed.contains("cfg-node"), "{listed}\n{log}");
    assert!(status.success(), "SIGTERM is a clean exit: {log}");
}

#[test]
fn http_version_and_health() {
    let node = Node::start_dev();
    let get = |path: &str| {
        let out = Command::new("curl")
            .args(["-s", &format!("{}{}", node.endpoint(), path)])
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let version: serde_json::Value = serde_json::from_str(&get("/version")).unwrap();
    assert_eq!(version["etcdserver"], "3.5.17");
    assert_eq!(version["etcdcluster"], "3.5.0");
    let mut health = serde_json::Value::Null;
    for _ in 0..50 {
        health = serde_json::from_str(&get("/health")).unwrap_or_default();
        if health["health"] == "true" {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(health["health"], "true");
}
