//! Harness for the process-level tests: starts real `metastore-node` and
//! Debian `etcd` processes on free loopback ports with throw-away data
//! directories, and kills and removes them on drop.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Path of a workspace binary in the cargo target directory the tests were
/// built into (`target/<profile>/deps/test-xxx` → `target/<profile>/NAME`).
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable lives in target/<profile>/deps");
    let path = profile_dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace binaries first (cargo build --workspace --bins)",
        path.display()
    );
    path
}

/// A TCP port on 127.0.0.1 that was free a moment ago and that this test
/// process has not handed out before.
///
/// Ports come from 10000–29999, below Linux's ephemeral range, so no
/// outgoing connection can take one between this call and the server's bind
/// (the OS's own port-0 choice comes from the ephemeral range, where client
/// sockets of the tests themselves compete for it); a per-process counter
/// keeps two servers of one test run from getting the same port.
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const LOW: u32 = 10_000;
    const SPAN: u32 = 20_000;
    let start = std::process::id().wrapping_mul(7919) % SPAN;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        assert!(n < SPAN, "ran out of test ports");
        let port = (LOW + (start + n) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Waits until `child` listens on `port`; if it exits first, panics with
/// the tail of its log (the reason is usually its last line).
fn wait_for_port(port: u16, child: &mut Child, what: &str, log: &Path) {
    let exited = |status: std::process::ExitStatus| -> ! {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(15).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        panic!(
            "{what} exited early with {status}; log tail:\n{}",
            tail.join("\n")
        );
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            // Someone answers on the port; make sure it is our process.
            if let Ok(Some(status)) = child.try_wait() {
                exited(status);
            }
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            exited(status);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what} did not listen on port {port} within 30s");
}

/// A `metastore-node` in dev mode (embedded PD) on free ports.
pub struct Node {
    child: Option<Child>,
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
    extra_args: Vec<String>,
}

impl Node {
    pub fn start_dev() -> Node {
        Self::start_dev_with(&[])
    }

    /// Starts a dev node with additional command-line flags.
    pub fn start_dev_with(extra_args: &[&str]) -> Node {
        Self::start_with_peer_port(free_port(), extra_args)
    }

    /// Starts a node listening for peers on `peer_port`, with additional
    /// command-line flags.
    pub fn start_with_peer_port(peer_port: u16, extra_args: &[&str]) -> Node {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut node = Node {
            child: None,
            dir,
            client_port: free_port(),
            peer_port,
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
        };
        node.spawn();
        node
    }

    fn spawn(&mut self) {
        let client_url = format!("http://127.0.0.1:{}", self.client_port);
        let peer_url = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("node.log"))
            .expect("node log file");
        let mut child = Command::new(bin_path("metastore-node"))
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--advertise-peer-urls", &peer_url])
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn metastore-node");
        wait_for_port(
            self.client_port,
            &mut child,
            "metastore-node",
            &self.dir.path().join("node.log"),
        );
        self.child = Some(child);
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// The node's log so far (stderr), for assertion messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("node.log")).unwrap_or_default()
    }

    /// SIGKILL: no chance to flush or clean up.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("node is running");
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        child.wait().expect("wait for node")
    }

    /// Waits up to `timeout` for the node to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut()?;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// Starts the node again on the same ports and data directory.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop or kill the node first");
        self.spawn();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A `metastore-pd` placement driver on free ports: a single member, or one
/// member of a cluster started with [`Pd::start_cluster`].
pub struct Pd {
    child: Option<Child>,
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
    name: String,
    /// `--initial-cluster`, if a member of a multi-member PD.
    initial_cluster: Option<String>,
}

impl Pd {
    pub fn start() -> Pd {
        let mut pd = Pd {
            child: None,
            dir: tempfile::tempdir().expect("temp dir"),
            client_port: free_port(),
            peer_port: free_port(),
            name: "default".to_owned(),
            initial_cluster: None,
        };
        pd.spawn();
        pd
    }

    /// Starts `n` members (`pd1`..) forming one PD cluster.
    pub fn start_cluster(n: usize) -> Vec<Pd> {
        let mut pds: Vec<Pd> = (1..=n)
            .map(|i| Pd {
                child: None,
                dir: tempfile::tempdir().expect("temp dir"),
                client_port: free_port(),
                peer_port: free_port(),
                name: format!("pd{i}"),
                initial_cluster: None,
            })
            .collect();
        let initial = pds
            .iter()
            .map(|p| format!("{}=http://127.0.0.1:{}", p.name, p.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        for p in &mut pds {
            p.initial_cluster = Some(initial.clone());
            p.spawn();
        }
        pds
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The member's log so far (stderr), for assertion messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("pd.log")).unwrap_or_default()
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("pd.log"))
            .expect("pd log file");
        let mut cmd = Command::new(bin_path("metastore-pd"));
        cmd.arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .args(["--name", &self.name])
            .args(["--listen-client-urls", &self.endpoint()])
            .args([
                "--listen-peer-urls",
                &format!("http://127.0.0.1:{}", self.peer_port),
            ]);
        if let Some(ic) = &self.initial_cluster {
            cmd.args(["--initial-cluster", ic]);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn metastore-pd");
        wait_for_port(
            self.client_port,
            &mut child,
            "metastore-pd",
            &self.dir.path().join("pd.log"),
        );
        self.child = Some(child);
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "kill the PD first");
        self.spawn();
    }
}

impl Drop for Pd {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A real etcd (Debian's `etcd-server`) on free ports, for differential tests.
pub struct Etcd {
    child: Child,
    _dir: tempfile::TempDir,
    client_port: u16,
}

impl Etcd {
    pub fn start() -> Etcd {
        let dir = tempfile::tempdir().expect("temp dir");
        let client_port = free_port();
        let peer_port = free_port();
        let client_url = format!("http://127.0.0.1:{client_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let log = std::fs::File::create(dir.path().join("etcd.log")).expect("etcd log");
        let mut child = Command::new("etcd")
            .args(["--name", "default"])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("default={peer_url}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn etcd (apt-get install etcd-server)");
        wait_for_port(
            client_port,
            &mut child,
            "etcd",
            &dir.path().join("etcd.log"),
        );
        Etcd {
            child,
            _dir: dir,
            client_port,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs Debian's `etcdctl` (v3 API) against `endpoint`.
///
/// The endpoint is passed without its `http://`: etcdctl 3.4's endpoint
/// commands then send it as the HTTP/2 `:authority`, which Go's gRPC server
/// tolerates but Rust's h2 rejects as malformed (see README, known gaps).
pub fn etcdctl(endpoint: &str, args: &[&str]) -> Output {
    let endpoint = endpoint.strip_prefix("http://").unwrap_or(endpoint);
    Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoint}"))
        .arg("--command-timeout=10s")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run etcdctl (apt-get install etcd-client)")
}

/// Connects the `etcd-client` crate to `endpoint`, retrying while the
/// server finishes starting.
pub async fn client(endpoint: &str) -> etcd_client::Client {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match etcd_client::Client::connect([endpoint], None).await {
            Ok(c) => return c,
            Err(e) if Instant::now() > deadline => panic!("connect {endpoint}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}
