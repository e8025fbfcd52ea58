//! Three PD members in one process, talking raft over real loopback gRPC:
//! election, replication, NOT_LEADER on followers, client failover, and the
//! revision oracle's real-time order across leader changes and partitions.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use pd::{PdClient, PdConfig, PdCore, PdError, RpcPdClient, RpcPdClientConfig};
use proto::metapb;
use proto::pdpb::{self, pd_client::PdClient as GrpcClient};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const TICK: Duration = Duration::from_millis(50);
const ELECTION_TICKS: usize = 10;

struct Member {
    name: String,
    dir: PathBuf,
    client_addr: SocketAddr,
    peer_addr: SocketAddr,
    core: Option<Arc<PdCore>>,
    stops: Vec<oneshot::Sender<()>>,
    servers: Vec<JoinHandle<()>>,
}

struct Cluster {
    _dir: tempfile::TempDir,
    initial: Vec<(String, String)>,
    revision_window: i64,
    members: Vec<Member>,
}

async fn bind() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    (l, a)
}

impl Cluster {
    async fn start(revision_window: i64) -> Cluster {
        Self::start_n(3, revision_window).await
    }

    async fn start_n(n: usize, revision_window: i64) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let mut listeners = Vec::new();
        let mut members = Vec::new();
        for i in 1..=n {
            let (cl, ca) = bind().await;
            let (pl, pa) = bind().await;
            listeners.push((cl, pl));
            members.push(Member {
                name: format!("pd{i}"),
                dir: dir.path().join(format!("pd{i}")),
                client_addr: ca,
                peer_addr: pa,
                core: None,
                stops: Vec::new(),
                servers: Vec::new(),
            });
        }
        let initial = members
            .iter()
            .map(|m| (m.name.clone(), format!("http://{}", m.peer_addr)))
            .collect();
        let mut c = Cluster {
            _dir: dir,
            initial,
            revision_window,
            members,
        };
        for (i, (cl, pl)) in listeners.into_iter().enumerate() {
            c.run(i, cl, pl);
        }
        c
    }

    fn run(&mut self, i: usize, client: TcpListener, peer: TcpListener) {
        let m = &mut self.members[i];
        let mut cfg = PdConfig::new(&m.dir);
        cfg.name = m.name.clone();
        cfg.client_urls = vec![format!("http://{}", m.client_addr)];
        cfg.initial_cluster = self.initial.clone();
        cfg.tick_interval = TICK;
        cfg.election_ticks = ELECTION_TICKS;
        // Small, so that leader changes and crashes cross windows and a
        // member that was down catches up from a snapshot.
        cfg.revision_window = self.revision_window;
        cfg.id_window = 5;
        cfg.log_gc_threshold = 20;
        let core = PdCore::open(cfg).expect("open PD member");
        let (tx1, rx1) = oneshot::channel::<()>();
        let (tx2, rx2) = oneshot::channel::<()>();
        let c = core.clone();
        m.servers.push(tokio::spawn(async move {
            let _ = pd::service::serve(c, client, async {
                let _ = rx1.await;
            })
            .await;
        }));
        let c = core.clone();
        m.servers.push(tokio::spawn(async move {
            let _ = pd::transport::serve_peers(c, vec![peer], async {
                let _ = rx2.await;
            })
            .await;
        }));
        m.stops = vec![tx1, tx2];
        m.core = Some(core);
    }

    /// Like kill -9 for the raft group (no exact positions are recorded),
    /// and the member's ports stop answering.
    async fn crash(&mut self, i: usize) {
        let m = &mut self.members[i];
        if let Some(core) = m.core.take() {
            core.kill();
        }
        for s in m.stops.drain(..) {
            let _ = s.send(());
        }
        for h in m.servers.drain(..) {
            h.abort();
            let _ = h.await;
        }
    }

    async fn restart(&mut self, i: usize) {
        assert!(self.members[i].core.is_none());
        let cl = rebind(self.members[i].client_addr).await;
        let pl = rebind(self.members[i].peer_addr).await;
        self.run(i, cl, pl);
    }

    fn core(&self, i: usize) -> &Arc<PdCore> {
        self.members[i].core.as_ref().expect("member is running")
    }

    fn url(&self, i: usize) -> String {
        format!("http://{}", self.members[i].client_addr)
    }

    fn urls(&self) -> Vec<String> {
        (0..self.members.len()).map(|i| self.url(i)).collect()
    }

    /// The index of the serving leader, waiting for one.
    async fn leader(&self) -> usize {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            for (i, m) in self.members.iter().enumerate() {
                if m.core.as_ref().is_some_and(|c| c.is_serving()) {
                    return i;
                }
            }
            assert!(Instant::now() < deadline, "no PD leader elected");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

async fn rebind(addr: SocketAddr) -> TcpListener {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match TcpListener::bind(addr).await {
            Ok(l) => return l,
            Err(e) if Instant::now() > deadline => panic!("rebind {addr}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

fn client_config() -> RpcPdClientConfig {
    RpcPdClientConfig {
        connect_timeout: Duration::from_secs(1),
        request_timeout: Duration::from_secs(10),
    }
}

fn node(id: u64) -> metapb::Node {
    metapb::Node {
        id,
        name: format!("n{id}"),
        peer_urls: vec![format!("http://127.0.0.1:{}", 3000 + id)],
        client_urls: vec![format!("http://127.0.0.1:{}", 4000 + id)],
        state: metapb::NodeState::Up as i32,
    }
}

fn first_region(id: u64, peer_id: u64, node_id: u64) -> metapb::Region {
    metapb::Region {
        id,
        start_key: vec![],
        end_key: vec![],
        region_epoch: Some(metapb::RegionEpoch {
            conf_ver: 1,
            version: 1,
        }),
        peers: vec![metapb::Peer {
            id: peer_id,
            node_id,
            role: metapb::PeerRole::Voter as i32,
        }],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_members_replicate_and_fail_over() {
    let mut c = Cluster::start(50).await;
    let l = c.leader().await;
    let leader_name = c.members[l].name.clone();

    // Every member reports all three members and the leader with its
    // client URL; followers refuse everything else with NOT_LEADER.
    for i in 0..3 {
        let mut g = GrpcClient::connect(c.url(i)).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let members = loop {
            let m = g
                .get_members(pdpb::GetMembersRequest { header: None })
                .await
                .unwrap()
                .into_inner();
            // A member learns the others' client URLs from raft traffic.
            if m.leader.as_ref().is_some_and(|l| !l.client_urls.is_empty())
                && m.members.iter().all(|m| !m.client_urls.is_empty())
            {
                break m;
            }
            assert!(Instant::now() < deadline, "member {i} knows no leader");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(members.members.len(), 3);
        for (j, m) in c.members.iter().enumerate() {
            let reported = members.members.iter().find(|x| x.name == m.name).unwrap();
            assert_eq!(reported.client_urls, vec![c.url(j)]);
        }
        let leader = members.leader.unwrap();
        assert_eq!(leader.name, leader_name);
        assert_eq!(leader.client_urls, vec![c.url(l)]);
        if i != l {
            let r = g
                .alloc_revisions(pdpb::AllocRevisionsRequest {
                    header: None,
                    count: 1,
                })
                .await
                .unwrap()
                .into_inner();
            let e = r.header.unwrap().error.expect("follower must refuse");
            assert_eq!(e.r#type, pdpb::ErrorType::NotLeader as i32);
            assert!(e.message.contains(&leader_name), "{}", e.message);
            assert!(matches!(
                c.core(i).alloc_id().await,
                Err(PdError::NotLeader(_))
            ));
            assert!(matches!(
                c.core(i).get_all_nodes().await,
                Err(PdError::NotLeader(_))
            ));
        }
    }

    // A client given every endpoint finds the leader by itself.
    let pd = RpcPdClient::connect(&c.urls(), client_config())
        .await
        .unwrap();
    let node_id = pd.alloc_id().await.unwrap();
    let region_id = pd.alloc_id().await.unwrap();
    let peer_id = pd.alloc_id().await.unwrap();
    pd.bootstrap(node(node_id), first_region(region_id, peer_id, node_id))
        .await
        .unwrap();
    let n2 = node(pd.alloc_id().await.unwrap());
    pd.put_node(n2.clone()).await.unwrap();
    let mut ids = vec![node_id, region_id, peer_id, n2.id];
    for _ in 0..12 {
        ids.push(pd.alloc_id().await.unwrap());
    }
    let mut last_rev = 0;
    for _ in 0..30 {
        let r = pd.alloc_revisions(7).await.unwrap();
        assert!(r > last_rev);
        last_rev = r + 6;
    }

    // Leader gone: a new one has everything, and the client follows it.
    c.crash(l).await;
    let started = Instant::now();
    let r = pd.alloc_revisions(1).await.unwrap();
    eprintln!("failover (in-process): {:?}", started.elapsed());
    assert!(r > last_rev, "{r} <= {last_rev}");
    last_rev = r;
    let l2 = c.leader().await;
    assert_ne!(l2, l);
    let nodes = pd.get_all_nodes().await.unwrap();
    assert_eq!(nodes.iter().map(|n| n.id).collect::<Vec<_>>(), {
        let mut v = vec![node_id, n2.id];
        v.sort();
        v
    });
    assert!(pd.is_bootstrapped().await.unwrap());
    let id = pd.alloc_id().await.unwrap();
    assert!(ids.iter().all(|i| *i < id), "id {id} reused");
    ids.push(id);
    assert_eq!(
        pd.get_region_by_id(region_id)
            .await
            .unwrap()
            .unwrap()
            .region
            .id,
        region_id
    );

    // More writes while the old leader is down: it must catch up (from a
    // snapshot, as the log is compacted every 20 entries).
    let n3 = node(pd.alloc_id().await.unwrap());
    pd.put_node(n3.clone()).await.unwrap();
    for _ in 0..40 {
        let r = pd.alloc_revisions(30).await.unwrap();
        assert!(r > last_rev);
        last_rev = r + 29;
    }
    c.restart(l).await;
    // The restarted member can only win an election once it has caught up
    // (from a snapshot: its log position was compacted away meanwhile);
    // then it must serve the same state.
    make_leader(&c, l).await;
    let nodes = pd.get_all_nodes().await.unwrap();
    assert_eq!(nodes.len(), 3, "{nodes:?}");
    let r = pd.alloc_revisions(1).await.unwrap();
    assert!(r > last_rev);
    let id = pd.alloc_id().await.unwrap();
    assert!(ids.iter().all(|i| *i < id), "id {id} reused");
}

/// One allocation: when it started and ended, and what it got.
type Op = (Instant, Instant, i64);

/// Every revision handed out is greater than every revision handed out
/// before (completed before this allocation started).
fn check_real_time_order(ops: &mut [Op]) {
    ops.sort_by_key(|o| o.1);
    let mut prefix_max = Vec::with_capacity(ops.len());
    let mut m = i64::MIN;
    for o in ops.iter() {
        m = m.max(o.2);
        prefix_max.push(m);
    }
    for b in ops.iter() {
        // Ops that ended before b started.
        let n = ops.partition_point(|a| a.1 < b.0);
        if n > 0 {
            assert!(
                prefix_max[n - 1] < b.2,
                "revision {} handed out after {} had been",
                b.2,
                prefix_max[n - 1]
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn revisions_increase_across_forced_leader_changes() {
    let mut c = Cluster::start(50).await;
    c.leader().await;
    let pd = RpcPdClient::connect(&c.urls(), client_config())
        .await
        .unwrap();
    let ops = Arc::new(Mutex::new(Vec::<Op>::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for t in 0..2u32 {
        let pd = pd.clone();
        let ops = ops.clone();
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut errors = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let start = Instant::now();
                match pd.alloc_revisions(t + 1).await {
                    Ok(r) => ops.lock().push((start, Instant::now(), r)),
                    Err(_) => errors += 1,
                }
            }
            errors
        }));
    }
    for round in 0..3 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let l = c.leader().await;
        let before = ops.lock().len();
        c.crash(l).await;
        let l2 = c.leader().await;
        assert_ne!(l, l2, "round {round}");
        // Allocations continue under the new leader.
        let deadline = Instant::now() + Duration::from_secs(10);
        while ops.lock().len() < before + 50 {
            assert!(Instant::now() < deadline, "round {round}: no progress");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        c.restart(l).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let mut ops = std::mem::take(&mut *ops.lock());
    assert!(ops.len() > 200, "only {} allocations", ops.len());
    check_real_time_order(&mut ops);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partitioned_leader_stops_before_a_new_one_starts() {
    // A window large enough that the old leader never needs a (now
    // impossible) commit to keep handing out: only its lease stops it.
    let c = Cluster::start(1_000_000).await;
    let l = c.leader().await;
    let old = c.core(l).clone();
    assert!(old.alloc_revisions(1).await.is_ok());

    let isolated_at = Instant::now();
    old.set_isolated(true);
    let ops = Arc::new(Mutex::new(Vec::<Op>::new()));

    // The old leader keeps answering from its window until its lease runs
    // out, and must then refuse.
    let old_task = {
        let ops = ops.clone();
        tokio::spawn(async move {
            let mut last_ok = None;
            while isolated_at.elapsed() < Duration::from_secs(4) {
                let start = Instant::now();
                if let Ok(r) = old.alloc_revisions(1).await {
                    let end = Instant::now();
                    ops.lock().push((start, end, r));
                    last_ok = Some(end);
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            last_ok
        })
    };
    // The others elect a new leader and hand out from above the committed
    // mark.
    let others: Vec<Arc<PdCore>> = (0..3)
        .filter(|i| *i != l)
        .map(|i| c.core(i).clone())
        .collect();
    let new_task = {
        let ops = ops.clone();
        tokio::spawn(async move {
            let mut got = 0;
            while isolated_at.elapsed() < Duration::from_secs(4) {
                for core in &others {
                    let start = Instant::now();
                    if let Ok(r) = core.alloc_revisions(1).await {
                        ops.lock().push((start, Instant::now(), r));
                        got += 1;
                    }
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            got
        })
    };
    let last_ok = old_task
        .await
        .unwrap()
        .expect("old leader served during its lease");
    let got = new_task.await.unwrap();
    assert!(got > 0, "no new leader served");
    let lease = TICK * (ELECTION_TICKS as u32 - 2);
    assert!(
        last_ok <= isolated_at + lease + Duration::from_millis(30),
        "isolated leader served {:?} after isolation (lease {lease:?})",
        last_ok - isolated_at
    );
    let mut ops = std::mem::take(&mut *ops.lock());
    check_real_time_order(&mut ops);
}

/// Makes member `target` the serving leader by partitioning whoever else
/// leads until `target` wins an election.
async fn make_leader(c: &Cluster, target: usize) {
    for _ in 0..20 {
        let l = c.leader().await;
        if l == target {
            return;
        }
        c.core(l).set_isolated(true);
        let deadline = Instant::now() + Duration::from_secs(15);
        while !(0..3).any(|i| i != l && c.core(i).is_serving()) {
            assert!(Instant::now() < deadline, "no leader while {l} is isolated");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        c.core(l).set_isolated(false);
    }
    panic!("member {target} never became leader");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn re_elected_leader_continues_above_its_successors() {
    // A large window: the first leader's own position stays far below its
    // committed mark, which its successors start from.
    let c = Cluster::start(1_000).await;
    let a = c.leader().await;
    let mut ops: Vec<Op> = Vec::new();
    for _ in 0..5 {
        ops.push(alloc(c.core(a)).await.unwrap());
    }
    // Another member leads and hands out above the first leader's mark.
    let b = (a + 1) % 3;
    make_leader(&c, b).await;
    for _ in 0..2_000 {
        ops.push(alloc(c.core(b)).await.unwrap());
    }
    // The first leader wins again: it must not continue its old window.
    make_leader(&c, a).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match alloc(c.core(a)).await {
            Ok(op) => {
                ops.push(op);
                break;
            }
            Err(e) => {
                assert!(Instant::now() < deadline, "{e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    check_real_time_order(&mut ops);
}

async fn alloc(core: &PdCore) -> Result<Op, PdError> {
    let start = Instant::now();
    let r = core.alloc_revisions(1).await?;
    Ok((start, Instant::now(), r))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn client_leaves_a_partitioned_leader() {
    let c = Cluster::start(50).await;
    let l = c.leader().await;
    // The partitioned leader comes first in the client's list.
    let mut urls = vec![c.url(l)];
    urls.extend((0..3).filter(|i| *i != l).map(|i| c.url(i)));
    let pd = RpcPdClient::connect(&urls, client_config()).await.unwrap();
    let before = pd.alloc_revisions(1).await.unwrap();
    c.core(l).set_isolated(true);
    // Past the old leader's lease: only a new leader can answer now.
    tokio::time::sleep(TICK * ELECTION_TICKS as u32).await;
    let started = Instant::now();
    let after = pd.alloc_revisions(1).await.unwrap();
    assert!(after > before);
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "took {:?}",
        started.elapsed()
    );
    assert_ne!(c.leader().await, l);
    assert_eq!(pd.current_revision().await.unwrap(), after);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_members_survive_two_crashes() {
    let mut c = Cluster::start_n(5, 50).await;
    c.leader().await;
    let pd = RpcPdClient::connect(&c.urls(), client_config())
        .await
        .unwrap();
    let mut last = pd.alloc_revisions(10).await.unwrap() + 9;
    for _ in 0..2 {
        let l = c.leader().await;
        c.crash(l).await;
        let r = pd.alloc_revisions(10).await.unwrap();
        assert!(r > last, "{r} <= {last}");
        last = r + 9;
    }
    // Two of five down: the remaining three still form a quorum.
    let serving = (0..5)
        .filter(|i| c.members[*i].core.as_ref().is_some_and(|c| c.is_serving()))
        .count();
    assert_eq!(serving, 1);
}

/// A follower that acknowledged the leader's lease, crashed and restarted at
/// once must not help elect a new leader inside that lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restarted_follower_does_not_vote_inside_the_lease() {
    let mut c = Cluster::start(1_000_000).await;
    let l = c.leader().await;
    let (f1, f2) = {
        let o: Vec<usize> = (0..3).filter(|i| *i != l).collect();
        (o[0], o[1])
    };
    let id = |i: usize| c.core(i).member_id();
    let (lid, f1id, f2id) = (id(l), id(f1), id(f2));
    for _ in 0..3 {
        c.core(l).alloc_revisions(1).await.unwrap();
    }
    // Let f2's log catch up fully, so that it can win a vote later.
    tokio::time::sleep(Duration::from_millis(300)).await;
    // l and f2 cannot talk; l keeps its lease through f1.
    c.core(l).set_blocked(&[f2id]);
    c.core(f2).set_blocked(&[lid]);
    tokio::time::sleep(TICK * (2 * ELECTION_TICKS as u32)).await;
    assert_eq!(c.leader().await, l, "f1 must keep l in office");

    let ops = Arc::new(Mutex::new(Vec::<Op>::new()));
    let t0 = Instant::now();
    let old = {
        let (core, ops) = (c.core(l).clone(), ops.clone());
        tokio::spawn(async move {
            while t0.elapsed() < Duration::from_secs(2) {
                if let Ok(op) = alloc(&core).await {
                    ops.lock().push(op);
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };
    // f1 crashes and is back at once, reachable only from f2, which
    // campaigns right away.
    c.core(l).set_blocked(&[f1id, f2id]);
    c.crash(f1).await;
    c.restart(f1).await;
    c.core(f1).set_blocked(&[lid]);
    c.core(f2).campaign();
    let others = [c.core(f1).clone(), c.core(f2).clone()];
    let new = {
        let ops = ops.clone();
        tokio::spawn(async move {
            while t0.elapsed() < Duration::from_secs(2) {
                for core in &others {
                    if let Ok(op) = alloc(core).await {
                        ops.lock().push(op);
                    }
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };
    old.await.unwrap();
    new.await.unwrap();
    let mut ops = std::mem::take(&mut *ops.lock());
    check_real_time_order(&mut ops);
}

/// The cluster's compaction revision is replicated state: it survives the
/// leader's crash, a new leader answers it and checks against it, and a
/// member that was down (catching up from a raft snapshot, the log being
/// collected every 20 entries) has it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn compaction_revision_survives_leader_changes() {
    let mut c = Cluster::start(50).await;
    c.leader().await;
    let pd = RpcPdClient::connect(&c.urls(), client_config())
        .await
        .unwrap();
    pd.alloc_revisions(100).await.unwrap();
    let out = pd.compact(40).await.unwrap();
    assert_eq!(out.status, pd::CompactStatus::Recorded);
    let l = c.leader().await;
    c.crash(l).await;
    let l2 = c.leader().await;
    assert_ne!(l, l2);
    assert_eq!(pd.compaction_revision().await.unwrap(), 40);
    assert_eq!(
        pd.compact(30).await.unwrap().status,
        pd::CompactStatus::Compacted
    );
    // Entries enough for the log to be collected while `l` is down.
    for _ in 0..60 {
        pd.alloc_id().await.unwrap();
    }
    assert_eq!(
        pd.compact(90).await.unwrap(),
        pd::CompactOutcome {
            status: pd::CompactStatus::Recorded,
            compaction_revision: 90
        }
    );
    c.restart(l).await;
    make_leader(&c, l).await;
    assert_eq!(pd.compaction_revision().await.unwrap(), 90);
    assert_eq!(c.core(l).compaction_revision().await.unwrap(), 90);
}
