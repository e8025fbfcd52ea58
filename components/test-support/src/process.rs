//! Real server processes for the process-level tests: `metastore-node`,
//! `metastore-pd` and Debian's `etcd`, each on free loopback ports with a
//! throw-away data directory, plus `etcdctl`, `metastore-ctl` and an
//! `etcd-client` helper.
//!
//! Contracts:
//! - A server's constructor returns once the process listens on its client
//!   port; a process that exits first fails the test with its log tail.
//! - `kill9` is SIGKILL (no flush, no clean-up); `restart` starts the same
//!   binary again on the same ports and data directory; `pause`/`resume` are
//!   SIGSTOP/SIGCONT (`pause` returns once the kernel reports the process
//!   stopped).
//! - On drop every process is killed (resumed first if paused) and waited
//!   for, then its temporary directory (data and log) is removed.
//! - Binaries are found next to the test executable (see [`bin_path`]), so
//!   `cargo build --workspace --bins` must have run into the same target
//!   directory.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use pd::{PdClient, RpcPdClient};
use proto::metapb::{PeerRole, Region};
use proto::pdpb::{pd_client::PdClient as PdGrpcClient, GetMembersRequest};

/// Path of a workspace binary in the cargo target directory the running
/// test was built into: test executables live in `target/<profile>/deps/`
/// (integration and unit tests of every crate) and binaries in
/// `target/<profile>/`, so the nearest ancestor of the executable holding
/// `name` is taken.
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let found = exe
        .ancestors()
        .skip(1)
        .take(3)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file());
    match found {
        Some(path) => path,
        None => panic!(
            "{name} is missing next to {}: build the workspace binaries first \
             (cargo build --workspace --bins, same CARGO_TARGET_DIR)",
            exe.display()
        ),
    }
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

/// The last 15 lines of a log file.
fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let tail: Vec<&str> = text.lines().rev().take(15).collect();
    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
}

/// Waits until `child` listens on `port`; if it exits first, panics with
/// the tail of its log (the reason is usually its last line).
fn wait_for_port(port: u16, child: &mut Child, what: &str, log: &Path) {
    let exited = |status: ExitStatus| -> ! {
        panic!(
            "{what} exited early with {status}; log tail:\n{}",
            log_tail(log)
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

/// Opens (appending) the log file a server's stderr goes to.
fn open_log(path: &Path) -> std::fs::File {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("log file {}: {e}", path.display()))
}

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) has no memory-safety preconditions; the pid is a
    // child of this process that has not been waited for yet, so it cannot
    // have been reused.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// Whether /proc reports `pid` as stopped (state `T`).
fn is_stopped(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the command name, which is in parentheses.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .is_some_and(|state| state == "T" || state == "t")
}

/// One server process: the child while it runs, and whether it is paused.
/// Killed on drop.
#[derive(Default)]
struct ServerProcess {
    child: Option<Child>,
    paused: bool,
}

impl ServerProcess {
    fn is_running(&self) -> bool {
        self.child.is_some()
    }

    fn set(&mut self, child: Child) {
        self.child = Some(child);
        self.paused = false;
    }

    /// SIGKILL and wait; a paused process gets SIGCONT first.
    fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            if self.paused {
                signal(child.id(), libc::SIGCONT);
                self.paused = false;
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOP; returns once the process is stopped (or after 2 s).
    fn pause(&mut self, what: &str) {
        let child = self
            .child
            .as_ref()
            .unwrap_or_else(|| panic!("{what} is not running"));
        if self.paused {
            return;
        }
        let pid = child.id();
        signal(pid, libc::SIGSTOP);
        self.paused = true;
        let deadline = Instant::now() + Duration::from_secs(2);
        while !is_stopped(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// SIGCONT of a paused process; a no-op otherwise.
    fn resume(&mut self) {
        if let (Some(child), true) = (&self.child, self.paused) {
            signal(child.id(), libc::SIGCONT);
        }
        self.paused = false;
    }

    /// SIGTERM and wait for the exit.
    fn stop(&mut self, what: &str) -> ExitStatus {
        self.resume();
        let mut child = self
            .child
            .take()
            .unwrap_or_else(|| panic!("{what} is not running"));
        signal(child.id(), libc::SIGTERM);
        child
            .wait()
            .unwrap_or_else(|e| panic!("wait for {what}: {e}"))
    }

    /// Waits up to `timeout` for the process to exit on its own.
    fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut()?;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                self.paused = false;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A `metastore-node` on free ports: in dev mode (embedded PD) unless its
/// flags name `--pd-endpoints`.
pub struct Node {
    // Dropped before `dir`: the process dies before its data is removed.
    process: ServerProcess,
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
    extra_args: Vec<String>,
}

impl Node {
    pub fn start_dev() -> Node {
        Self::start_dev_with(&[])
    }

    /// Starts a node with additional command-line flags.
    pub fn start_dev_with(extra_args: &[&str]) -> Node {
        Self::start_with_peer_port(free_port(), extra_args)
    }

    /// Starts a node listening for peers on `peer_port`, with additional
    /// command-line flags.
    pub fn start_with_peer_port(peer_port: u16, extra_args: &[&str]) -> Node {
        let mut node = Node {
            process: ServerProcess::default(),
            dir: tempfile::tempdir().expect("temp dir"),
            client_port: free_port(),
            peer_port,
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
        };
        node.spawn();
        node
    }

    fn spawn(&mut self) {
        let client_url = self.endpoint();
        let peer_url = format!("http://127.0.0.1:{}", self.peer_port);
        let log = self.dir.path().join("node.log");
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
            .stderr(open_log(&log))
            .spawn()
            .expect("spawn metastore-node");
        wait_for_port(self.client_port, &mut child, "metastore-node", &log);
        self.process.set(child);
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

    /// Whether the process runs (paused or not).
    pub fn is_running(&self) -> bool {
        self.process.is_running()
    }

    pub fn is_paused(&self) -> bool {
        self.process.paused
    }

    /// SIGKILL: no chance to flush or clean up.
    pub fn kill9(&mut self) {
        self.process.kill9();
    }

    /// SIGSTOP: the process keeps its sockets but runs no code.
    pub fn pause(&mut self) {
        self.process.pause("metastore-node");
    }

    /// SIGCONT after [`Node::pause`].
    pub fn resume(&mut self) {
        self.process.resume();
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) -> ExitStatus {
        self.process.stop("metastore-node")
    }

    /// SIGTERM without waiting (see [`Node::wait_exit`]).
    pub fn terminate(&self) {
        if let Some(child) = &self.process.child {
            signal(child.id(), libc::SIGTERM);
        }
    }

    /// Waits up to `timeout` for the node to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.process.wait_exit(timeout)
    }

    /// Starts the node again on the same ports and data directory.
    pub fn restart(&mut self) {
        assert!(!self.is_running(), "stop or kill the node first");
        self.spawn();
    }
}

/// A `metastore-pd` placement driver on free ports: a single member, or one
/// member of a cluster started with [`Pd::start_cluster`].
pub struct Pd {
    process: ServerProcess,
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
    name: String,
    /// `--initial-cluster`, if a member of a multi-member PD.
    initial_cluster: Option<String>,
    extra_args: Vec<String>,
}

impl Pd {
    pub fn start() -> Pd {
        let mut pd = Self::unstarted("default".to_owned());
        pd.spawn();
        pd
    }

    fn unstarted(name: String) -> Pd {
        Pd {
            process: ServerProcess::default(),
            dir: tempfile::tempdir().expect("temp dir"),
            client_port: free_port(),
            peer_port: free_port(),
            name,
            initial_cluster: None,
            extra_args: Vec::new(),
        }
    }

    /// Starts `n` members (`pd1`..) forming one PD cluster.
    pub fn start_cluster(n: usize) -> Vec<Pd> {
        Self::start_cluster_with(n, |_, _| Vec::new())
    }

    /// Like [`Pd::start_cluster`]; member `i` (from 0) gets the extra flags
    /// `extra(i, client_port)`, e.g. an `--advertise-client-urls` of a proxy
    /// in front of its client port.
    pub fn start_cluster_with(
        n: usize,
        mut extra: impl FnMut(usize, u16) -> Vec<String>,
    ) -> Vec<Pd> {
        let mut pds: Vec<Pd> = (1..=n).map(|i| Self::unstarted(format!("pd{i}"))).collect();
        let initial = pds
            .iter()
            .map(|p| format!("{}=http://127.0.0.1:{}", p.name, p.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        for (i, p) in pds.iter_mut().enumerate() {
            p.initial_cluster = Some(initial.clone());
            p.extra_args = extra(i, p.client_port);
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
        let log = self.dir.path().join("pd.log");
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
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(open_log(&log))
            .spawn()
            .expect("spawn metastore-pd");
        wait_for_port(self.client_port, &mut child, "metastore-pd", &log);
        self.process.set(child);
    }

    /// The member's own client URL (never a proxy's).
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    pub fn is_running(&self) -> bool {
        self.process.is_running()
    }

    pub fn kill9(&mut self) {
        self.process.kill9();
    }

    pub fn restart(&mut self) {
        assert!(!self.is_running(), "kill the PD first");
        self.spawn();
    }
}

/// Asks every running member of a PD cluster directly (not through any
/// proxy it advertises) which member leads, and returns the index in `pds`
/// of a member that names itself: only a leader holding its lease does (a
/// follower may still name a leader that died). `None` if none does within
/// `timeout`.
pub async fn try_pd_leader(pds: &[Pd], timeout: Duration) -> Option<usize> {
    let deadline = Instant::now() + timeout;
    loop {
        for (i, p) in pds.iter().enumerate().filter(|(_, p)| p.is_running()) {
            let ask = async {
                let mut c = PdGrpcClient::connect(p.endpoint()).await.ok()?;
                let r = c
                    .get_members(GetMembersRequest { header: None })
                    .await
                    .ok()?;
                r.into_inner().leader.map(|l| l.name)
            };
            if let Ok(Some(name)) = tokio::time::timeout(Duration::from_millis(500), ask).await {
                if name == p.name {
                    return Some(i);
                }
            }
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// [`try_pd_leader`] waiting up to 20 s; panics if no leader is named.
pub async fn pd_leader(pds: &[Pd]) -> usize {
    try_pd_leader(pds, Duration::from_secs(20))
        .await
        .expect("no PD leader")
}

/// Waits (up to 60 s) until PD reports the region over the whole keyspace
/// with `voters` voters, no learner, and a leader; returns the region.
pub async fn wait_for_voters(pd: &RpcPdClient, voters: usize) -> Region {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(Some(pd::RegionWithLeader {
            region,
            leader: Some(_),
            ..
        })) = pd.get_region(b"").await
        {
            let v = region
                .peers
                .iter()
                .filter(|p| p.role() == PeerRole::Voter)
                .count();
            if v == voters && v == region.peers.len() {
                return region;
            }
        }
        assert!(
            Instant::now() < deadline,
            "region did not reach {voters} voters: {:?}",
            pd.get_region(b"").await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A real etcd (Debian's `etcd-server`, 3.4) on free ports: a single member
/// for differential tests, or one member of a cluster started with
/// [`Etcd::start_cluster`].
pub struct Etcd {
    process: ServerProcess,
    dir: tempfile::TempDir,
    name: String,
    client_port: u16,
    peer_port: u16,
    initial_cluster: String,
    token: String,
}

impl Etcd {
    pub fn start() -> Etcd {
        let mut etcd = Self::unstarted("default".to_owned());
        etcd.initial_cluster = format!("default={}", etcd.peer_url());
        etcd.spawn();
        etcd.wait_listening();
        etcd
    }

    fn unstarted(name: String) -> Etcd {
        let client_port = free_port();
        Etcd {
            process: ServerProcess::default(),
            dir: tempfile::tempdir().expect("temp dir"),
            name,
            client_port,
            peer_port: free_port(),
            initial_cluster: String::new(),
            token: format!("metastore-test-{client_port}"),
        }
    }

    /// Starts `n` members (`etcd1`..) forming one new etcd cluster. Returns
    /// once every member listens for clients (the cluster may still be
    /// electing its first leader).
    pub fn start_cluster(n: usize) -> Vec<Etcd> {
        let mut members: Vec<Etcd> = (1..=n)
            .map(|i| Self::unstarted(format!("etcd{i}")))
            .collect();
        let initial = members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url()))
            .collect::<Vec<_>>()
            .join(",");
        let token = members[0].token.clone();
        // All spawned before any is waited for: a member needs a quorum.
        for m in &mut members {
            m.initial_cluster = initial.clone();
            m.token = token.clone();
            m.spawn();
        }
        for m in &mut members {
            m.wait_listening();
        }
        members
    }

    fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    fn spawn(&mut self) {
        let client_url = self.endpoint();
        let peer_url = self.peer_url();
        let child = Command::new("etcd")
            .args(["--name", &self.name])
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-token", &self.token])
            .args(["--initial-cluster-state", "new"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(open_log(&self.log_path()))
            .spawn()
            .expect("spawn etcd (apt-get install etcd-server)");
        self.process.set(child);
    }

    fn wait_listening(&mut self) {
        let log = self.log_path();
        let child = self.process.child.as_mut().expect("etcd spawned");
        wait_for_port(self.client_port, child, "etcd", &log);
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// The member's log so far (stderr), for assertion messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn is_running(&self) -> bool {
        self.process.is_running()
    }

    pub fn is_paused(&self) -> bool {
        self.process.paused
    }

    pub fn kill9(&mut self) {
        self.process.kill9();
    }

    pub fn pause(&mut self) {
        self.process.pause("etcd");
    }

    pub fn resume(&mut self) {
        self.process.resume();
    }

    /// Starts the member again on the same ports and data directory (the
    /// initial-cluster flags are ignored once the data dir exists).
    pub fn restart(&mut self) {
        assert!(!self.is_running(), "kill etcd first");
        self.spawn();
        self.wait_listening();
    }
}

/// Runs Debian's `etcdctl` (v3 API) against `endpoint`.
///
/// The endpoint is passed as given, scheme included: etcdctl 3.4 then sends
/// `http://host:port` as the HTTP/2 `:authority` of its Maintenance calls,
/// which the server must accept as etcd does (third_party/h2/PATCH.md).
pub fn etcdctl(endpoint: &str, args: &[&str]) -> Output {
    Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoint}"))
        .arg("--command-timeout=10s")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run etcdctl (apt-get install etcd-client)")
}

/// Runs `metastore-ctl` with `--pd-endpoints pd_endpoints` (a dev node's
/// client URL, or PD members' client URLs) and `args`.
pub fn metastore_ctl(pd_endpoints: &str, args: &[&str]) -> Output {
    Command::new(bin_path("metastore-ctl"))
        .args(["--pd-endpoints", pd_endpoints])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run metastore-ctl")
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
